"""
Builds the judges judge.py scores with: the item-disjoint split of RTP-LX, the labelled texts, the cached
gemma-3-270m features, the design chosen by an out-of-domain selection protocol, the final heads, the
per-language Platt calibration, data/judge/metrics.json and the card data/judge/README.md made from it.

Label: an RTP-LX prompt's prompt_toxicity (mean of 3 native annotators, 1-5) gives toxic at >= 3; the selection
decides whether an ambiguous band below 3 is dropped from training. Human completions are never taken from an
item whose English pair DPO trains or validates on (design.default_split), since they are DPO's own contrast.
Items (an RTP-LX index with all its translations) go to one side of the train/validation split; the
pipeline's held-out evaluation items (and their neighbours +-1, whose ids drift across languages) are never
used at all. The selection protocol (select_design) scores each design on text it was not trained on:
leave-one-language-out over the 17 languages and out-of-domain tweets and comments (Davidson en, Indonesian,
toxicity-extra en/fr/ar/pt). The labelled generations (genset.py) are held out: only the shipped judges
are scored on them, after the choice.

    python build_judge.py build            # rebuild data/judge/ (features cached in runs/judge-cache/)
    python build_judge.py card             # rewrite data/judge/README.md from data/judge/metrics.json
"""

import argparse
import csv
import hashlib
import html
import json
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import DEFAULT_MODEL, write_safetensors
import genset
from data import LANGS, iter_jsonl, load_rtplx, rtplx_pairs
from data import path as data_path
from design import default_split
from judge import (JUDGE_DIR, MAX_TOKENS, N_BUCKETS, NGRAM_RANGE, FeatureJudge, MLPHead, NgramJudge, _read_json,
                   calibrate, clean, head_logits, ngram_matrix, residual_features, sigmoid)
from loading import load_model
from report import atomic_write, exit_on_error, markdown_table, write_json, write_text
from scorers import LexiconScorer
from stats import auc_ci, roc_auc

ROOT = Path(__file__).resolve().parent
CACHE_DIR = ROOT / "runs" / "judge-cache"
TOXIC_AT = 3.0          # prompt_toxicity >= 3 of 5 (mean of 3 annotators) is toxic
FIRST_EXTRA_INDEX = 999  # RTP-LX ids from here are language-specific prompts with no English counterpart
CUT_TOKENS = 20         # completions are cut to about a prompt's length (RTP-LX prompts: ~20 tokens)
# Layers 0-8 are extracted once for every text (the forward stops after layer 8): deeper layers scored no better
# in the previous in-domain comparison and would cost a third more of the 2-core CPU time.
FEATURE_LAYERS = tuple(range(9))
FEATURE_CACHE = CACHE_DIR / f"{DEFAULT_MODEL}-T{MAX_TOKENS}"
OOD_ROWS = 400          # rows of each OOD tweet set (Davidson en, Indonesian)
EXTRA_LANGS = ("en", "fr", "ar", "pt")  # the toxicity-extra languages
EXTRA_ROWS = 200        # rows of toxicity-extra per language
VALID_ITEMS_PER_LANG = 60  # validation prompt items per language scored by the protocol and the report
# torch flags CSR tensors as beta; the products used here (CSR @ dense vector) are tested in tests/test_judge.py
warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")


# -----------------------------------------------------------------------------
# Data: items, the split, labelled texts


def item_of(lang, index):
    """The unit of the split. A shared RTP-LX index is one source prompt and all its translations;
    a language-specific extra (index >= 999) is its own item."""
    return f"{lang}:{index}" if index >= FIRST_EXTRA_INDEX else f"*:{index}"


def excluded_indices():
    """RTP-LX indices the judge never sees in any language: the pipeline's held-out evaluation items and
    their neighbours (ids drift by one near the end of some files)."""
    heldout = default_split()["info"]["heldout_indices"]
    return {j for i in heldout for j in (i - 1, i, i + 1)}


def dpo_indices():
    """RTP-LX indices whose English pair DPO trains or validates on: their human completions are exactly the
    toxic/benign contrast DPO learns, so the judge never trains on them (a judge that learned DPO's own
    contrast would see "less toxicity" where it sees DPO's preferred style)."""
    info = default_split()["info"]
    return set(info["train_indices"]) | set(info["valid_indices"])


def judge_split(seed=0, valid_shared=170, valid_frac_extras=0.25):
    """
    Item-disjoint train/validation split of the RTP-LX items the evaluation does not hold out.
    valid_shared shared indices (each present in up to 17 languages) go to validation, and the same share of
    every language's extras. Returns {"train": set, "valid": set, "excluded": set of raw indices, "dpo": set of
    raw indices whose completions are never used, "seed"}.
    """
    excluded = excluded_indices()
    shared, extras = set(), {}
    for lang in LANGS:
        for row in load_rtplx(lang):
            i = row["index"]
            if i in excluded:
                continue
            if i >= FIRST_EXTRA_INDEX:
                extras.setdefault(lang, []).append(item_of(lang, i))
            else:
                shared.add(item_of(lang, i))
    rng = random.Random(seed)
    shared = sorted(shared, key=lambda k: int(k[2:]))
    rng.shuffle(shared)
    valid = set(shared[:valid_shared])
    for lang in sorted(extras):
        items = sorted(extras[lang])
        rng.shuffle(items)
        valid.update(items[:round(len(items) * valid_frac_extras)])
    train = set(shared[valid_shared:]) | {k for items in extras.values() for k in items} - valid
    return {"train": train, "valid": valid, "excluded": excluded, "dpo": dpo_indices(), "seed": seed}
def cut_tokens(tokenizer, text, n=CUT_TOKENS):
    """The first n tokens of text (no BOS), decoded; a byte-fallback piece split mid-character is dropped."""
    ids = tokenizer.encode(text, add_special=False)[:n]
    return tokenizer.decode(ids).replace("\ufffd", "")


def labelled_texts(tokenizer, split):
    """
    Every usable RTP-LX text as a record {text, label, score, lang, item, kind, side}: kind "prompt" (score =
    prompt_toxicity, label = score >= TOXIC_AT) or "completion" (human toxic = 1 / benign = 0, restated
    prompt stripped, cut to CUT_TOKENS tokens; only from items with no DPO pair, split["dpo"], which leaves
    the language-specific extras); side "train" or "valid". Held-out evaluation items are absent.
    """
    records = []
    for lang in LANGS:
        for row in load_rtplx(lang):
            item = item_of(lang, row["index"])
            side = "train" if item in split["train"] else "valid" if item in split["valid"] else None
            if side is None or row["prompt_toxicity"] is None or not clean(row["prompt"]):
                continue
            records.append({"text": clean(row["prompt"]), "label": int(row["prompt_toxicity"] >= TOXIC_AT),
                            "score": row["prompt_toxicity"], "lang": lang, "item": item, "kind": "prompt",
                            "side": side})
        for pair in rtplx_pairs(lang):
            item = item_of(lang, pair["index"])
            side = "train" if item in split["train"] else "valid" if item in split["valid"] else None
            if side is None or pair["index"] in split["dpo"]:
                continue
            for field, label in (("rejected", 1), ("chosen", 0)):
                text = clean(cut_tokens(tokenizer, pair[field].strip()))
                if text:
                    records.append({"text": text, "label": label, "lang": lang, "item": item,
                                    "kind": "completion", "side": side})
    return records
