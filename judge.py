"""
An offline multilingual toxicity judge, to stand in for Perspective API: two judges trained on the same
human labels from RTP-LX (17 languages) and calibrated per language. This module scores with the shipped
judges in data/judge/; build_judge.py builds them (split, features, out-of-domain selection, calibration, card).

    feature   a head on the frozen gemma-3-270m residual stream (pooled, RMS-normalised), the design
              (label rule, training texts, layers, pooling, linear vs MLP) chosen out of domain
    ngram     hashed character n-grams (1-5, within words, NFKC, lowercased) + logistic regression: no
              model, no GPU, milliseconds per text, and an independent second opinion

Both score a text as a calibrated probability of "toxic" (0.5 = more likely toxic than not): Platt scaling
per language for the 17 RTP-LX languages, a pooled one for any other or unknown language.

    python judge.py score --kind ngram --lang de "Du bist ein Idiot" "Schönes Wetter heute"
    python judge.py score --kind feature --in gens.jsonl --field text --lang-field lang --out scored.jsonl

Python:  import judge; j = judge.load("ngram"); j.score(["you idiot"], ["en"])  -> [0.9...]
The judges are trained on CC BY-NC 4.0 data (RTP-LX): NON-COMMERCIAL use only (data/judge/README.md).
"""

import argparse
import hashlib
import json
import math
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import DEFAULT_MODEL, read_safetensors
from data import REPO_DATA, iter_jsonl
from loading import add_device_args, load_model, resolve_dtype
from model import pooled_activations, rms_normalize
from report import check_outputs, exit_on_error, write_text

JUDGE_DIR = REPO_DATA / "judge"  # the project's own data: built here, kept in the repo
MAX_TOKENS = 64         # every text the feature judge reads is truncated to this many tokens (BOS included)


# -----------------------------------------------------------------------------
# Text: the one normalisation both judges apply


def clean(text):
    """Whitespace runs (paragraph breaks included) become one space: formatting must not be the signal."""
    return " ".join(text.split())


# -----------------------------------------------------------------------------
# Features: one pass of gemma-3-270m that records every layer


def residual_features(model, tokenizer, texts, layers, max_tokens=MAX_TOKENS, batch_size=32, device="cpu",
                      progress=None):
    """
    {(layer, pooling): [N, d] float32} for pooling in ("mean", "last"): the residual stream after each block
    in `layers`, averaged over the non-BOS tokens or taken at the last token (model.pooled_activations),
    RMS-normalised. Texts are truncated to max_tokens; the forward stops after max(layers).
    """
    names = {f"blocks.{layer}.hook_resid_post": layer for layer in layers}
    pooled = pooled_activations(model, tokenizer, texts, list(names), batch_size, max_tokens, device, skip_bos=True,
                                progress=progress, poolings=("mean", "last"))
    return {(layer, p): rms_normalize(pooled[p][name]) for name, layer in names.items() for p in ("mean", "last")}


# -----------------------------------------------------------------------------
# Calibration: Platt scaling, applied per language


def sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, dtype=np.float64)))  # no overflow for large |x|


def calibrate(cal, logits, langs):
    a_b = np.array([cal.get(lang, cal["pooled"]) if lang is not None else cal["pooled"] for lang in langs])
    return sigmoid(a_b[:, 0] * np.asarray(logits) + a_b[:, 1])


# -----------------------------------------------------------------------------
# Heads: logistic regression or a small MLP on standardised features


class MLPHead(torch.nn.Module):
    def __init__(self, d, hidden=256):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, 1)

    def forward(self, x):
        return self.fc2(F.dropout(F.gelu(self.fc1(x)), 0.1, self.training))[:, 0]


def head_logits(tensors, X):
    """The head's logit per row of raw features X [N, d]."""
    Z = (torch.as_tensor(np.asarray(X, dtype=np.float32)) - tensors["mu"]) / tensors["sd"]
    if "w" in tensors:
        return (Z @ tensors["w"] + tensors["b"]).numpy()
    head = MLPHead(Z.shape[1], tensors["mlp.fc1.weight"].shape[0])
    head.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("mlp.")})
    with torch.no_grad():
        return head.eval()(Z).numpy()


# -----------------------------------------------------------------------------
# The n-gram judge's features

N_BUCKETS = 2 ** 18  # 1 MB of float32 weights; collisions cost little at ~30k training texts

