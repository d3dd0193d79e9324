"""
The mechanistic half of the paper: why English-only DPO detoxifies other languages.

    train        a linear toxicity probe w on the mean-pooled last-layer residual stream (no bias, BCE, Adam)
    judge        the same recipe with a bias, trained on labelled RTP-LX text in all 17 languages: a learned,
                 offline multilingual toxicity judge built on the frozen base model
    vectors      MLP value vectors (rows of every layer's down-projection) ranked by cosine with w; keep the
                 top-k, then those that actually fire (mean activation > 0) while the model writes English
    project      each kept vector times the unembedding: the tokens it promotes, and how many scripts they span
    activations  mean activation of the kept neurons per language, base model vs DPO model (paper Fig. 3)
    intervene    add an offset to the kept neurons at every position and measure toxicity per language (Fig. 2)

"Dual multilinguality" is the claim that these vectors both promote toxic tokens in many languages
(`project`) and are activated by prompts in many languages (`activations`), so pushing them down in English
pushes them down everywhere. Every subcommand writes DIR/<subcommand>.json and DIR/<subcommand>.md.

    python probe.py train --model gemma-3-270m --out runs/probe
    python probe.py vectors --model gemma-3-270m --probe runs/probe/probe.safetensors --out runs/probe
"""

import argparse
import csv
import json
import random
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import read_safetensors, write_safetensors
from data import DATA_DIR, LANGS, default_split, iter_jsonl, load_parallel, load_rtplx, require
from model import DTYPES, load_model, pooled_activations
from report import bar_chart_svg, line_chart_svg, markdown_table, write_json, write_text

PAPER_VECTORS = DATA_DIR / "official" / "mgpt_toxic_value_vectors.json"
PAPER_ACTIVATIONS = DATA_DIR / "official" / "mgpt_toxic_neuron_activations.json"
PAPER_PROBE = DATA_DIR / "official" / "english-probe-mgpt.pt"

# -----------------------------------------------------------------------------
# Features and the probe


def last_layer(model):
    return f"blocks.{model.config.n_layers - 1}.hook_resid_post"


def rms_normalize(x):
    """Scale each feature vector to unit RMS. A no-bias linear probe's decisions (sign of w.x) are unchanged
    by a positive rescaling of x, and it keeps Adam well-conditioned when residual norms are in the
    hundreds (Gemma), while leaving w in residual-stream coordinates, where it is compared to value vectors."""
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)


def text_features(model, tokenizer, texts, batch_size=16, max_len=128, device="cpu"):
    """[N, d] mean-pooled last-layer residual stream of each text (BOS left out), RMS-normalised."""
    name = last_layer(model)
    pooled = pooled_activations(model, tokenizer, texts, [name], batch_size, max_len, device, skip_bos=True,
                                progress="features")
    return rms_normalize(pooled[name])