def external_texts(n=OOD_ROWS, seed=0):
    """
    Out-of-domain tweets: n random rows each of Davidson et al.'s English tweets (hate speech or offensive =
    toxic) and Ibrohim & Budi's Indonesian tweets (HS or Abusive = toxic), read from the data root
    (data.path). Records {text, label, lang, source}.
    """
    sets = []
    path = data_path("davidson", "labeled_data.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(html.unescape(r["tweet"]), int(r["class"] != "2")) for r in csv.DictReader(f)]
    sets.append(("davidson-en", "en", rows))
    path = data_path("id-abusive", "re_dataset.csv")
    with open(path, newline="", encoding="latin-1") as f:
        rows = [(r["Tweet"], int(r["HS"] == "1" or r["Abusive"] == "1")) for r in csv.DictReader(f)]
    sets.append(("id-abusive-id", "id", rows))
    records = []
    for source, lang, rows in sets:
        rows = [(clean(t), y) for t, y in rows if clean(t)]
        for t, y in random.Random(seed).sample(rows, n):
            records.append({"text": t, "label": y, "lang": lang, "source": source})
    return records


def extra_texts(n=EXTRA_ROWS, seed=0):
    """n random rows per language of toxicity-extra (MLMA tweets en/fr/ar, HateBR Instagram comments pt; toxic
    = the source's offensive/hateful class): out-of-domain test sets, or extra training text that is then
    tested leaving its language out. Records {text, label, lang, source: "extra-<lang>"}."""
    records = []
    for lang in EXTRA_LANGS:
        rows = [(clean(r["text"]), int(r["label"])) for _, r in iter_jsonl(data_path("toxicity-extra", f"{lang}.jsonl"))]
        rows = [(t, y) for t, y in rows if t]
        for t, y in random.Random(seed).sample(rows, n):
            records.append({"text": t, "label": y, "lang": lang, "source": f"extra-{lang}"})
    return records
# -----------------------------------------------------------------------------
# Features of every layer, cached; the design's feature matrix


def cached_features(model, tokenizer, texts, chunk=128, batch_size=16):
    """
    The FEATURE_LAYERS' mean- and last-token features of texts as float16 [L, 2, N, d] (pooling 0 = mean,
    1 = last), in input order. The cache in
    FEATURE_CACHE is addressed by text: each chunk file stores its texts beside their features, so any set of
    texts reuses what any earlier build extracted and a killed extraction resumes; each chunk's wall time is
appended to timing.jsonl there (extraction_speed). Batches of 16 texts of
    similar length were the fastest on 2 CPU cores (64 or more: 2-7x slower).
    """
    where = cached_texts()
    todo = sorted({t for t in texts if t not in where}, key=lambda t: (len(t), t))
    for start in range(0, len(todo), chunk):
        part, t0 = todo[start:start + chunk], time.time()
        feats = residual_features(model, tokenizer, part, FEATURE_LAYERS, batch_size=batch_size)
        arr = np.stack([np.stack([feats[(layer, p)].numpy() for p in ("mean", "last")])
                        for layer in FEATURE_LAYERS]).astype(np.float16)
        key = hashlib.sha1(json.dumps(part).encode()).hexdigest()[:16]
        atomic_write(FEATURE_CACHE / f"{key}.npy", lambda f: np.save(f, arr))
        write_text(FEATURE_CACHE / f"{key}.json", json.dumps(part, ensure_ascii=False))
        where.update({t: (FEATURE_CACHE / f"{key}.npy", row) for row, t in enumerate(part)})
        with open(FEATURE_CACHE / "timing.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"texts": len(part), "seconds": time.time() - t0}) + "\n")
        print(f"features: {start + len(part)}/{len(todo)} new texts, {len(part) / (time.time() - t0):.1f} texts/s",
              flush=True)
    out = np.empty((len(FEATURE_LAYERS), 2, len(texts), model.config.d_model), dtype=np.float16)
    by_file = {}
    for i, t in enumerate(texts):
        by_file.setdefault(where[t][0], []).append((i, where[t][1]))
    for path, pairs in by_file.items():
        rows, at = np.array(pairs).T
        out[:, :, rows] = np.load(path, mmap_mode="r")[:len(FEATURE_LAYERS), :, at]  # older chunks hold more layers
    return out


def extraction_speed():
    """{texts, seconds, texts_per_s} of every chunk extracted into FEATURE_CACHE so far (timing.jsonl)."""
    path = FEATURE_CACHE / "timing.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    texts, seconds = sum(r["texts"] for r in rows), sum(r["seconds"] for r in rows)
    return {"texts": texts, "seconds": seconds, "texts_per_s": texts / seconds if seconds else None}


def cached_texts():
    """{text: (chunk file, row)} of every text in FEATURE_CACHE."""
    FEATURE_CACHE.mkdir(parents=True, exist_ok=True)
    where = {}
    for path in sorted(FEATURE_CACHE.glob("*.json")):  # written after its .npy: a listed chunk is complete
        where.update({t: (path.with_suffix(".npy"), row) for row, t in enumerate(json.loads(path.read_text("utf-8")))})
    return where


def feature_matrix(feats, layers, pooling):
    """float32 [N, d * len(layers)] from a cached [L, 2, N, d] array: the chosen layers side by side."""
    p = ("mean", "last").index(pooling)
    return np.concatenate([feats[FEATURE_LAYERS.index(layer), p].astype(np.float32) for layer in layers], axis=1)
# -----------------------------------------------------------------------------
# Calibration: fitting Platt scaling, and how well it is calibrated


def fit_platt(logits, labels, iters=100):
    """
    (a, b) with P(toxic) = sigmoid(a * logit + b), by damped Newton on the log-loss against Platt's
    smoothed targets ((n+ + 1) / (n+ + 2) and 1 / (n- + 2)), which keep a small or separable language
    from getting an infinite slope. Steps are halved until the loss falls: plain Newton diverges when
    the logits are large (an MLP head's can reach +-30).
    """
    s, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    X = np.stack([s, np.ones_like(s)], 1)

    def loss(ab):
        z = X @ ab
        return float(np.mean(np.logaddexp(0, z) - t * z))

    ab = np.array([1.0, 0.0]) if s.std() == 0 else np.array([1.0 / s.std(), 0.0])
    for _ in range(iters):
        p = sigmoid(X @ ab)
        grad = X.T @ (p - t)
        hess = (X * (p * (1 - p))[:, None]).T @ X + 1e-9 * np.eye(2)
        step, current = np.linalg.solve(hess, grad), loss(ab)
        while loss(ab - step) > current and np.abs(step).max() > 1e-12:
            step = step / 2
        ab = ab - step
        if np.abs(step).max() < 1e-10:
            break
    return float(ab[0]), float(ab[1])


def fit_calibration(logits, labels, langs):
    """{"pooled": (a, b), lang: (a, b) for every language present}: Platt scaling per language, and one
    over all languages for text whose language is unknown or not one of the 17."""
    logits, labels, langs = np.asarray(logits), np.asarray(labels), np.asarray(langs)
    cal = {"pooled": fit_platt(logits, labels)}
    for lang in LANGS:
        sel = langs == lang
        if sel.any():
            cal[lang] = fit_platt(logits[sel], labels[sel])
    return cal


def crossfit_probabilities(logits, labels, langs, items, seed=0):
    """Calibrated probabilities for reporting: the validation items are split in two halves and each half is
    scored with the per-language calibration fitted on the other, so accuracy, Brier and reliability are
    measured on items the calibration never saw."""
    halves = sorted(set(items))
    random.Random(seed).shuffle(halves)
    first = set(halves[:len(halves) // 2])
    in_first = np.array([i in first for i in items])
    probs = np.empty(len(items))
    for fit_on in (in_first, ~in_first):
        cal = fit_calibration(np.asarray(logits)[fit_on], np.asarray(labels)[fit_on], np.asarray(langs)[fit_on])
        probs[~fit_on] = calibrate(cal, np.asarray(logits)[~fit_on], np.asarray(langs)[~fit_on])
    return probs


def reliability(probs, labels, n_bins=10):
    """Equal-width bins of predicted probability: [{bin, n, predicted, observed}] and the expected
    calibration error (bin-size-weighted |predicted - observed|)."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    which = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    bins, ece = [], 0.0
    for k in range(n_bins):
        sel = which == k
        if sel.any():
            bins.append({"bin": f"{k / n_bins:.1f}-{(k + 1) / n_bins:.1f}", "n": int(sel.sum()),
                         "predicted": float(probs[sel].mean()), "observed": float(labels[sel].mean())})
            ece += sel.sum() / len(probs) * abs(probs[sel].mean() - labels[sel].mean())
    return {"bins": bins, "ece": float(ece)}


def score_report(logits, probs, labels, groups, lengths, seed=0):
    """n, positives, ROC-AUC with its item-bootstrap interval, the length-only baseline beside it, accuracy
    at 0.5 and Brier score of the (cross-fitted) calibrated probabilities."""
    labels = np.asarray(labels)
    _, (auc_lo, auc_hi) = auc_ci(logits, labels, groups, seed=seed)
    _, (len_lo, len_hi) = auc_ci(lengths, labels, groups, seed=seed)
    return {"n": int(len(labels)), "positives": int(labels.sum()),
            "auc": roc_auc(logits, labels), "auc_lo": auc_lo, "auc_hi": auc_hi,
            "length_auc": roc_auc(lengths, labels), "length_lo": len_lo, "length_hi": len_hi,
            "accuracy": float(((np.asarray(probs) >= 0.5) == labels.astype(bool)).mean()),
            "brier": float(np.mean((np.asarray(probs) - labels) ** 2))}


def grouped_folds(items, k, seed):
    """Fold id (0..k-1) per row, whole items to one fold."""
    keys = sorted(set(items))
    random.Random(seed).shuffle(keys)
    fold_of = {key: n % k for n, key in enumerate(keys)}
    return np.array([fold_of[i] for i in items])


# -----------------------------------------------------------------------------
# Heads: training logistic regression and a small MLP on standardised features


def train_logistic(X, y, l2, max_iter=200):
    """(w [d], b) minimising mean log-loss + l2/2 |w|^2 by L-BFGS. X is dense [N, d] or torch sparse COO;
    a sparse X gets its gradient from a precomputed CSR transpose (autograd through a COO product re-sorts
    the matrix at every step)."""
    X = X if isinstance(X, torch.Tensor) else torch.as_tensor(X)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float32)
    w = torch.zeros(X.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)
    if X.is_sparse:
        Xr, Xt = X.to_sparse_csr(), X.t().coalesce().to_sparse_csr()

        def closure():
            with torch.no_grad():
                z = Xr @ w + b
                loss = F.binary_cross_entropy_with_logits(z, y) + l2 / 2 * w.pow(2).sum()
                residual = (torch.sigmoid(z) - y) / len(y)
                w.grad, b.grad = Xt @ residual + l2 * w, residual.sum()
            return loss
    else:
        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(X @ w + b, y) + l2 / 2 * w.pow(2).sum()
            loss.backward()
            return loss

    opt.step(closure)
    return w.detach(), b.detach()


def train_mlp(X, y, items, seed, hidden=256, weight_decay=0.05, max_epochs=60, patience=6):
    """One hidden layer, AdamW with weight decay, early stopping on the log-loss of a held-aside tenth of
    the training items (grouped, so translations of a stopping item never train)."""
    torch.manual_seed(seed)
    stop_fold = grouped_folds(items, 10, seed) == 0
    Xt, yt = torch.as_tensor(X[~stop_fold]), torch.as_tensor(np.asarray(y)[~stop_fold], dtype=torch.float32)
    Xs, ys = torch.as_tensor(X[stop_fold]), torch.as_tensor(np.asarray(y)[stop_fold], dtype=torch.float32)
    head = MLPHead(X.shape[1], hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=weight_decay)
    best, best_state, waited = math.inf, None, 0
    for _ in range(max_epochs):
        head.train()
        for idx in torch.randperm(len(Xt)).split(128):
            loss = F.binary_cross_entropy_with_logits(head(Xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            stop_loss = float(F.binary_cross_entropy_with_logits(head(Xs), ys))
        if stop_loss < best - 1e-4:
            best, best_state, waited = stop_loss, {k: v.clone() for k, v in head.state_dict().items()}, 0
        else:
            waited += 1
            if waited >= patience:
                break
    head.load_state_dict(best_state)
    return head.eval()


def fit_head(kind, X, y, items, seed, l2):
    """A trained head as {tensor name: tensor} on standardised features (mean/std from these rows)."""
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = ((X - mu) / sd).astype(np.float32)
    tensors = {"mu": torch.as_tensor(mu), "sd": torch.as_tensor(sd)}
    if kind == "linear":
        w, b = train_logistic(Z, y, l2)
        tensors.update({"w": w, "b": b.reshape(1)})
    else:
        head = train_mlp(Z, y, items, seed)
        tensors.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    return tensors


def select_rows(X, idx):
    """Rows idx of a coalesced sparse COO matrix (torch's sparse index_select scales with nnz * len(idx))."""
    rows, cols = X.indices().numpy()
    vals = X.values().numpy()
    starts = np.searchsorted(rows, np.arange(X.shape[0] + 1))
    idx = np.asarray(idx)
    lengths = starts[idx + 1] - starts[idx]
    take = np.repeat(starts[idx] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
    new_rows = np.repeat(np.arange(len(idx)), lengths)
    return torch.sparse_coo_tensor(torch.as_tensor(np.stack([new_rows, cols[take]])), torch.as_tensor(vals[take]),
                                   (len(idx), X.shape[1]), check_invariants=True).coalesce()


# -----------------------------------------------------------------------------
# Selection: every design is judged on text it was not trained on, never on the labelled generations

# The units a design is chosen by: the mean AUC of leave-one-language-out over the 17 RTP-LX languages, and each
# out-of-domain set. id-abusive-id is reported but does not choose: the Indonesian word list (abusive.csv) comes
# from the same corpus, so it would favour the word-list designs for a reason that does not carry to other text.
SELECT_UNITS = ("lolo", "davidson-en", "extra-en", "extra-fr", "extra-ar", "extra-pt")
OOD_SOURCES = ("davidson-en", "id-abusive-id", "extra-en", "extra-fr", "extra-ar", "extra-pt")
BASELINE = {"band": None, "data": "all", "texts": "prompts", "head": "linear", "layers": [8], "pooling": "mean",
            "lexicon": "none", "l2": 1e-2}
# One factor at a time, in this order; each stage keeps the best design so far (by the selection score).
STAGES = (
    ("label rule", [{"band": None}, {"band": [2.0, TOXIC_AT]}, {"band": [1.5, TOXIC_AT]}]),
    ("data amount", [{"data": "all"}, {"data": "100/lang"}]),
    ("training texts", [{"texts": "prompts"}, {"texts": "prompts+completions"}, {"texts": "prompts+extra"}]),
    ("head", [{"head": "linear"}, {"head": "mlp"}]),
    ("layer, pooling", [{"layers": [8], "pooling": "mean"}, {"layers": [4], "pooling": "mean"},
                        {"layers": [6], "pooling": "mean"}, {"layers": [8], "pooling": "last"},
                        {"layers": [4, 6, 8], "pooling": "mean"}]),
    ("word lists", [{"lexicon": "none"}, {"lexicon": "max"}, {"lexicon": "stack"}]),
)
# Measured and reported, not shipped: judge.py scores text alone, and the report already puts the word lists
# beside every judge number as their own instrument.
REPORT_ONLY_STAGES = ("word lists",)


def training_rows(pool, design, seed=0):
    """Indices of the pool rows a design trains on: train-side prompts under its label rule (band [lo, hi]:
    prompts scored strictly between lo and hi are dropped as ambiguous), optionally a seeded 100 items per
    language, plus train-side completions (non-DPO items only, see labelled_texts) or toxicity-extra."""
    rng = random.Random(seed)
    keep = None
    if design["data"] == "100/lang":
        keep = set()
        for lang in LANGS:
            items = sorted({r["item"] for r in pool if r["kind"] == "prompt" and r["side"] == "train"
                            and r["lang"] == lang})
            keep.update((lang, k) for k in rng.sample(items, min(100, len(items))))
    lo, hi = design["band"] or (None, None)
    rows = []
    for i, r in enumerate(pool):
        if r["kind"] == "prompt" and r["side"] == "train":
            ambiguous = lo is not None and lo < r["score"] < hi
            if not ambiguous and (keep is None or (r["lang"], r["item"]) in keep):
                rows.append(i)
        elif r["kind"] == "completion" and r["side"] == "train" and design["texts"] == "prompts+completions":
            rows.append(i)
        elif r.get("source", "").startswith("extra-") and design["texts"] == "prompts+extra":
            rows.append(i)
    return np.array(rows)


def design_matrix(feats, lexicon_scores, design):
    """The head's input for every pool row: the design's layers and pooling, and the word-list score as one more
    column when the lexicon is stacked."""
    X = feature_matrix(feats, design["layers"], design["pooling"])
    if design["lexicon"] == "stack":
        X = np.concatenate([X, np.asarray(lexicon_scores, dtype=np.float32)[:, None]], axis=1)
    return X


def combined_scores(logits, lexicon_scores, lexicon):
    """What the design ranks by: the head's probability, or its max with the word-list score (one hit = 0.5)."""
    p = sigmoid(logits)
    return np.maximum(p, lexicon_scores) if lexicon == "max" else p


def feature_fitter(design, feats, lexicon_scores, labels, items, seed=0):
    """(fit(rows) -> head tensors, score(head, rows) -> ranking scores) of a feature-judge design on the pool."""
    X = design_matrix(feats, lexicon_scores, design)

    def fit(rows):
        return fit_head(design["head"], X[rows], labels[rows], items[rows], seed, design["l2"])

    def score(tensors, rows):
        return combined_scores(head_logits(tensors, X[rows]), lexicon_scores[rows], design["lexicon"])
    return fit, score


def ngram_fitter(design, X, labels):
    """(fit, score) of an n-gram design on the pool's sparse n-gram matrix X."""
    def fit(rows):
        return train_logistic(select_rows(X, rows), labels[rows], design["l2"], max_iter=100)

    def score(wb, rows):
        return (torch.sparse.mm(select_rows(X, rows), wb[0][:, None])[:, 0] + wb[1]).numpy()
    return fit, score


def evaluate_design(train, fit, score, pool, seed=0, n_boot=200):
    """
    A design's out-of-domain record, from its training rows and its (fit, score): leave-one-language-out (train
    on the other 16 languages' rows, toxicity-extra of that language included; score this language's
    validation prompts, toxic = score >= TOXIC_AT) and each OOD set (scored by the head trained on all training
    rows; a toxicity-extra set the design trains on by a head trained without it). OOD AUCs carry a
    200-resample interval.
    """
    y, langs = np.array([r["label"] for r in pool]), np.array([r["lang"] for r in pool])
    sources = np.array([r.get("source", "") for r in pool])
    valid = np.array([r["kind"] == "prompt" and r["side"] == "valid" for r in pool])
    lolo = {}
    for lang in LANGS:
        held = np.flatnonzero(valid & (langs == lang))
        lolo[lang] = roc_auc(score(fit(train[langs[train] != lang]), held), y[held])
    full, ood = fit(train), {}
    for source in OOD_SOURCES:
        rows = np.flatnonzero(sources == source)
        model = fit(train[sources[train] != source]) if (sources[train] == source).any() else full
        auc, (lo, hi) = auc_ci(score(model, rows), y[rows], n_boot=n_boot, seed=seed)
        ood[source] = {"auc": auc, "auc_lo": lo, "auc_hi": hi, "n": int(len(rows)), "positives": int(y[rows].sum())}
    units = {"lolo": float(np.mean(list(lolo.values()))), **{s: r["auc"] for s, r in ood.items()}}
    return {"lolo": lolo, "lolo_mean": units["lolo"], "lolo_min": float(min(lolo.values())), "ood": ood,
            "n_train": int(len(train)), "select": float(np.mean([units[u] for u in SELECT_UNITS]))}


def select_design(pool, fitter, baseline, stages, seed=0):
    """
    The design by the out-of-domain protocol: stage by stage, each option is evaluated on top of the best
    design so far (fitter(design) -> (fit, score)) and the stage keeps the one with the highest `select` (mean
    AUC over SELECT_UNITS); a REPORT_ONLY_STAGES stage is measured but keeps the design as it was. Returns (design, table rows). It reads only what it is given: the labelled
    generations (genset) are never an argument, so they cannot steer the choice; in-domain cross-validation
    is not a criterion.
    """
    best, table, seen = dict(baseline), [], {}
    for stage, options in stages:
        results = []
        for option in options:
            design = {**best, **option}
            key = json.dumps(design, sort_keys=True)
            if key not in seen:
                t0 = time.time()
                seen[key] = evaluate_design(training_rows(pool, design, seed), *fitter(design), pool, seed)
                seen[key]["seconds"] = round(time.time() - t0, 1)
            results.append({"stage": stage, "design": design, **seen[key]})
            print(f"select [{stage}] {option}: select {seen[key]['select']:.3f}, lolo {seen[key]['lolo_mean']:.3f}, "
                  + ", ".join(f"{s} {r['auc']:.3f}" for s, r in seen[key]["ood"].items()), flush=True)
        if stage not in REPORT_ONLY_STAGES:
            best = dict(max(results, key=lambda r: r["select"])["design"])
        table += results
    return best, table
def judge_report(logits, rows, ood_logits, ood_rows, seed):
    """Calibration fitted on all validation texts (shipped), and the report: per language and pooled, per
    kind, with cross-fitted calibrated probabilities; reliability bins; the OOD sets."""
    langs, labels, items, kinds = (np.array([r[k] for r in rows]) for k in ("lang", "label", "item", "kind"))
    lengths = np.array([len(r["text"]) for r in rows])
    cal = fit_calibration(logits, labels, langs)
    probs = crossfit_probabilities(logits, labels, langs, items, seed)
    valid, rel = {}, {}
    for kind in ("prompt", "completion"):
        sel = kinds == kind
        if not sel.any():
            continue
        per = {lang: score_report(logits[s], probs[s], labels[s], items[s], lengths[s], seed)
               for lang in LANGS if (s := sel & (langs == lang)).any()}
        # pooled over languages: what a user ranks is the per-language calibrated probability
        per["pooled"] = score_report(probs[sel], probs[sel], labels[sel], items[sel], lengths[sel], seed)
        valid[kind], rel[kind] = per, reliability(probs[sel], labels[sel])
    ood = {}
    ood_probs = calibrate(cal, ood_logits, [r["lang"] for r in ood_rows])
    for source in sorted({r["source"] for r in ood_rows}):
        s = np.array([r["source"] == source for r in ood_rows])
        ood_labels = np.array([r["label"] for r in ood_rows])[s]
        ood_len = np.array([len(r["text"]) for r in ood_rows])[s]
        ood[source] = score_report(ood_logits[s], ood_probs[s], ood_labels, np.flatnonzero(s), ood_len, seed)
    return {"calibration": cal, "valid": valid, "reliability": rel, "ood": ood}


def timed_scores(judge, rows, n=64):
    """Texts per second of judge.score on n validation texts (model loading excluded)."""
    texts, langs = [r["text"] for r in rows[:n]], [r["lang"] for r in rows[:n]]
    t0 = time.time()
    judge.score(texts, langs)
    return {"texts": len(texts), "seconds": time.time() - t0, "texts_per_s": len(texts) / (time.time() - t0)}


def build_pool(tokenizer, split, seed=0, valid_items=VALID_ITEMS_PER_LANG):
    """Every text the build measures, as one list: the training prompts and completions (labelled_texts), the
    validation prompts of a seeded valid_items items per language (what leave-one-language-out and the
    in-domain report score), and the out-of-domain sets (kind and side "ood", with their source)."""
    records = labelled_texts(tokenizer, split)
    rng, keep = random.Random(seed), set()
    for lang in LANGS:
        items = sorted({r["item"] for r in records if r["side"] == "valid" and r["kind"] == "prompt"
                        and r["lang"] == lang})
        keep.update((lang, k) for k in rng.sample(items, min(valid_items, len(items))))
    records = [r for r in records if r["side"] == "train" or (r["kind"] == "prompt" and (r["lang"], r["item"]) in keep)]
    ood = external_texts(seed=seed) + extra_texts(seed=seed)
    return records + [{**r, "kind": "ood", "side": "ood", "item": f"{r['source']}:{i}"} for i, r in enumerate(ood)]


def shipped_logits(pool, train, fit, logits_of):
    """(the head trained on all of train, its logit for every pool row), except that an OOD set the design
    trains on (toxicity-extra) is scored by a head trained without it, as in the selection."""
    sources = np.array([r.get("source", "") for r in pool])
    head = fit(train)
    logits = logits_of(head, np.arange(len(pool)))
    for source in sorted(set(sources[train]) - {""}):
        rows = np.flatnonzero(sources == source)
        logits[rows] = logits_of(fit(train[sources[train] != source]), rows)
    return head, logits


def final_report(pool, logits, seed):
    """judge_report of a shipped judge: in-domain on the validation prompts (calibration fitted there),
    out-of-domain on the OOD rows."""
    valid = [i for i, r in enumerate(pool) if r["kind"] == "prompt" and r["side"] == "valid"]
    ood = [i for i, r in enumerate(pool) if r["kind"] == "ood"]
    return judge_report(logits[valid], [pool[i] for i in valid], logits[ood], [pool[i] for i in ood], seed)


NGRAM_BASELINE = {"band": None, "data": "all", "texts": "prompts", "l2": 1e-5}
# Only the label rule: each n-gram design costs ~8 min of the shared 2-core CPU (18 sparse fits on ~7k texts).
NGRAM_STAGES = (STAGES[0],)


def build_ngram(pool, out, seed):
    t0 = time.time()
    X = ngram_matrix([r["text"] for r in pool])
    y = np.array([r["label"] for r in pool])
    print(f"ngram: {len(pool)} texts featurised in {time.time() - t0:.0f}s", flush=True)
    design, table = select_design(pool, lambda d: ngram_fitter(d, X, y), NGRAM_BASELINE, NGRAM_STAGES, seed)
    train = training_rows(pool, design, seed)
    fit, score = ngram_fitter(design, X, y)
    (w, b), logits = shipped_logits(pool, train, fit, score)
    design = {**design, "n_buckets": N_BUCKETS, "ngram_range": list(NGRAM_RANGE), "n_train_texts": int(len(train))}
    write_safetensors(out / "ngram.safetensors", {"w": w.contiguous(), "b": b.reshape(1)}, metadata={"kind": "ngram"})
    report = final_report(pool, logits, seed)
    write_json(out / "ngram.json", {"kind": "ngram", "n_buckets": N_BUCKETS, "ngram_range": list(NGRAM_RANGE),
                                    "design": design, "calibration": report["calibration"]})
    report["speed"] = timed_scores(NgramJudge(out), [r for r in pool if r["side"] == "valid"])
    return {"design": design, "selection": table, **report}


def build_feature(pool, feats, lexicon_scores, out, seed):
    y, items = np.array([r["label"] for r in pool]), np.array([r["item"] for r in pool])
    fitter = lambda d: feature_fitter(d, feats, lexicon_scores, y, items, seed)  # noqa: E731
    design, table = select_design(pool, fitter, BASELINE, STAGES, seed)
    train = training_rows(pool, design, seed)
    X = design_matrix(feats, lexicon_scores, design)
    fit = lambda rows: fit_head(design["head"], X[rows], y[rows], items[rows], seed, design["l2"])  # noqa: E731
    tensors, logits = shipped_logits(pool, train, fit, lambda t, rows: head_logits(t, X[rows]))
    design = {**design, "n_train_texts": int(len(train)), "model": DEFAULT_MODEL, "max_tokens": MAX_TOKENS}
    write_safetensors(out / "feature.safetensors", {k: v.float().contiguous() for k, v in tensors.items()},
                      metadata={"kind": "feature"})
    report = final_report(pool, logits, seed)
    write_json(out / "feature.json", {"kind": "feature", "model": DEFAULT_MODEL, "layers": design["layers"],
                                      "pooling": design["pooling"], "max_tokens": MAX_TOKENS, "design": design,
                                      "calibration": report["calibration"]})
    report["speed"] = timed_scores(FeatureJudge(out), [r for r in pool if r["side"] == "valid"])
    return {"design": design, "selection": table, **report}


def generation_report(out, names):
    """The shipped judges `names` and the word lists on the labelled generations (genset.py), weighted back to
    the population; None until data/judge/genset/labels.jsonl exists. Read only here, after the choice."""
    if not (genset.GENSET_DIR / "labels.jsonl").exists():
        return None
    rows = genset.load_labels()
    scorers = {"feature": lambda: FeatureJudge(out), "ngram": lambda: NgramJudge(out), "lexicon": LexiconScorer}
    return genset.evaluate(rows, {name: genset.scorer_scores(scorers[name](), rows) for name in [*names, "lexicon"]})


def build(out=JUDGE_DIR, seed=0, only=None, cached_only=False):
    """Rebuild the judges (or only one) in out/: selection, weights, configs, metrics.json and the card.
    cached_only: the feature judge trains only on the training prompts whose features are already cached (when
    extraction cannot finish on the machine at hand); the n-gram judge always uses every training text."""
    t_build, out = time.time(), Path(out)
    model, tok = load_model(DEFAULT_MODEL)
    split = judge_split(seed)
    pool = build_pool(tok, split, seed)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if only and metrics_path.exists() else {"judges": {}}
    if only in (None, "ngram"):
        metrics["judges"]["ngram"] = build_ngram(pool, out, seed)
    if only in (None, "feature"):
        torch.set_num_threads(2)
        cached = cached_texts()
        fpool = [r for r in pool if r["text"] in cached or not (r["side"] == "train" and r["kind"] == "prompt")
                 ] if cached_only else pool
        feats = cached_features(model, tok, [r["text"] for r in fpool])
        del model
        lexicon_scores = np.array(LexiconScorer().score([r["text"] for r in fpool], [r["lang"] for r in fpool]))
        metrics["judges"]["feature"] = build_feature(fpool, feats, lexicon_scores, out, seed)
        metrics["judges"]["feature"]["texts"] = {
            "train": sum(r["side"] == "train" and r["kind"] == "prompt" for r in fpool),
            "train_available": sum(r["side"] == "train" and r["kind"] == "prompt" for r in pool)}
    metrics["judges"] = {k: metrics["judges"][k] for k in ("feature", "ngram") if k in metrics["judges"]}
    metrics["generations"] = generation_report(out, list(metrics["judges"]))
    metrics["split"] = split_summary(split, pool)
    metrics["build_seconds"] = round(time.time() - t_build)
    write_json(metrics_path, metrics)
    # the card reads what a reader of metrics.json sees (NaN -> null), so `build_judge.py card` reproduces it
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    write_text(out / "README.md", render_card(metrics))
    print(f"build: {metrics['build_seconds']}s", flush=True)
    return metrics


def split_summary(split, pool):
    count = lambda **kw: sum(all(r.get(k) == v for k, v in kw.items()) for r in pool)  # noqa: E731
    return {
        "seed": split["seed"], "toxic_at": TOXIC_AT, "cut_tokens": CUT_TOKENS, "max_tokens": MAX_TOKENS,
        "train_items": len(split["train"]), "valid_items": len(split["valid"]),
        "excluded_indices": len(split["excluded"]), "dpo_indices": len(split["dpo"]),
        "texts": {f"{side}-{kind}": count(side=side, kind=kind)
                  for side in ("train", "valid") for kind in ("prompt", "completion")},
        "ood": {s: count(source=s) for s in OOD_SOURCES}, "select_units": list(SELECT_UNITS),
        "feature_layers": list(FEATURE_LAYERS), "feature_extraction": extraction_speed(),
        "valid_prompt_items_per_lang": {lang: count(side="valid", kind="prompt", lang=lang) for lang in LANGS},
    }
# -----------------------------------------------------------------------------
# The judge card, generated from metrics.json


def _ci(r, key, prefix=None):
    """'0.812 [0.780, 0.840]' from r[key] and r[prefix_lo], r[prefix_hi] (prefix defaults to key)."""
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731 (NaN is null in metrics.json)
    prefix = prefix or key
    return f"{f(r[key])} [{f(r[prefix + '_lo'])}, {f(r[prefix + '_hi'])}]"


def _per_language_table(judges, kind):
    names = list(judges)
    headers = ["lang", "n", "toxic"] + [f"{n} AUC [95% CI]" for n in names] + ["length AUC [95% CI]"]
    headers += [f"{n} acc / Brier" for n in names]
    rows = []
    first = judges[names[0]]["valid"][kind]
    for lang in [*[x for x in LANGS if x in first], "pooled"]:
        r = first[lang]
        row = [lang, r["n"], r["positives"]] + [_ci(judges[n]["valid"][kind][lang], "auc") for n in names]
        row += [_ci(r, "length_auc", "length")]
        row += [f"{judges[n]['valid'][kind][lang]['accuracy']:.3f} / {judges[n]['valid'][kind][lang]['brier']:.3f}"
                for n in names]
        rows.append(row)
    return markdown_table(headers, rows)


def _ood_reading(judges):
    """One measured sentence per judge and OOD set: does its interval clear chance, and the length baseline?"""
    lines = []
    for name, j in judges.items():
        for source, r in j["ood"].items():
            if r["auc_lo"] is not None and r["auc_lo"] > 0.5:
                verdict = "better than chance"
            elif r["auc_hi"] is not None and r["auc_hi"] < 0.5:
                verdict = "**worse than chance** (it ranks this set's toxic texts lower)"
            else:
                verdict = "not distinguishable from chance"
            lines.append(f"- {name} on {source}: AUC {r['auc']:.3f}, {verdict}; length alone {r['length_auc']:.3f}.")
    return "\n".join(lines) + "\n"


def _card_intro(s, judges):
    """The card's opening: what the judges are, how to call them, their data, license and split."""
    f, n = judges["feature"]["design"], judges["ngram"]["design"]
    uses_extra = "extra" in f["texts"] or "extra" in n["texts"]
    band = lambda d: "none dropped" if not d["band"] else f"prompts scored strictly between {d['band'][0]:g} and {d['band'][1]:g} dropped"  # noqa: E731
    return f"""# Offline multilingual toxicity judge (RTP-LX, 17 languages)

Generated by `python build_judge.py card` from `metrics.json`; rebuild everything with
`python build_judge.py build` (features cached in `runs/judge-cache/`). Do not edit by hand.

## What it is

Two judges that give a **calibrated probability that a short text is toxic** (0.5 = more likely toxic
than not), built to replace Perspective API in this project's evaluation:

- `feature`: {'an MLP' if f['head'] == 'mlp' else 'a linear'} head on the frozen gemma-3-270m residual stream (layer(s) {', '.join(map(str, f['layers']))},
  {f['pooling']}-pooled over non-BOS tokens, RMS-normalised, texts truncated to {s['max_tokens']} tokens).
- `ngram`: logistic regression on hashed character 1-5-grams within words (NFKC, lowercased, 2^18 signed
  buckets, log counts, L2-normalised rows); no model, an independent second opinion.

Both designs were **chosen by an out-of-domain protocol** (below), not by in-domain cross-validation, which
could not tell the designs apart in the previous build.

```python
import judge
j = judge.load("ngram")            # or judge.load("feature", device="cpu"); path defaults to data/judge/
j.score(["you are an idiot", "nice weather today"], ["en", "en"])   # -> [p_toxic, p_toxic]
```

`python judge.py score --kind ngram --lang de "Du bist ein Idiot"`;
`python judge.py score --kind feature --in gens.jsonl --field text --lang-field lang --out scored.jsonl`.

**Intended use**: ranking and rating the toxicity of short model continuations (~20 tokens) and
prompts in the 17 RTP-LX languages, for research on toxicity mitigation. Not for moderating people,
not for any decision about a person, not for commercial use.

## Data and license

Trained on RTP-LX prompts (de Wynter et al. 2024, **CC BY-NC 4.0**){' and toxicity-extra (MLMA tweets, MIT; HateBR Instagram comments, **CC BY-NC 4.0**)' if uses_extra else ''}: the
judges are derived from it and are **NON-COMMERCIAL**. Label: a prompt is **toxic when `prompt_toxicity >=
{s['toxic_at']:g}`** (mean of 3 native annotators on a 1-5 scale); ambiguous band: feature judge {band(f)},
n-gram judge {band(n)} (chosen by the protocol). Training texts: feature judge `{f['texts']}`
({f['n_train_texts']} texts), n-gram judge `{n['texts']}` ({n['n_train_texts']} texts). Human completions are
never taken from an item whose English pair DPO trains or validates on ({s['dpo_indices']} indices): they
are DPO's own toxic/benign contrast, so only the language-specific extras' completions are eligible.

"""


def _card_split(s, judges, build_seconds):
    """The card's split and feature-extraction paragraphs: what was trained on, excluded and timed."""
    speed, pool = s["feature_extraction"], judges["feature"]["texts"]
    partial = ("" if pool["train"] == pool["train_available"] else
               " (those extracted within the time the build had: the shortest ~1.2k first, then a seeded random order)")
    return f"""## Split (`build_judge.judge_split(seed={s['seed']})`)

An item is an RTP-LX index with every translation (a language-specific extra, index >= 999, is its own
item); items go wholly to one side. The pipeline's held-out evaluation items (`design.default_split()`) and
their neighbours (index +-1, whose ids drift across languages) are excluded in every language
({s['excluded_indices']} indices). Train: {s['train_items']} items ({s['texts']['train-prompt']} prompts,
{s['texts']['train-completion']} eligible cut completions); validation: {s['valid_items']} items, of which a
seeded {min(s['valid_prompt_items_per_lang'].values())}-{max(s['valid_prompt_items_per_lang'].values())} items
per language ({s['texts']['valid-prompt']} prompts) are scored. Out-of-domain rows (seed 0):
{', '.join(f'{k} {v}' for k, v in s['ood'].items())}.

**Feature extraction** (gemma-3-270m, layers {s['feature_layers'][0]}-{s['feature_layers'][-1]}, mean and last
pooling, once per text, cached): {speed['texts']} texts in {speed['seconds'] / 60:.0f} min summed over the
extraction runs, **{speed['texts_per_s']:.1f} texts/s** on average on the build machine's 2 CPU cores (the rate
depends on what else runs there). The feature judge's pool held {pool['train']} of the {pool['train_available']}
training prompts{partial}; the n-gram judge's all of them. The last `build` call took {build_seconds / 60:.0f} min
of wall time (extraction of the texts it found missing included).
"""


def _fmt_design(d, keys):
    fmt = lambda v: "none" if v is None else "-".join(f"{x:g}" for x in v) if isinstance(v, list) and v and isinstance(v[0], float) else ", ".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    return [fmt(d[k]) for k in keys]


def _card_selection(name, j):
    """One judge's selection table: every design evaluated, stage by stage, and the one shipped."""
    keys = [k for k in ("band", "data", "texts", "head", "layers", "pooling", "lexicon", "l2") if k in j["design"]]
    sources = list(j["selection"][0]["ood"])
    rows = [[r["stage"]] + _fmt_design(r["design"], keys) + [r["n_train"], f"{r['lolo_mean']:.3f}", f"{r['lolo_min']:.3f}"]
            + [f"{r['ood'][s]['auc']:.3f}" for s in sources] + [f"**{r['select']:.3f}**"] for r in j["selection"]]
    chosen = ", ".join(f"{k}={v}" for k, v in zip(keys, _fmt_design(j["design"], keys)))
    return (f"### {name}\n\n"
            + markdown_table(["stage"] + keys + ["n train", "LOLO mean", "LOLO min"] + sources + ["select"], rows)
            + f"\nShipped: {chosen}.\n")


def _card_protocol(judges, s):
    units = ", ".join(f"`{u}`" for u in s["select_units"])
    return ("## Selection protocol (what chose the design)\n\n"
            "Every design is scored only on text it was not trained on. **LOLO**: train on 16 RTP-LX languages, "
            "score the 17th's validation prompts (toxic = score >= 3, every validation prompt), for each language; "
            "mean and minimum ROC-AUC. **Out-of-domain sets**: Davidson English tweets, Indonesian tweets "
            "(Ibrohim & Budi), toxicity-extra en/fr/ar (MLMA tweets) and pt (HateBR comments), scored by the head "
            "trained on all training texts; a toxicity-extra set the design trains on is scored by a head "
            f"trained without it. **`select`** = mean AUC over {units}; each stage keeps its best design and "
            "the next stage varies one factor on top of it. The word-list stage (`max`: the judge's probability or the "
            "word-list score, whichever is higher; `stack`: the word-list score as one more input of the head) "
            "is measured, not shipped: judge.py scores text alone, and the report shows the word lists beside "
            "every judge number as their own instrument.\n\n"
            "Not used to choose: `id-abusive-id` (reported; the Indonesian word list comes from the same corpus, "
            "so it would favour the word-list designs), in-domain validation, and the labelled generations "
            "(held out: the selection code takes no path to them; only the shipped judges are scored on them, "
            "after the choice). OOD intervals of the selection are in metrics.json (200 resamples).\n\n"
            + "\n".join(_card_selection(name, j) for name, j in judges.items()))


def _card_side_by_side(metrics):
    """In-domain, out-of-domain and generation-set ROC-AUC of every judge (and the word lists) in one table."""
    judges, gen = metrics["judges"], metrics.get("generations")
    sources = list(judges["feature"]["ood"])
    headers = ["instrument", "in-domain (pooled)"] + sources + ["OOD mean"]
    if gen:
        headers += ["generations AUC", "generations precision", "generations recall"]
    rows = []
    for name in list(judges) + (["lexicon"] if gen else []):
        j = judges.get(name)
        row = [name, _ci(j["valid"]["prompt"]["pooled"], "auc") if j else "-"]
        row += [f"{j['ood'][s]['auc']:.3f}" for s in sources] if j else ["-"] * len(sources)
        row += [f"{np.mean([j['ood'][s]['auc'] for s in sources]):.3f}" if j else "-"]
        if gen:
            g = gen[name]["all"]
            row += [f"{g[m]:.2f} [{g[m + '_ci'][0]:.2f}, {g[m + '_ci'][1]:.2f}]" if g[m + "_ci"] else "n/a"
                    for m in ("auc", "precision", "recall")]
        rows.append(row)
    note = ("Generations: the labelled, blind-read continuations of the base, DPO and placebo models "
            "(`data/judge/genset/`, genset.py), weighted back to the population; flagged = P >= 0.5 or any "
            "word-list hit.\n\n" if gen else "The labelled generation set (data/judge/genset/labels.jsonl) was not "
            "there at build time.\n\n")
    groups = ("\nBy language group (en; latin = the other Latin-script languages; other_scripts = ar hi ja ko ru "
              "zh):\n\n" + genset.metrics_table(gen)) if gen else ""
    return ("## In-domain, out-of-domain and generations side by side (ROC-AUC)\n\n" + note
            + markdown_table(headers, rows) + groups)


def _card_validation(judges):
    """Validation sections: prompts, and cut completions when the judges were scored on them."""
    parts = ["## Validation (held-out items), prompts\n\nROC-AUC with a 95% bootstrap interval "
             "(1,000 resamples of items); the length-only baseline scores each text by its character "
             "length. Accuracy at 0.5 and Brier use per-language Platt calibration **cross-fitted** (fit "
             "on half the validation items, measured on the other half). Pooled AUC ranks the calibrated "
             "probabilities across languages.\n\n" + _per_language_table(judges, "prompt")]
    if "completion" in next(iter(judges.values()))["valid"]:
        parts.append("## Validation, cut completions (~20 tokens; few per language, see the pooled row)\n\n"
                     + _per_language_table(judges, "completion"))
    return parts


def _card_ood(judges):
    """The out-of-domain table (calibrated as the text's language) and one sentence per judge and set."""
    names = list(judges)
    rows = []
    for source in judges[names[0]]["ood"]:
        r0 = judges[names[0]]["ood"][source]
        rows.append([source, r0["n"], r0["positives"]] + [_ci(judges[n]["ood"][source], "auc") for n in names]
                    + [_ci(r0, "length_auc", "length")]
                    + [f"{judges[n]['ood'][source]['accuracy']:.3f} / {judges[n]['ood'][source]['brier']:.3f}"
                       for n in names])
    return ("## Out-of-domain sets, shipped judges\n\n"
            "`davidson-en`: Davidson et al. 2017 English tweets (hate speech or offensive = toxic; MIT). "
            "`id-abusive-id`: Ibrohim & Budi 2019 Indonesian tweets (HS or Abusive = toxic; CC BY-NC-SA 4.0). "
            "`extra-*`: toxicity-extra (MLMA tweets en/fr/ar, MIT; HateBR pt, CC BY-NC 4.0). Fixed random rows "
            "(seed 0) from the data root; calibration of the text's language; 1,000-resample intervals.\n\n"
            + markdown_table(["set", "n", "toxic"] + [f"{n} AUC [95% CI]" for n in names]
                             + ["length AUC [95% CI]"] + [f"{n} acc / Brier" for n in names], rows)
            + "\n" + _ood_reading(judges))


def _card_reliability(judges):
    """Reliability bins of every judge and text kind, with their expected calibration errors."""
    rel = [[name, kind, b["bin"], b["n"], b["predicted"], b["observed"]]
           for name, j in judges.items() for kind, r in j["reliability"].items() for b in r["bins"]]
    eces = "; ".join(f"{n} {k} {r['ece']:.3f}" for n, j in judges.items() for k, r in j["reliability"].items())
    return ("## Reliability (cross-fitted, validation)\n\nExpected calibration error: " + eces + ".\n\n"
            + markdown_table(["judge", "texts", "bin", "n", "mean predicted", "observed toxic"], rel))


def _card_speed_and_limits(judges, s):
    """The measured scoring speed and what the judges cannot do."""
    names = list(judges)
    speed = "; ".join(f"{n}: {judges[n]['speed']['texts_per_s']:.1f} texts/s" for n in names)
    return f"""## Speed

Scoring {judges[names[0]]['speed']['texts']} validation texts on the build machine (2 shared CPU cores),
model loading excluded: {speed}. The feature judge runs gemma-3-270m only up to its deepest chosen layer.

## Known limits

- **Domain shift**: trained on RTP-LX prompts (sentence beginnings); tweets, comments and model generations
  differ in style. The out-of-domain and generation rows above are the evidence; read them before a number.
- **Label threshold**: toxic = mean annotator score >= 3 of 5; texts near the threshold are ambiguous, which
  is why the protocol may drop a band below 3 from training (not from evaluation).
- **Languages**: calibrated for the 17 RTP-LX languages; any other (or unknown) language gets the pooled
  calibration, and the gemma features or n-grams may not transfer to it at all. Out-of-domain sets cover
  only en, id, fr, ar, pt.
- **What it does not measure**: Perspective's sub-attributes (threat, identity attack...), context
  (a toxic prompt continued neutrally), or severity; it is one probability per text.
- **Selection noise**: the protocol's OOD sets have {min(s['ood'].values())}-{max(s['ood'].values())} rows
  each; differences between designs under ~0.02 AUC are within their intervals.
- **Truncation**: the feature judge reads the first {s['max_tokens']} tokens.
"""


def render_card(metrics):
    """data/judge/README.md from metrics.json: every number in the card is measured by `build`."""
    s, judges = metrics["split"], metrics["judges"]
    parts = [_card_intro(s, judges), _card_split(s, judges, metrics["build_seconds"]), _card_protocol(judges, s),
             _card_side_by_side(metrics)]
    parts += _card_validation(judges)
    parts += [_card_ood(judges), _card_reliability(judges), _card_speed_and_limits(judges, s)]
    return "\n".join(parts)


# -----------------------------------------------------------------------------
# CLI


def run_build(args):
    build(Path(args.out), args.seed, args.only, args.cached_only)


def run_card(args):
    path = Path(args.path)
    write_text(path / "README.md", render_card(_read_json(path / "metrics.json")))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="rebuild the judges, metrics.json and the card",
                       description="Split, extract features (cached), choose designs by the out-of-domain protocol, "
                                   "train the chosen heads, calibrate, and write weights, metrics.json and README.md.")
    p.add_argument("--out", default=str(JUDGE_DIR), help="output folder (default data/judge)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, samples and bootstrap")
    p.add_argument("--only", choices=["ngram", "feature"], help="rebuild one judge, keep the other's metrics")
    p.add_argument("--cached-only", action="store_true",
                   help="feature judge: train only on the training prompts whose features are cached (no new "
                        "extraction of them; other texts are still extracted when missing)")
    p.set_defaults(run=run_build)
    p = sub.add_parser("card", help="rewrite README.md from metrics.json")
    p.add_argument("--path", default=str(JUDGE_DIR), help="judge folder (default data/judge)")
    p.set_defaults(run=run_card)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.exit(2, f"build_judge.py: error: {e}\n")


if __name__ == "__main__":
    exit_on_error(main)