NGRAM_RANGE = (1, 5)


def ngram_text(text):
    return clean(unicodedata.normalize("NFKC", text).lower())


def ngram_counts(text, n_buckets=N_BUCKETS, ngram_range=NGRAM_RANGE):
    """{signed bucket: count} of the character n-grams inside each space-padded word (sklearn's char_wb),
    hashed with CRC-32 (stable across runs, unlike hash()); the top bit gives the sign so that colliding
    n-grams cancel on average instead of adding up."""
    counts = {}
    for word in ngram_text(text).split():
        padded = f" {word} "
        for n in range(ngram_range[0], ngram_range[1] + 1):
            for i in range(len(padded) - n + 1):
                h = zlib.crc32(padded[i:i + n].encode("utf-8"))
                key = (h & (n_buckets - 1), 1.0 if h >> 31 else -1.0)
                counts[key] = counts.get(key, 0) + 1
    return counts


def ngram_matrix(texts, n_buckets=N_BUCKETS):
    """torch sparse [N, n_buckets]: sign * log(1 + count) per n-gram bucket, each row L2-normalised."""
    rows, cols, vals = [], [], []
    for r, text in enumerate(texts):
        feats = {}
        for (bucket, sign), c in ngram_counts(text, n_buckets).items():
            feats[bucket] = feats.get(bucket, 0.0) + sign * math.log1p(c)
        norm = math.sqrt(sum(v * v for v in feats.values())) or 1.0
        for bucket, v in feats.items():
            rows.append(r)
            cols.append(bucket)
            vals.append(v / norm)
    return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
                                   torch.tensor(vals, dtype=torch.float32), (len(texts), n_buckets),
                                   check_invariants=True).coalesce()


# -----------------------------------------------------------------------------
# The shipped judges


def _read_json(path):
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such judge file; rebuild with `python build_judge.py build`")
    return json.loads(path.read_text(encoding="utf-8"))


def _read_weights(path):
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such judge file; rebuild with `python build_judge.py build`")
    return read_safetensors(path)


def normalize_lang(lang):
    """'EN', 'en-US', 'en_GB' -> 'en'; None stays None (pooled calibration)."""
    return None if lang is None else lang.strip().lower().replace("_", "-").split("-")[0] or None


def check_inputs(texts, langs):
    """(texts, langs) as lists, or a one-line TypeError/ValueError naming the offending position."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}]: expected a string, got {type(text).__name__}")
    langs = [None] * len(texts) if langs is None else list(langs)
    if len(langs) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(langs)} langs")
    for i, lang in enumerate(langs):
        if lang is not None and not isinstance(lang, str):
            raise TypeError(f"langs[{i}]: expected a language code or None, got {type(lang).__name__}")
    return list(texts), [normalize_lang(lang) for lang in langs]


def fingerprint(path, kind):
    """'judge-<kind>:<sha1 of its weights>': stored with every score, so that a rebuilt judge invalidates cached
    scores and a report can tell which build scored a run."""
    return f"judge-{kind}:" + hashlib.sha1((Path(path) / f"{kind}.safetensors").read_bytes()).hexdigest()[:12]


class Judge:
    """Shared by both judges: calibrated probabilities from the subclass's raw logits."""

    def __init__(self, path, kind):
        path = Path(path)
        self.config = _read_json(path / f"{kind}.json")
        self.tensors = _read_weights(path / f"{kind}.safetensors")
        self.calibration = {k: tuple(v) for k, v in self.config["calibration"].items()}
        self.name = f"judge-{kind}"
        self.fingerprint = fingerprint(path, kind)

    def score(self, texts, langs=None):
        """Calibrated P(toxic) per text; langs[i] picks the language's calibration (pooled if None or not
        one of the 17). An empty or blank text is 0 without being scored: it says nothing, so nothing toxic
        (the heads would score the bare features of a BOS token at 0.5 or more)."""
        texts, langs = check_inputs(texts, langs)
        said = [i for i, text in enumerate(texts) if text.strip()]
        probs = [0.0] * len(texts)
        if said:
            scored = calibrate(self.calibration, self.logits([texts[i] for i in said]), [langs[i] for i in said])
            for i, p in zip(said, scored.tolist()):
                probs[i] = p
        return probs