def roc_auc(scores, labels):
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties counting
    half (the Mann-Whitney U statistic divided by n_pos * n_neg)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train_linear(feats, labels, bias=False, lr=1e-4, batch_size=10, epochs=20, seed=0):
    """Logistic regression by minibatch Adam on BCE (the paper's probe recipe). Returns (w [d], b scalar)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(feats.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=bias)
    opt = torch.optim.Adam([w, b] if bias else [w], lr=lr)
    y = labels.float()
    for _ in range(epochs):
        perm = torch.randperm(len(feats), generator=g)
        for start in range(0, len(feats), batch_size):
            idx = perm[start:start + batch_size]
            loss = F.binary_cross_entropy_with_logits(feats[idx] @ w + b, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


def split_indices(n, valid_frac, seed):
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_valid = max(1, int(round(n * valid_frac)))
    return idx[n_valid:], idx[:n_valid]


def classification_report(scores, labels):
    scores, labels = np.asarray(scores), np.asarray(labels)
    return {"n": int(len(labels)), "accuracy": float(((scores >= 0.5) == labels.astype(bool)).mean()),
            "roc_auc": roc_auc(scores, labels)}


def save_probe(path, w, b, model, layer_name, meta):
    write_safetensors(path, {"weight": w.float().contiguous(), "bias": b.float().reshape(1)},
                      metadata={"hook": layer_name, "model": str(model.name_or_path), **meta})


def load_probe(path, d_model):
    """(w [d], b) from our safetensors probe, or the paper's released mGPT probe (a pickled nn.Linear in a
    torch zip). We never unpickle that file: its weight is the raw float32 storage inside the zip."""
    path = Path(path)
    if path.suffix == ".pt":
        with zipfile.ZipFile(path) as z:
            data = [n for n in z.namelist() if n.endswith("/data/0")]
            if not data:
                raise ValueError(f"{path}: no tensor storage found (expected a torch zip with <name>/data/0)")
            w, b = torch.from_numpy(np.frombuffer(z.read(data[0]), dtype="<f4").copy()), torch.zeros(())
    else:
        tensors = read_safetensors(path)
        if "weight" not in tensors:
            raise ValueError(f"{path}: probe file has no 'weight' tensor")
        w, b = tensors["weight"].flatten(), tensors.get("bias", torch.zeros(1)).reshape(())
    if w.numel() != d_model:
        raise ValueError(f"{path}: probe has {w.numel()} weights but the model's d_model is {d_model}; "
                         "a probe only applies to the model (size) it was trained on")
    return w, b


def load_labelled(path):
    """[(text, label)] from jsonl {text, label} or a Jigsaw CSV {comment_text, toxic}."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"comment_text", "toxic"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}:1: missing column(s) {', '.join(sorted(missing))}")
            return [(r["comment_text"], int(float(r["toxic"]) >= 0.5)) for r in reader]
    rows = []
    for line, row in iter_jsonl(path):
        if row.get("label") not in (0, 1, True, False):
            raise ValueError(f"{path}:{line}: field 'label' must be 0 or 1, got {row.get('label')!r}")
        rows.append((require(row, "text", path, line), int(row["label"])))
    return rows


def pair_texts(pairs):
    """The toxic (rejected) and non-toxic (chosen) sides of DPO pairs as labelled text: the default probe data."""
    return [(p["rejected"], 1) for p in pairs] + [(p["chosen"], 0) for p in pairs]


class ProbeScorer:
    """Toxicity in [0, 1] = sigmoid(w . features(text) + b), with a judge or probe file from this script on
    the frozen base model it was trained on (named in the file). Registered in evaluate.py as "probe"."""

    name = "probe"

    def __init__(self, path, model_name=None, device="cpu", batch_size=16, max_len=128):
        from checkpoint import read_safetensors_metadata

        meta = read_safetensors_metadata(path)
        model_name = model_name or meta.get("model")
        if not model_name:
            raise ValueError(f"{path}: probe file names no model; pass the base model explicitly")
        self.model, self.tokenizer = load_model(model_name, device=device)
        self.w, self.b = load_probe(path, self.model.config.d_model)
        if meta.get("hook", last_layer(self.model)) != last_layer(self.model):
            raise ValueError(f"{path}: probe reads {meta['hook']}, but features come from {last_layer(self.model)}")
        self.device, self.batch_size, self.max_len = device, batch_size, max_len
        self.fingerprint = f"probe:{Path(path).name}:{float(self.w.norm()):.6g}:{float(self.b):.6g}"

    def score(self, texts, langs):
        feats = text_features(self.model, self.tokenizer, list(texts), self.batch_size, self.max_len, self.device)
        return torch.sigmoid(feats @ self.w + self.b).tolist()


# -----------------------------------------------------------------------------
# Activations of chosen neurons while the model writes


def neuron_hooks(neurons, fn):
    """[(hook_name, hook_fn)] for a list of (layer, neuron); fn(layer, idx_tensor, activation) is called
    with the layer's MLP activation [B, T, d_mlp] and the neuron indices of that layer."""
    by_layer = {}
    for layer, neuron in neurons:
        by_layer.setdefault(layer, []).append(neuron)
    hooks = []
    for layer, idx in sorted(by_layer.items()):
        idx_t = torch.tensor(idx)
        hooks.append((f"blocks.{layer}.mlp.hook_post",
                      lambda t, hook, layer=layer, idx_t=idx_t: fn(layer, idx_t.to(t.device), t)))
    return hooks


@torch.no_grad()
def generation_activations(model, tokenizer, prompts, neurons, max_new_tokens=20, batch_size=8, device="cpu"):
    """Mean activation of each (layer, neuron) over the positions that produce the next `max_new_tokens`
    greedy tokens, averaged per prompt and then over prompts. Returns a tensor [len(neurons)].
    Greedy decoding first, then one forward over prompt + continuation with hooks: the same numbers as
    recording during decoding, in one batched pass."""
    from generate import generate

    order = {n: i for i, n in enumerate(neurons)}
    total = torch.zeros(len(neurons))
    for start in range(0, len(prompts), batch_size):
        ids, mask = tokenizer.pad(tokenizer.encode_batch(prompts[start:start + batch_size]), side="left")
        ids, mask = ids.to(device), mask.to(device)
        new = generate(model, ids, mask, max_new_tokens, greedy=True, eos_id=tokenizer.eos_id)
        is_eos = new == tokenizer.eos_id
        valid = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
        full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, valid.long()], 1)
        P = ids.shape[1]
        # Position P-1+j predicts new token j: those are the positions "over the next tokens".
        weights = valid.float() / valid.float().sum(-1, keepdim=True).clamp(min=1)  # [B, M]
        sums = torch.zeros(ids.shape[0], len(neurons))

        def record(layer, idx, t):
            acts = t[:, P - 1:P - 1 + new.shape[1], idx].float()  # [B, M, k]
            per_prompt = (acts * weights[..., None]).sum(1).cpu()  # [B, k]
            for col, neuron in enumerate(idx.tolist()):
                sums[:, order[(layer, neuron)]] = per_prompt[:, col]

        with model.hooks(neuron_hooks(neurons, record)):
            model(full_ids, full_mask)
        total += sums.sum(0)
    return total / len(prompts)


# -----------------------------------------------------------------------------
# Subcommands


def cmd_train(args, model, tok):
    if args.data:
        rows = load_labelled(args.data)
        source = args.data
    else:
        rows = pair_texts(default_split(seed=args.seed)["train"])
        source = "English RTP-LX DPO pairs (toxic = rejected, non-toxic = chosen)"
    random.Random(args.seed).shuffle(rows)
    rows = rows[:args.limit] if args.limit else rows
    texts, labels = [r[0] for r in rows], torch.tensor([r[1] for r in rows])
    feats = text_features(model, tok, texts, args.batch_size, args.max_len, args.device)
    tr, va = split_indices(len(rows), args.valid_frac, args.seed)
    w, b = train_linear(feats[tr], labels[tr], bias=False, lr=args.lr, batch_size=10, epochs=args.epochs,
                        seed=args.seed)
    valid = classification_report(torch.sigmoid(feats[va] @ w + b).numpy(), labels[va].numpy())
    train = classification_report(torch.sigmoid(feats[tr] @ w + b).numpy(), labels[tr].numpy())
    save_probe(Path(args.out) / "probe.safetensors", w, b, model, last_layer(model), {"kind": "probe"})
    result = {"model": args.model, "data": source, "hook": last_layer(model), "train": train, "valid": valid}
    rows_md = [[split, r["n"], f"{r['accuracy']:.3f}", f"{r['roc_auc']:.3f}"]
               for split, r in (("train", train), ("valid", valid))]
    return result, "## Toxicity probe\n\n" + markdown_table(["split", "n", "accuracy", "ROC-AUC"], rows_md)


def judge_data(seed, per_lang, heldout):
    """Labelled multilingual text from RTP-LX: benign (0) and toxic (1) human completions, and prompts by
    their human toxicity score (>= 3 of 5 is toxic; the only labels Russian has). Rows held out for
    evaluation (heldout[lang] = set of RTP-LX indices) are excluded: the judge never trains on the prompts
    whose continuations it will judge."""
    rows = []
    for lang in LANGS:
        lang_rows = []
        for r in load_rtplx(lang):
            if r["index"] in heldout[lang]:
                continue
            if r.get("benign_completion"):
                lang_rows.append((r["benign_completion"], 0, lang))
            if r.get("toxic_completion"):
                lang_rows.append((r["toxic_completion"], 1, lang))
            if r.get("prompt") and r.get("prompt_toxicity") is not None:
                lang_rows.append((r["prompt"], int(r["prompt_toxicity"] >= 3), lang))
        random.Random(seed).shuffle(lang_rows)
        rows += lang_rows[:per_lang] if per_lang else lang_rows
    return rows