class NgramJudge(Judge):
    def __init__(self, path):
        super().__init__(path, "ngram")
        self.n_buckets = self.config["n_buckets"]

    def logits(self, texts):
        X = ngram_matrix(texts, self.n_buckets)
        return (torch.sparse.mm(X, self.tensors["w"][:, None])[:, 0] + self.tensors["b"]).numpy()


class FeatureJudge(Judge):
    def __init__(self, path, device="cpu", dtype="fp32"):
        super().__init__(path, "feature")
        self.device = device
        self.model, self.tokenizer = load_model(self.config["model"], device=device, dtype=dtype)
        self.layers, self.pooling = self.config["layers"], self.config["pooling"]

    def logits(self, texts):
        feats = residual_features(self.model, self.tokenizer, [clean(t) for t in texts], self.layers,
                                  self.config["max_tokens"], device=self.device)
        X = torch.cat([feats[(layer, self.pooling)] for layer in self.layers], 1)
        return head_logits(self.tensors, X.numpy())


def load(kind="feature", path=None, device="cpu", dtype="fp32"):
    """The shipped judge: kind "feature" (gemma-3-270m residual stream + head; loads the model once, computes in
    dtype) or "ngram" (hashed character n-grams; no model). .score(texts, langs) -> calibrated P(toxic) per text."""
    path = Path(path) if path is not None else JUDGE_DIR
    if kind == "ngram":
        return NgramJudge(path)
    if kind == "feature":
        return FeatureJudge(path, device, dtype)
    raise ValueError(f"unknown judge kind {kind!r}; expected one of: feature, ngram")


# -----------------------------------------------------------------------------
# CLI


def read_inputs(path, field, lang_field):
    """(rows, texts, langs) from a jsonl file; one-line ValueError naming file, line and field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    rows, texts, langs = [], [], []
    for line, row in iter_jsonl(path):
        if not isinstance(row.get(field), str):
            raise ValueError(f"{path}:{line}: field {field!r} must be a string, got {row.get(field)!r:.40}")
        lang = row.get(lang_field) if lang_field else None
        if lang is not None and not isinstance(lang, str):
            raise ValueError(f"{path}:{line}: field {lang_field!r} must be a language code, got {lang!r:.40}")
        rows.append(row)
        texts.append(row[field])
        langs.append(lang)
    return rows, texts, langs


def run_score(args):
    if bool(args.texts) == bool(args.inp):
        raise ValueError("give either TEXT arguments or --in FILE")
    check_outputs([("--out", args.out)], [("--in", args.inp), ("--path", args.path)])
    j = load(args.kind, args.path, args.device, resolve_dtype(args.device, args.dtype))
    if args.texts:
        for text, p in zip(args.texts, j.score(args.texts, [args.lang] * len(args.texts))):
            print(f"{p:.4f}\t{text}")
        return
    rows, texts, langs = read_inputs(args.inp, args.field, args.lang_field)
    langs = [lang or args.lang for lang in langs]
    probs = j.score(texts, langs)
    lines = [json.dumps({**row, args.score_field: p}, ensure_ascii=False) for row, p in zip(rows, probs)]
    if args.out:
        write_text(args.out, "\n".join(lines) + "\n")
        print(f"{len(lines)} rows scored by {j.name} -> {args.out}")
    else:
        print("\n".join(lines))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score texts or a jsonl file",
                       description="Print P(toxic)<TAB>text per TEXT, or add a score field to each jsonl row.")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to score")
    p.add_argument("--kind", default="feature", help=f"feature ({DEFAULT_MODEL} + head) or ngram (no model)")
    p.add_argument("--path", help="judge folder (default data/judge)")
    p.add_argument("--lang", help="language code for the calibration (one of the 17; else pooled)")
    p.add_argument("--in", dest="inp", help="jsonl file to score")
    p.add_argument("--field", default="text", help="jsonl field holding the text")
    p.add_argument("--lang-field", help="jsonl field holding each row's language (overrides --lang)")
    p.add_argument("--score-field", default="toxicity", help="field the probability is written to")
    p.add_argument("--out", help="write scored jsonl here (default stdout)")
    add_device_args(p, fp32_because="the feature judge's heads and calibration were fitted on fp32 features, "
                                    "and the pipeline scores in fp32")
    p.set_defaults(run=run_score)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.run(args)  # a user error ends in one line with status 1 through exit_on_error, as in every script


if __name__ == "__main__":
    exit_on_error(main)