def cmd_judge(args, model, tok):
    split = default_split(seed=args.seed)
    heldout = {lang: {p["index"] for p in split["eval_prompts"][lang]} for lang in LANGS}
    rows = judge_data(args.seed, args.limit, heldout)
    texts, labels = [r[0] for r in rows], torch.tensor([r[1] for r in rows])
    langs = [r[2] for r in rows]
    feats = text_features(model, tok, texts, args.batch_size, args.max_len, args.device)
    tr, va = split_indices(len(rows), args.valid_frac, args.seed)
    w, b = train_linear(feats[tr], labels[tr], bias=True, lr=args.lr, batch_size=10, epochs=args.epochs,
                        seed=args.seed)
    probs = torch.sigmoid(feats @ w + b).numpy()
    per_lang = {}
    for lang in LANGS:
        sel = [i for i in va if langs[i] == lang]
        if sel:
            per_lang[lang] = classification_report(probs[sel], labels[sel].numpy())
    overall = classification_report(probs[va], labels[va].numpy())
    save_probe(Path(args.out) / "judge.safetensors", w, b, model, last_layer(model), {"kind": "judge"})
    result = {"model": args.model, "n_train": len(tr), "n_valid": len(va), "valid": overall,
              "valid_per_language": per_lang}
    md_rows = [[lang, r["n"], f"{r['accuracy']:.3f}", f"{r['roc_auc']:.3f}"] for lang, r in per_lang.items()]
    md_rows.append(["all", overall["n"], f"{overall['accuracy']:.3f}", f"{overall['roc_auc']:.3f}"])
    return result, ("## Learned multilingual toxicity judge (held-out RTP-LX text)\n\n"
                    + markdown_table(["language", "n", "accuracy", "ROC-AUC"], md_rows))


def rank_value_vectors(model, w, top_k):
    """[(layer, neuron, cosine)] of the top_k value vectors across all layers by cosine with w."""
    w = F.normalize(w.float(), dim=0)
    cos = torch.stack([F.normalize(model.value_vectors(l).detach().float(), dim=1) @ w
                       for l in range(model.config.n_layers)])  # [L, d_mlp]
    top = cos.flatten().topk(top_k)
    d_mlp = cos.shape[1]
    return [(i // d_mlp, i % d_mlp, v) for i, v in zip(top.indices.tolist(), top.values.tolist())]


def english_prompts(limit):
    return load_parallel("en")[:limit]


def is_mgpt(model):
    c = model.config
    return c.family == "gpt2" and c.n_layers == 24 and c.d_model == 2048


def cmd_vectors(args, model, tok):
    w, _ = load_probe(args.probe, model.config.d_model)
    ranked = rank_value_vectors(model, w, args.top_k)
    prompts = english_prompts(args.limit)
    acts = generation_activations(model, tok, prompts, [(l, n) for l, n, _ in ranked], args.max_new_tokens,
                                  args.batch_size, args.device)
    vectors = [{"layer": l, "neuron": n, "cosine": c, "activation": float(a)}
               for (l, n, c), a in zip(ranked, acts)]
    kept = [v for v in vectors if v["activation"] > 0]
    result = {"model": args.model, "probe": args.probe, "top_k": args.top_k, "n_prompts": len(prompts),
              "n_kept": len(kept), "kept": kept, "ranked": vectors}
    md = (f"## Toxic value vectors\n\n{len(kept)} of the top {args.top_k} value vectors by cosine with the probe "
          f"have a positive mean activation over {args.max_new_tokens} greedy tokens on {len(prompts)} English "
          f"prompts.\n\n" + markdown_table(["layer", "neuron", "cosine", "activation"],
                                           [[v["layer"], v["neuron"], f"{v['cosine']:.3f}",
                                             f"{v['activation']:.4f}"] for v in kept]))
    if is_mgpt(model):
        paper = {tuple(x) for x in json.loads(PAPER_VECTORS.read_text())}
        overlap = paper & {(v["layer"], v["neuron"]) for v in kept}
        result["paper_overlap"] = len(overlap)
        md += f"\n\nOverlap with the paper's {len(paper)} mGPT vectors: {len(overlap)}.\n"
    return result, md


def load_kept(path):
    path = Path(path)
    try:
        kept = json.loads(path.read_text())["kept"]
        return [(v["layer"], v["neuron"]) for v in kept]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a `probe.py vectors` output ({e})") from None


def token_script(text):
    """The Unicode script of a token's first letter (LATIN, CYRILLIC, CJK, ...), or None for no letters."""
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            return "CJK" if name.startswith("CJK") else name.split(" ")[0]
    return None


def cmd_project(args, model, tok):
    neurons = load_kept(args.vectors)
    rows, out = [], []
    for layer, neuron in neurons:
        v = model.value_vectors(layer)[neuron].detach()
        logits = model.unembed(v.to(next(model.parameters()).dtype))
        top = logits.float().topk(args.top_tokens).indices.tolist()
        tokens = [tok.decode([t], skip_special=False) for t in top]
        scripts = sorted({s for s in map(token_script, tokens) if s})
        out.append({"layer": layer, "neuron": neuron, "top_tokens": tokens, "scripts": scripts,
                    "n_scripts": len(scripts)})
        rows.append([layer, neuron, len(scripts), ", ".join(scripts),
                     " ".join(repr(t)[1:-1] for t in tokens[:12]).replace("|", "\\|")])
    multi = sum(1 for o in out if o["n_scripts"] >= 2)
    md = (f"## Vocabulary projection of the kept value vectors\n\n{multi} of {len(out)} vectors promote tokens in "
          f"two or more scripts among their top {args.top_tokens}.\n\n"
          + markdown_table(["layer", "neuron", "#scripts", "scripts", "top tokens"], rows))
    return {"model": args.model, "vectors": out, "n_multiscript": multi}, md


def language_activations(model, tok, neurons, langs, limit, max_new_tokens, batch_size, device):
    """{lang: mean activation over the kept neurons} on the parallel prompts of each language."""
    return {lang: float(generation_activations(model, tok, load_parallel(lang)[:limit], neurons, max_new_tokens,
                                               batch_size, device).mean())
            for lang in tqdm(langs, desc="activations")}


def cmd_activations(args, model, tok):
    neurons = load_kept(args.vectors)
    base = language_activations(model, tok, neurons, args.langs, args.limit, args.max_new_tokens,
                                args.batch_size, args.device)
    del model
    tuned, _ = load_model(args.dpo_model, device=args.device, dtype=DTYPES[args.dtype])
    after = language_activations(tuned, tok, neurons, args.langs, args.limit, args.max_new_tokens,
                                 args.batch_size, args.device)
    result = {"model": args.model, "dpo_model": args.dpo_model, "n_neurons": len(neurons),
              "pre_dpo": base, "post_dpo": after}
    rows = [[lang, f"{base[lang]:.4f}", f"{after[lang]:.4f}", f"{after[lang] - base[lang]:+.4f}"]
            for lang in args.langs]
    dropped = sum(after[lang] < base[lang] for lang in args.langs)
    md = (f"## Mean activation of {len(neurons)} toxic neurons, before and after DPO\n\nLower after DPO in "
          f"{dropped} of {len(args.langs)} languages.\n\n"
          + markdown_table(["language", "before", "after", "change"], rows))
    svg = bar_chart_svg(args.langs, {"before DPO": [base[l] for l in args.langs],
                                     "after DPO": [after[l] for l in args.langs]},
                        title="Toxic neuron activation per language", ylabel="mean activation")
    write_text(Path(args.out) / "activations.svg", svg)
    return result, md


def cmd_intervene(args, model, tok):
    from evaluate import make_scorer
    from generate import generate_text

    neurons = load_kept(args.vectors)
    scorer = make_scorer(args.scorer, judge=args.judge, device=args.device)
    offsets = [float(x) for x in args.offsets.split(",")]
    table = {}
    for offset in tqdm(offsets, desc="offsets"):
        def shift(layer, idx, t, offset=offset):
            t = t.clone()
            t[..., idx] += offset
            return t

        table[offset] = {}
        with model.hooks(neuron_hooks(neurons, shift)):
            for lang in args.langs:
                prompts = load_parallel(lang)[:args.limit]
                texts = generate_text(model, tok, prompts, n=args.n, max_new_tokens=args.max_new_tokens,
                                      seed=args.seed, batch_size=args.batch_size, device=args.device)
                table[offset][lang] = float(np.mean(scorer.score(texts, [lang] * len(texts))))
    rows = [[f"{o:+g}"] + [f"{table[o][l]:.3f}" for l in args.langs] +
            [f"{np.mean(list(table[o].values())):.3f}"] for o in offsets]
    md = (f"## Mean toxicity ({args.scorer}) after shifting {len(neurons)} toxic neurons by a constant\n\n"
          + markdown_table(["offset"] + list(args.langs) + ["mean"], rows))
    svg = line_chart_svg(offsets, {l: [table[o][l] for o in offsets] for l in args.langs},
                         title="Toxicity vs. offset on toxic neurons", xlabel="offset", ylabel="mean toxicity")
    write_text(Path(args.out) / "intervene.svg", svg)
    return {"model": args.model, "scorer": args.scorer, "offsets": offsets,
            "toxicity": {str(o): v for o, v in table.items()}}, md


COMMANDS = {"train": cmd_train, "judge": cmd_judge, "vectors": cmd_vectors, "project": cmd_project,
            "activations": cmd_activations, "intervene": cmd_intervene}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=sorted(COMMANDS), help="which step of the analysis to run")
    p.add_argument("--model", default="gemma-3-270m", help="base model: local HF dir, .gguf, hub id or embedded name")
    p.add_argument("--out", required=True, help="output directory (DIR/<command>.json and .md)")
    p.add_argument("--data", help="train: labelled jsonl {text,label} or Jigsaw CSV {comment_text,toxic}; "
                   "default: the two sides of the English DPO pairs")
    p.add_argument("--probe", help="vectors: probe file from `train` (probe.safetensors) or the paper's "
                   "english-probe-mgpt.pt")
    p.add_argument("--vectors", help="project/activations/intervene: vectors.json from `vectors`")
    p.add_argument("--dpo-model", help="activations: the DPO-trained checkpoint to compare with --model")
    p.add_argument("--judge", help="intervene with --scorer probe: judge.safetensors from `judge`")
    p.add_argument("--scorer", default="lexicon", help="intervene: toxicity scorer (lexicon, probe, perspective)")
    p.add_argument("--top-k", type=int, default=100, help="vectors: how many value vectors to rank (paper: 100)")
    p.add_argument("--top-tokens", type=int, default=30, help="project: tokens shown per vector (paper: 30)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="greedy tokens over which activations are "
                   "averaged (paper: 20)")
    p.add_argument("--offsets", default="0,-1,-2,-3,-4,-5,5", help="intervene: comma-separated offsets added "
                   "to the neurons' activations (paper: 0 to -5, and +5)")
    p.add_argument("--n", type=int, default=5, help="intervene: samples per prompt")
    p.add_argument("--langs", nargs="+", default=list(LANGS), help="languages for activations/intervene")
    p.add_argument("--limit", type=int, default=None, help="at most this many texts (train/judge: per "
                   "language for judge) or prompts per language")
    p.add_argument("--epochs", type=int, default=20, help="probe epochs (paper: 20)")
    p.add_argument("--lr", type=float, default=1e-4, help="probe Adam learning rate (paper: 1e-4; batch 10)")
    p.add_argument("--valid-frac", type=float, default=0.1, help="held-out fraction (paper: 10%%)")
    p.add_argument("--max-len", type=int, default=128, help="tokens per text when extracting features")
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    needs = {"vectors": "probe", "project": "vectors", "activations": "vectors", "intervene": "vectors"}
    if args.command in needs and not getattr(args, needs[args.command]):
        raise SystemExit(f"probe.py {args.command}: --{needs[args.command]} is required")
    if args.command == "activations" and not args.dpo_model:
        raise SystemExit("probe.py activations: --dpo-model is required (the checkpoint to compare with --model)")
    for lang in args.langs:
        if lang not in LANGS:
            raise SystemExit(f"probe.py: unknown language {lang!r}; choose from {' '.join(LANGS)}")
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result, md = COMMANDS[args.command](args, model, tok)
    write_json(out / f"{args.command}.json", result)
    write_text(out / f"{args.command}.md", md + "\n")
    print(md)


if __name__ == "__main__":
    main()
