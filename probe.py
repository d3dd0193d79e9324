"""
The mechanistic half of the paper: why English-only DPO detoxifies other languages.

    train        a linear toxicity probe w on the mean-pooled last-layer residual stream (no bias, BCE, Adam),
                 on human-labelled English RTP-LX prompts (toxic = annotator score >= 3) outside the held-out
                 evaluation items; reports how well text length alone separates the same data. Also trains
                 probes on shuffled labels: the directions `vectors` selects its random baseline with
    vectors      MLP value vectors (rows of every layer's down-projection) ranked by cosine with w; keep the
                 top-k, then those that actually fire (mean activation > 0) while the model writes English
                 continuations of English training-split prompts (never the prompts `activations` measures on).
                 The same selection (top-k, firing filter) runs from each shuffled-label probe (or random
                 direction): the random value-vector sets `project` compares with. Every neuron's activation
                 level on these prompts is saved (neuron_levels.safetensors) to match random neurons on
    project      each kept vector times the unembedding: the tokens it promotes, how many scripts they span and
                 how many are toxic, against the value vectors the random directions selected (rank test over sets)
    activations  mean activation of the kept neurons per language, base model vs DPO model (paper Fig. 3), on
                 held-out prompts, against random neuron sets matched on layer, count and activation level
    intervene    add an offset to the kept neurons at every position and measure toxicity per language (Fig. 2),
                 against the same offset on matched random neuron sets; the texts are checked for degenerate,
                 repetitive and off-language output and their perplexity under the unshifted model, and an
                 offset that breaks the model is reported invalid. The texts are saved beside their scores

"Dual multilinguality" is the claim that these vectors both promote toxic tokens in many languages
(`project`) and are activated by prompts in many languages (`activations`), so pushing them down in English
pushes them down everywhere. Every subcommand writes DIR/<subcommand>.json and DIR/<subcommand>.md.

    python probe.py train --out runs/probe
    python probe.py vectors --probe runs/probe/probe.safetensors --out runs/probe
"""

import argparse
import csv
import functools
import json
import random
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import judge
from checkpoint import DEFAULT_MODEL, read_safetensors, write_safetensors
from data import (LANGS, add_root_flag, apply_root_flag, iter_jsonl, load_parallel, load_rtplx, normalize_prompt,
                  require)
from data import path as data_path
from design import default_split
from evaluate import continuation_logps, degenerate_reason, in_language
from generate import generate, generate_text, load_jobs
from loading import add_device_args, load_model, resolve_dtype
from model import pooled_activations, rms_normalize
from report import (bar_chart_svg, check_outputs, exit_on_error, flag, line_chart_svg, markdown_table,
                    write_json, write_text)
from scorers import SCORERS, TOXIC_THRESHOLD, LexiconScorer, make_scorer
from stats import bootstrap_ci, format_p, paired_bootstrap, permutation_test, roc_auc, wilson_interval

# The paper's released mGPT assets, under the data root (looked up when used, so --data-root counts)
PAPER_VECTORS = ("official-assets", "mgpt_toxic_value_vectors.json")
PAPER_PROBE = ("official-assets", "english-probe-mgpt.pt")

# -----------------------------------------------------------------------------
# Features and the probe


def last_layer(model):
    return f"blocks.{model.config.n_layers - 1}.hook_resid_post"


def text_features(model, tokenizer, texts, batch_size=16, max_len=128, device="cpu"):
    """[N, d] mean-pooled last-layer residual stream of each text (BOS left out), RMS-normalised."""
    name = last_layer(model)
    pooled = pooled_activations(model, tokenizer, texts, [name], batch_size, max_len, device, skip_bos=True,
                                progress="features")
    return rms_normalize(pooled["mean"][name])


def train_linear(feats, labels, bias=False, lr=1e-4, batch_size=10, epochs=20, seed=0):
    """Logistic regression by minibatch Adam on BCE (the paper's probe recipe). Returns (w [d], b scalar).
    labels [k, N] trains k probes side by side (w [k, d], b [k]): Adam is elementwise and each probe's loss
    reaches only its own row, so that is k separate trainings sharing one minibatch order, for the cost of one."""
    g = torch.Generator().manual_seed(seed)
    stacked = labels.dim() == 2
    y = labels.float() if stacked else labels.float()[None]  # [k, N]
    w = torch.zeros(len(y), feats.shape[1], requires_grad=True)
    b = torch.zeros(len(y), requires_grad=bias)
    opt = torch.optim.Adam([w, b] if bias else [w], lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(feats), generator=g)
        for start in range(0, len(feats), batch_size):
            idx = perm[start:start + batch_size]
            logits = feats[idx] @ w.T + b  # [B, k]
            loss = F.binary_cross_entropy_with_logits(logits, y[:, idx].T, reduction="none").mean(0).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    w, b = w.detach(), b.detach()
    return (w, b) if stacked else (w[0], b[0])


def split_indices(n, valid_frac, seed):
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_valid = max(1, int(round(n * valid_frac)))
    return idx[n_valid:], idx[:n_valid]


def classification_report(scores, labels):
    scores, labels = np.asarray(scores), np.asarray(labels)
    return {"n": int(len(labels)), "accuracy": float(((scores >= 0.5) == labels.astype(bool)).mean()),
            "roc_auc": roc_auc(scores, labels)}


def save_probe(path, w, b, model, layer_name, meta, shuffled=None):
    """shuffled: [n, d] directions of probes trained on shuffled labels, the baseline `vectors` selects with."""
    tensors = {"weight": w.float().contiguous(), "bias": b.float().reshape(1)}
    if shuffled is not None and len(shuffled):
        tensors["shuffled_weight"] = shuffled.float().contiguous()
    write_safetensors(path, tensors, metadata={"hook": layer_name, "model": str(model.name_or_path), **meta})


def shuffled_label_probes(feats, labels, n, lr, epochs, seed):
    """[n, d]: probes trained exactly like the real one on randomly permuted labels. They fit what these features
    offer without toxicity (the base rate, the residual stream's dominant directions), so value vectors they
    select show what the selection alone produces."""
    if not n:
        return torch.zeros(0, feats.shape[1])
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([labels[torch.randperm(len(labels), generator=g)] for _ in range(n)])  # [n, N]
    return train_linear(feats, shuffled, lr=lr, epochs=epochs, seed=seed + 1)[0]


def baseline_directions(path, d_model, n, seed):
    """([n, d] directions, source): the probe file's shuffled-label probes, or n random Gaussian directions when it
    has none (the paper's released probe)."""
    if Path(path).suffix != ".pt":
        shuffled = read_safetensors(path).get("shuffled_weight")
        if shuffled is not None:
            if len(shuffled) < n:
                raise ValueError(f"{path}: {len(shuffled)} shuffled-label probes, --random-sets asks for {n}; "
                                 "retrain with `probe.py train --shuffled-probes N` or lower --random-sets")
            return shuffled[:n], "probes trained on shuffled labels"
    return torch.randn(n, d_model, generator=torch.Generator().manual_seed(seed)), "random Gaussian directions"


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


@functools.lru_cache(maxsize=None)
def split_info(seed):
    """default_split(seed)["info"] (its train/valid/held-out English RTP-LX indices), computed once: the split
    reads every language's RTP-LX and takes seconds. Callers must not mutate it."""
    return default_split(seed=seed)["info"]


def rtplx_probe_data(seed):
    """[(prompt, label)]: English RTP-LX prompts labelled by their human annotators (toxic = mean score >= 3 of
    5), only those of the DPO train/valid indices, so the held-out evaluation items stay unseen. Human labels on
    prompts, not benign vs toxic completions: those completions differ in length so much that length alone
    separates them (ROC-AUC 1.0), and a probe trained on them need not find toxicity."""
    info = split_info(seed)
    allowed = set(info["train_indices"]) | set(info["valid_indices"])
    return [(r["prompt"], int(r["prompt_toxicity"] >= 3)) for r in load_rtplx("en")
            if r["index"] in allowed and r["prompt"] and r["prompt_toxicity"] is not None]


def selection_prompts(seed, limit):
    """(RTP-LX indices, prompts): English prompts of the DPO training split, shuffled by seed, on which
    `vectors` keeps the neurons that fire. Disjoint from the held-out items `activations` measures on."""
    train = set(split_info(seed)["train_indices"])
    rows = [r for r in load_rtplx("en") if r["index"] in train and r["prompt"]]
    random.Random(seed).shuffle(rows)
    rows = rows[:limit]
    return [r["index"] for r in rows], [r["prompt"] for r in rows]


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
    greedy tokens, per prompt. Returns a tensor [len(prompts), len(neurons)]; every neuron of one call is
    recorded in the same forward, so extra (baseline) neurons cost no extra generation.
    Greedy decoding first, then one forward over prompt + continuation with hooks: the same numbers as
    recording during decoding, in one batched pass. A neuron may be listed more than once (random sets overlap)."""
    # neuron_hooks hands each layer its neurons in list order: these are their columns in the result.
    columns = {layer: torch.tensor([i for i, (l, _) in enumerate(neurons) if l == layer]) for layer, _ in neurons}
    per_prompt_rows = []
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
            sums[:, columns[layer]] = (acts * weights[..., None]).sum(1).cpu()  # [B, k]

        with model.hooks(neuron_hooks(neurons, record)):
            model(full_ids, full_mask)
        per_prompt_rows.append(sums)
    return torch.cat(per_prompt_rows) if per_prompt_rows else torch.zeros(0, len(neurons))


# -----------------------------------------------------------------------------
# Random baselines: is a property of the kept neurons more than chance for like neurons (same layers, count and
# activation level; or value vectors that went through the same selection)?


MATCH_POOL = 10  # a random stand-in comes from the kept neuron's 10 nearest neurons of its layer in activation level


def neuron_levels(model, tokenizer, prompts, max_new_tokens, batch_size, device):
    """[n_layers, d_mlp]: every MLP neuron's mean activation over the greedy continuations of `prompts` (the
    selection prompts): the firing filter of `vectors` and the level random neurons are matched on."""
    L, d_mlp = model.config.n_layers, model.config.d_mlp
    every = [(layer, n) for layer in range(L) for n in range(d_mlp)]
    acts = generation_activations(model, tokenizer, prompts, every, max_new_tokens, batch_size, device)
    return acts.mean(0).reshape(L, d_mlp)


def matched_random_neurons(kept, levels, n_sets, seed, pool=MATCH_POOL):
    """n_sets lists of (layer, neuron); neuron j of every set stands in for kept[j]: it is drawn uniformly from the
    `pool` neurons of kept[j]'s layer nearest to it in activation level (levels [n_layers, d_mlp], the base
    model's mean activation on the selection prompts), outside the kept set and not already in this set. So each
    set has the kept set's size, layers and activation-level distribution ("more lowered" cannot just mean
    "more active"). Sets are drawn independently (a neuron may recur across sets); the same seed, the same sets."""
    levels = np.asarray(levels, dtype=np.float64)
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(n_sets):
        used, chosen = set(kept), [None] * len(kept)
        for j in rng.permutation(len(kept)):
            layer, neuron = kept[j]
            distance = np.abs(levels[layer] - levels[layer, neuron])
            distance[[n for l, n in used if l == layer]] = np.inf
            nearest = np.argsort(distance, kind="stable")[:pool]
            nearest = nearest[np.isfinite(distance[nearest])]
            if not len(nearest):
                raise ValueError(f"layer {layer}: no neuron left outside the kept set to match kept neuron {neuron}")
            chosen[j] = (layer, int(rng.choice(nearest)))
            used.add(chosen[j])
        sets.append(chosen)
    return sets


def match_report(kept, sets, levels):
    """How well the random sets match the kept one on activation level (selection prompts): the kept set's mean
    level, the mean and range of the sets' mean levels, and the pool size of the draw."""
    levels = np.asarray(levels, dtype=np.float64)

    def mean_level(neurons):
        return float(np.mean([levels[l, n] for l, n in neurons]))

    set_levels = [mean_level(s) for s in sets]
    return {"kept_level": mean_level(kept), "random_level": float(np.mean(set_levels)),
            "random_level_range": [min(set_levels), max(set_levels)], "pool": MATCH_POOL, "n_sets": len(sets)}


def rank_p(kept_value, set_values, direction):
    """One-sided rank p-value: the share of random sets, the kept set counted once among them, whose value goes at
    least as far in `direction` (+1: higher, -1: lower) as the kept set's. Its floor is 1 / (1 + n_sets)."""
    set_values = np.asarray(set_values, dtype=np.float64)
    return float((1 + np.sum(direction * set_values >= direction * kept_value)) / (1 + len(set_values)))


def p_floor(n_sets):
    """The smallest p-value the rank test can give with n_sets random sets."""
    return 1 / (1 + n_sets)


def compare_to_random(kept, rand, n_boot=1000, seed=0, proportion=False):
    """{kept_mean, kept_ci, random_mean, random_ci, diff, p, n_kept, n_random}: each group's mean with a 95%
    interval (bootstrap of the mean; Wilson for a 0/1 proportion) and the permutation p-value of the
    difference (kept - random)."""
    kept, rand = np.asarray(kept, dtype=np.float64), np.asarray(rand, dtype=np.float64)

    def interval(x):
        return wilson_interval(int(x.sum()), len(x)) if proportion else bootstrap_ci(x, n_boot, seed)

    return {"kept_mean": float(kept.mean()), "kept_ci": interval(kept), "random_mean": float(rand.mean()),
            "random_ci": interval(rand), "diff": float(kept.mean() - rand.mean()),
            "p": permutation_test(kept, rand, seed=seed), "n_kept": len(kept), "n_random": len(rand)}


# A decoded token has no language; a judge is told the one its script suggests (Latin and unknown -> en).
SCRIPT_LANG = {"ARABIC": "ar", "DEVANAGARI": "hi", "HIRAGANA": "ja", "KATAKANA": "ja", "HANGUL": "ko",
               "CYRILLIC": "ru", "CJK": "zh"}


def lexicon_toxic_tokens(lexicon, tokens):
    """{token: bool}: the token hits the word list of any of the languages (a token carries no language)."""
    return {t: any(lexicon.hits(t, lang) for lang in lexicon.lexicons) for t in set(tokens)}


def judge_toxic_tokens(token_judge, tokens):
    """{token: bool}: the judge scores the token >= 0.5, told the language of its script."""
    unique = sorted(set(tokens))
    scores = token_judge.score(unique, [SCRIPT_LANG.get(token_script(t), "en") for t in unique])
    return {t: float(x) >= TOXIC_THRESHOLD for t, x in zip(unique, scores)}


def load_token_judge(kind, path, device):
    """(judge or None, note): judge.py's shipped judge of this kind, or none with --judge-kind none."""
    if kind == "none":
        return None, "judge metric off (--judge-kind none)"
    return judge.load(kind=kind, path=path, device=device), f"judge: {kind}"


@torch.no_grad()
def top_token_ids(model, neurons, k, batch_size=64):
    """[len(neurons), k]: ids of the k tokens each value vector promotes most (vector times the unembedding)."""
    dtype = next(model.parameters()).dtype
    vectors = torch.stack([model.value_vectors(layer)[neuron].detach() for layer, neuron in neurons])
    return torch.cat([model.unembed(vectors[i:i + batch_size].to(dtype)).float().topk(k).indices.cpu()
                      for i in range(0, len(vectors), batch_size)])


def activation_stats(before, after, n_kept, n_sets, n_boot=1000, seed=0):
    """Statistics of one language from per-prompt activations [N prompts, n_kept * (1 + n_sets)] (columns: the
    kept neurons, then each random set of the same size in turn) before and after DPO. A set's activation on a
    prompt is its neurons' mean; intervals and p-values resample prompts (the same prompts before and after)."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    n = len(before)
    kept_before, kept_after = before[:, :n_kept].mean(1), after[:, :n_kept].mean(1)
    rand_before = before[:, n_kept:].reshape(n, n_sets, n_kept).mean(2)  # [N, n_sets]
    rand_after = after[:, n_kept:].reshape(n, n_sets, n_kept).mean(2)
    change = paired_bootstrap(kept_before, kept_after, n_boot, seed)
    set_changes = (rand_after - rand_before).mean(0)  # [n_sets]
    # Per prompt: the kept set's change minus the random sets' mean change; below 0 = DPO lowered the kept
    # neurons more than neurons of the same layers at large.
    vs_random = paired_bootstrap((rand_after - rand_before).mean(1), kept_after - kept_before, n_boot, seed)
    return {
        "n_prompts": n,
        "before": {"mean": float(kept_before.mean()), "ci": bootstrap_ci(kept_before, n_boot, seed)},
        "after": {"mean": float(kept_after.mean()), "ci": bootstrap_ci(kept_after, n_boot, seed)},
        "change": change,
        "relative_change": change["diff"] / abs(kept_before.mean()) if kept_before.mean() else float("nan"),
        "random": {"n_sets": n_sets, "before_mean": float(rand_before.mean()), "after_mean": float(rand_after.mean()),
                   "set_changes": set_changes.tolist(), "mean_change": float(set_changes.mean()),
                   "sd_change": float(set_changes.std(ddof=1)) if n_sets > 1 else float("nan"),
                   "relative_change": float(set_changes.mean() / abs(rand_before.mean()))
                   if rand_before.mean() else float("nan")},
        "kept_minus_random": vs_random,
        # One-sided rank p-value: the share of random sets (the kept set counted once) that dropped as much.
        "p_rank": rank_p(change["diff"], set_changes, -1), "p_floor": p_floor(n_sets),
    }


# -----------------------------------------------------------------------------
# Subcommands


def cmd_train(args, model, tok):
    if args.data:
        rows = load_labelled(args.data)
        source = args.data
    else:
        rows = rtplx_probe_data(args.seed)
        source = "English RTP-LX prompts of the train/valid split (toxic = prompt_toxicity >= 3)"
    random.Random(args.seed).shuffle(rows)
    rows = rows[:args.limit] if args.limit else rows
    texts, labels = [r[0] for r in rows], torch.tensor([r[1] for r in rows])
    feats = text_features(model, tok, texts, args.batch_size, args.max_len, args.device)
    tr, va = split_indices(len(rows), args.valid_frac, args.seed)
    w, b = train_linear(feats[tr], labels[tr], bias=False, lr=args.lr, batch_size=10, epochs=args.epochs,
                        seed=args.seed)
    valid = classification_report(torch.sigmoid(feats[va] @ w + b).numpy(), labels[va].numpy())
    train = classification_report(torch.sigmoid(feats[tr] @ w + b).numpy(), labels[tr].numpy())
    # A probe is only evidence of a toxicity direction if it beats what a trivial feature of the same text does.
    lengths = np.array([len(t) for t in texts], dtype=np.float64)
    for split, idx, report in (("train", tr, train), ("valid", va, valid)):
        report["length_auc"] = roc_auc(lengths[idx], labels[idx].numpy())
        report["n_toxic"] = int(labels[idx].sum())
    shuffled = shuffled_label_probes(feats[tr], labels[tr], args.shuffled_probes, args.lr, args.epochs, args.seed)
    shuffled_auc = [roc_auc(torch.sigmoid(feats[va] @ d).numpy(), labels[va].numpy()) for d in shuffled]
    save_probe(Path(args.out) / "probe.safetensors", w, b, model, last_layer(model), {"kind": "probe"}, shuffled)
    result = {"model": args.model, "data": source, "hook": last_layer(model), "n": len(rows),
              "n_toxic": int(labels.sum()), "length_auc": roc_auc(lengths, labels.numpy()), "train": train,
              "valid": valid, "shuffled_probes": {"n": len(shuffled), "valid_roc_auc": shuffled_auc}}
    rows_md = [[split, r["n"], r["n_toxic"], f"{r['accuracy']:.3f}", f"{r['roc_auc']:.3f}", f"{r['length_auc']:.3f}"]
               for split, r in (("train", train), ("valid", valid))]
    md = "## Toxicity probe\n\n" + markdown_table(
        ["split", "n", "toxic", "accuracy", "ROC-AUC", "ROC-AUC of length alone"], rows_md)
    if shuffled_auc:
        md += (f"\n\n{len(shuffled)} probes trained on shuffled labels (the value-vector baseline) reach a mean "
               f"valid ROC-AUC of {np.nanmean(shuffled_auc):.3f}.")
    return result, md


def rank_value_vectors(model, w, top_k):
    """[(layer, neuron, cosine)] of the top_k value vectors across all layers by cosine with w."""
    w = F.normalize(w.float(), dim=0)
    cos = torch.stack([F.normalize(model.value_vectors(l).detach().float(), dim=1) @ w
                       for l in range(model.config.n_layers)])  # [L, d_mlp]
    top = cos.flatten().topk(top_k)
    d_mlp = cos.shape[1]
    return [(i // d_mlp, i % d_mlp, v) for i, v in zip(top.indices.tolist(), top.values.tolist())]


def is_mgpt(model):
    c = model.config
    return c.family == "gpt2" and c.n_layers == 24 and c.d_model == 2048


def select_vectors(model, direction, levels, top_k):
    """The selection every value-vector set goes through: the top_k value vectors by cosine with `direction`, each
    with its activation level on the selection prompts ([{layer, neuron, cosine, activation}], ranked)."""
    return [{"layer": l, "neuron": n, "cosine": c, "activation": float(levels[l, n])}
            for l, n, c in rank_value_vectors(model, direction, top_k)]


def fires(vectors):
    """The firing filter: the vectors whose neuron has a positive mean activation on the selection prompts."""
    return [v for v in vectors if v["activation"] > 0]


def cmd_vectors(args, model, tok):
    w, _ = load_probe(args.probe, model.config.d_model)
    indices, prompts = selection_prompts(args.seed, args.limit)
    levels = neuron_levels(model, tok, prompts, args.max_new_tokens, args.batch_size, args.device)
    write_safetensors(Path(args.out) / "neuron_levels.safetensors", {"levels": levels.float().contiguous()},
                      metadata={"model": str(args.model), "what": "mean MLP activation on the selection prompts"})
    vectors = select_vectors(model, w, levels, args.top_k)
    kept = fires(vectors)
    # The baseline goes through the same top-k and firing filter, from directions that know nothing of toxicity.
    directions, source = baseline_directions(args.probe, model.config.d_model, args.random_sets, args.seed)
    random_sets = [[[v["layer"], v["neuron"]] for v in fires(select_vectors(model, d, levels, args.top_k))]
                   for d in directions]
    sizes = [len(r) for r in random_sets]
    result = {"model": args.model, "probe": args.probe, "top_k": args.top_k, "n_prompts": len(prompts),
              "selection": {"source": "English RTP-LX prompts of the DPO training split", "seed": args.seed,
                            "indices": indices},
              "levels": "neuron_levels.safetensors", "n_kept": len(kept), "kept": kept, "ranked": vectors,
              "random_selected": {"source": source, "n_sets": len(random_sets), "n_kept": sizes,
                                  "sets": random_sets}}
    md = (f"## Toxic value vectors\n\n{len(kept)} of the top {args.top_k} value vectors by cosine with the probe "
          f"have a positive mean activation over {args.max_new_tokens} greedy tokens on {len(prompts)} English "
          f"training-split prompts. The same selection from {len(random_sets)} {source} keeps "
          f"{np.mean(sizes):.1f} vectors on average (range {min(sizes)}-{max(sizes)}): the baseline of `project`."
          f"\n\n" + markdown_table(["layer", "neuron", "cosine", "activation"],
                                   [[v["layer"], v["neuron"], f"{v['cosine']:.3f}", f"{v['activation']:.4f}"]
                                    for v in kept]))
    if is_mgpt(model):
        paper = {tuple(x) for x in json.loads(data_path(*PAPER_VECTORS).read_text())}
        overlap = paper & {(v["layer"], v["neuron"]) for v in kept}
        result["paper_overlap"] = len(overlap)
        md += f"\n\nOverlap with the paper's {len(paper)} mGPT vectors: {len(overlap)}.\n"
    return result, md


def read_vectors(path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a `probe.py vectors` output ({e})") from None


def load_levels(path, model):
    """[n_layers, d_mlp] activation levels `vectors` saved beside its vectors.json (to match random neurons on)."""
    name = read_vectors(path).get("levels")
    if not name:
        raise ValueError(f"{path}: field 'levels' missing (written by an older `probe.py vectors`); rerun `vectors`")
    levels = read_safetensors(Path(path).parent / name)["levels"]
    if tuple(levels.shape) != (model.config.n_layers, model.config.d_mlp):
        raise ValueError(f"{Path(path).parent / name}: levels of shape {tuple(levels.shape)}, the model has "
                         f"{model.config.n_layers} layers of {model.config.d_mlp} neurons; use its own `vectors`")
    return levels.numpy()


def load_random_selected(path):
    """The value-vector sets `vectors` selected from random directions: (source, [[(layer, neuron)]])."""
    try:
        baseline = read_vectors(path)["random_selected"]
        return baseline["source"], [[tuple(n) for n in s] for s in baseline["sets"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: field 'random_selected' missing or malformed ({e}); rerun `probe.py vectors`") \
            from None


def load_kept(path):
    try:
        kept = [(v["layer"], v["neuron"]) for v in read_vectors(path)["kept"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a `probe.py vectors` output ({e})") from None
    if not kept:
        raise ValueError(f"{path}: no value vector was kept (none fired); rerun `vectors` with a larger --top-k")
    return kept


def token_script(text):
    """The Unicode script of a token's first letter (LATIN, CYRILLIC, CJK, ...), or None for no letters."""
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            return "CJK" if name.startswith("CJK") else name.split(" ")[0]
    return None


def projection_records(model, tok, neurons, args):
    """{(layer, neuron): record}: each value vector's top tokens, their scripts and toxic shares."""
    neurons = sorted(set(neurons))
    ids = top_token_ids(model, neurons, args.top_tokens)
    tokens = [[tok.decode([t], skip_special=False) for t in row] for row in ids.tolist()]
    all_tokens = [t for row in tokens for t in row]
    lexicon = lexicon_toxic_tokens(LexiconScorer(), all_tokens)
    token_judge, judge_note = load_token_judge(args.judge_kind, args.judge_path, args.device)
    judged = judge_toxic_tokens(token_judge, all_tokens) if token_judge else None
    records = {}
    for (layer, neuron), top in zip(neurons, tokens):
        scripts = sorted({s for s in map(token_script, top) if s})
        rec = {"layer": layer, "neuron": neuron, "top_tokens": top, "scripts": scripts, "n_scripts": len(scripts),
               "multiscript": len(scripts) >= 2, "lexicon_toxic_tokens": [t for t in top if lexicon[t]],
               "lexicon_toxic_share": sum(lexicon[t] for t in top) / len(top)}
        if judged:
            rec["judge_toxic_share"] = sum(judged[t] for t in top) / len(top)
        records[(layer, neuron)] = rec
    return records, judge_note


def selected_baseline(kept, sets, n_boot, seed, proportion=False):
    """compare_to_random of the kept vectors' values against every vector the random directions selected (pooled),
    plus the rank test over sets: each set's mean against the kept set's mean (p_rank, one-sided: kept higher),
    sets that kept no vector left out."""
    pooled = [v for s in sets for v in s]
    if not pooled:
        raise ValueError("no random direction selected a firing value vector; rerun `vectors` with a larger --top-k")
    out = compare_to_random(kept, pooled, n_boot, seed, proportion)
    set_means = [float(np.mean(s)) for s in sets if len(s)]
    out.update(set_means=set_means, n_sets=len(set_means), p_rank=rank_p(float(np.mean(kept)), set_means, +1),
               p_floor=p_floor(len(set_means)))
    return out


def cmd_project(args, model, tok):
    kept = load_kept(args.vectors)
    source, random_sets = load_random_selected(args.vectors)
    kept_set = set(kept)
    records, judge_note = projection_records(model, tok, kept + [n for s in random_sets for n in s], args)
    out = [records[n] for n in kept]
    metrics = ["lexicon_toxic_share", "n_scripts", "multiscript"] + (["judge_toxic_share"]
                                                                    if "judge_toxic_share" in out[0] else [])
    baseline = {m: selected_baseline([r[m] for r in out], [[records[n][m] for n in s] for s in random_sets],
                                     args.n_boot, args.seed, proportion=m == "multiscript") for m in metrics}
    multi = sum(1 for o in out if o["multiscript"])
    rows = [[o["layer"], o["neuron"], o["n_scripts"], ", ".join(o["scripts"]), f"{o['lexicon_toxic_share']:.2f}",
             " ".join(repr(t)[1:-1] for t in o["top_tokens"][:12]).replace("|", "\\|")] for o in out]
    labels = {"lexicon_toxic_share": f"share of top-{args.top_tokens} tokens in a word list",
              "judge_toxic_share": f"share of top-{args.top_tokens} tokens the {args.judge_kind} judge calls toxic",
              "n_scripts": f"scripts among the top {args.top_tokens}",
              "multiscript": "share of vectors with >= 2 scripts"}
    base_rows = [[labels[m], f"{b['kept_mean']:.3f} [{b['kept_ci'][0]:.3f}, {b['kept_ci'][1]:.3f}]",
                  f"{b['random_mean']:.3f} [{b['random_ci'][0]:.3f}, {b['random_ci'][1]:.3f}]", format_p(b["p"]),
                  f"{format_p(b['p_rank'])} (floor {b['p_floor']:.3f})"] for m, b in baseline.items()]
    n_random = baseline["n_scripts"]["n_random"]
    md = (f"## Vocabulary projection of the kept value vectors\n\n{multi} of {len(out)} vectors promote tokens in "
          f"two or more scripts among their top {args.top_tokens}. Baseline: the {n_random} value vectors that "
          f"{len(random_sets)} {source} select through the same top-k and firing filter; 95% intervals, "
          f"permutation p over vectors, rank p of the kept mean among the sets' means ({judge_note}).\n\n"
          + markdown_table(["metric", f"kept (n={len(out)})", f"selected random (n={n_random})", "p", "rank p"],
                           base_rows)
          + "\n\n" + markdown_table(["layer", "neuron", "#scripts", "scripts", "toxic share", "top tokens"], rows))
    result = {"model": args.model, "top_tokens": args.top_tokens, "vectors": out, "n_multiscript": multi,
              "judge": judge_note, "baseline": baseline,
              "random": {"source": source, "n_sets": len(random_sets), "sets": random_sets,
                         "vectors": [{k: r[k] for k in ("layer", "neuron", "n_scripts", "lexicon_toxic_share",
                                                         "judge_toxic_share") if k in r}
                                     for n, r in records.items() if n not in kept_set]}}
    return result, md


def measurement_prompts(langs, limit, prompts_dir=None):
    """{lang: prompts} to measure activations on: the first `limit` of the 200 parallel prompts (held-out
    evaluation items; line i is the same item in every language), or of each language's file in prompts_dir."""
    if prompts_dir is None:
        return {lang: load_parallel(lang)[:limit] for lang in langs}
    by_lang = {}
    for job in load_jobs([prompts_dir], limit=limit):
        by_lang.setdefault(job["lang"], []).append(job["prompt"])
    missing = [lang for lang in langs if lang not in by_lang]
    if missing:
        raise ValueError(f"{prompts_dir}: no prompt file for {', '.join(missing)}")
    return {lang: by_lang[lang] for lang in langs}


def check_disjoint(selection, measurement):
    """Raise if a measured prompt is one the neurons were selected on (compared as normalised text)."""
    overlap = {normalize_prompt(p) for p in selection} & {normalize_prompt(p) for p in measurement}
    if overlap:
        raise ValueError(f"{len(overlap)} measurement prompt(s) also selected the neurons, e.g. "
                         f"{sorted(overlap)[0][:60]!r}; measure on held-out prompts")


def load_selection(path):
    """The English prompts `vectors` selected the neurons on (from its vectors.json)."""
    try:
        indices = set(json.loads(Path(path).read_text())["selection"]["indices"])
    except (KeyError, TypeError):
        raise ValueError(f"{path}: no selection prompts recorded; rerun `probe.py vectors`") from None
    return [r["prompt"] for r in load_rtplx("en") if r["index"] in indices]


def per_prompt_activations(model, tok, neurons, prompts, max_new_tokens, batch_size, device):
    """{lang: [N, len(neurons)] numpy} for prompts {lang: [str]}."""
    return {lang: generation_activations(model, tok, p, neurons, max_new_tokens, batch_size, device).numpy()
            for lang, p in tqdm(prompts.items(), desc="activations")}


def cmd_activations(args, model, tok):
    kept = load_kept(args.vectors)
    prompts = measurement_prompts(args.langs, args.limit, args.prompts)
    if "en" in prompts:
        check_disjoint(load_selection(args.vectors), prompts["en"])
    levels = load_levels(args.vectors, model)
    random_sets = matched_random_neurons(kept, levels, args.random_sets, args.seed)
    neurons = kept + [n for s in random_sets for n in s]  # kept first, then each set: activation_stats' layout
    base = per_prompt_activations(model, tok, neurons, prompts, args.max_new_tokens, args.batch_size, args.device)
    tuned, _ = load_model(args.dpo_model, device=args.device, dtype=args.dtype)
    after = per_prompt_activations(tuned, tok, neurons, prompts, args.max_new_tokens, args.batch_size, args.device)
    stats = {lang: activation_stats(base[lang], after[lang], len(kept), args.random_sets, args.n_boot, args.seed)
             for lang in args.langs}
    lower = [l for l in args.langs if stats[l]["change"]["diff"] < 0]
    significant = [l for l in lower if stats[l]["change"]["p"] < 0.05]
    beyond_random = [l for l in args.langs if stats[l]["kept_minus_random"]["diff"] < 0
                     and stats[l]["kept_minus_random"]["p"] < 0.05]
    beyond_rank = [l for l in args.langs if stats[l]["p_rank"] < 0.05]
    result = {"model": args.model, "dpo_model": args.dpo_model, "n_neurons": len(kept),
              "random_sets": args.random_sets, "p_floor": p_floor(args.random_sets), "seed": args.seed,
              "matching": match_report(kept, random_sets, levels),
              "prompts": args.prompts or "parallel held-out prompts", "n_prompts": {l: len(p) for l, p in prompts.items()},
              "pre_dpo": {l: s["before"]["mean"] for l, s in stats.items()},
              "post_dpo": {l: s["after"]["mean"] for l, s in stats.items()},
              "per_language": stats,
              "summary": {"n_langs": len(args.langs), "n_lower": len(lower), "n_lower_p05": len(significant),
                          "n_lower_than_random_p05": len(beyond_random),
                          "n_lower_than_random_rank_p05": len(beyond_rank)}}
    svg = bar_chart_svg(args.langs, {"before DPO": [stats[l]["before"]["mean"] for l in args.langs],
                                     "after DPO": [stats[l]["after"]["mean"] for l in args.langs]},
                        title="Toxic neuron activation per language", ylabel="mean activation")
    write_text(Path(args.out) / "activations.svg", svg)
    return result, activations_markdown(result)


def activations_markdown(result):
    def ci(x):
        return f"[{x[0]:+.4f}, {x[1]:+.4f}]"

    stats, summary, match = result["per_language"], result["summary"], result["matching"]
    rows = [[l, f"{s['before']['mean']:.4f}", f"{s['random']['before_mean']:.4f}", f"{s['after']['mean']:.4f}",
             f"{s['change']['diff']:+.4f} {ci(s['change']['ci'])}", format_p(s["change"]["p"]),
             f"{s['random']['mean_change']:+.4f} ± {s['random']['sd_change']:.4f}",
             f"{s['kept_minus_random']['diff']:+.4f} {ci(s['kept_minus_random']['ci'])}",
             format_p(s["kept_minus_random"]["p"]), format_p(s["p_rank"])] for l, s in stats.items()]
    return (f"## Mean activation of {result['n_neurons']} toxic neurons, before and after DPO\n\nOn held-out prompts "
            f"(never the ones that selected the neurons). Lower after DPO in {summary['n_lower']} of "
            f"{summary['n_langs']} languages ({summary['n_lower_p05']} at p < 0.05); lowered more than "
            f"{result['random_sets']} random neuron sets matched on layer, count and activation level in "
            f"{summary['n_lower_than_random_p05']} (paired bootstrap p < 0.05) and {summary['n_lower_than_random_rank_p05']}"
            f" (rank p < 0.05; its floor with {result['random_sets']} sets is {result['p_floor']:.3f}). Matching, "
            f"on the selection prompts: kept level {match['kept_level']:.4f}, random sets {match['random_level']:.4f} "
            f"(range {match['random_level_range'][0]:.4f} to {match['random_level_range'][1]:.4f}). Intervals: 95% "
            f"paired bootstrap over prompts; random: mean ± sd of the sets' changes.\n\n"
            + markdown_table(["language", "before", "random before", "after", "change [95% CI]", "p", "random change",
                              "kept - random [95% CI]", "p", "rank p"], rows))


# Guards on an intervention's texts: an offset that breaks the model lowers any scorer's toxicity, so a toxicity
# drop only counts where the texts stay as fluent, varied and in-language as with no offset.
REPEAT_MIN_DISTINCT = 0.5  # fewer than half of a generation's token bigrams distinct: it repeats itself
GUARDS = ("degenerate", "repetitive", "off_language")


def repetitive(ids):
    """True when fewer than half of a generation's token bigrams are distinct ("Connectivity Connectivity ..."),
    None with fewer than 4 bigrams (too short to tell)."""
    grams = list(zip(ids, ids[1:]))
    if len(grams) < 4:
        return None
    return len(set(grams)) / len(grams) < REPEAT_MIN_DISTINCT


def text_guards(texts, langs, tok):
    """{n, degenerate, repetitive, off_language}: the shares of texts that evaluate.degenerate_reason flags, that
    repeat themselves, and that evaluate.in_language rejects, each among the texts it decides (nan if none)."""
    ids = tok.encode_batch(list(texts), add_special=False)
    flags = {"degenerate": [degenerate_reason(t) is not None for t in texts],
             "repetitive": [repetitive(i) for i in ids],
             "off_language": [None if v is None else not v for v in map(in_language, texts, langs)]}
    out = {"n": len(texts)}
    for name, values in flags.items():
        decided = [v for v in values if v is not None]
        out[name] = float(np.mean(decided)) if decided else float("nan")
    return out


def generation_perplexity(model, tok, rows, batch_size, device):
    """{"all": ppl, lang: ppl}: exp(total NLL / total tokens) of the rows' texts given their prompts under `model`
    (the unshifted base model). Token-weighted rather than a median, so a few broken texts cannot hide."""
    logps, counts = continuation_logps(model, tok, [r["prompt"] for r in rows], [r["text"] for r in rows],
                                       batch_size, device)
    langs = np.array([r["lang"] for r in rows])
    logps, counts = np.asarray(logps), np.asarray(counts)

    def ppl(mask):
        n = counts[mask].sum()
        return float(np.exp(-logps[mask].sum() / n)) if n else float("nan")

    return {"all": ppl(np.ones(len(rows), dtype=bool)), **{l: ppl(langs == l) for l in dict.fromkeys(langs)}}


def shift_hooks(neurons, offset):
    """Hooks that add `offset` to these neurons' activations at every position."""
    def shift(layer, idx, t):
        t = t.clone()
        t[..., idx] += offset
        return t

    return neuron_hooks(neurons, shift)


def intervention_texts(model, tok, prompts, conditions, offsets, args):
    """[{offset, condition, lang, prompt_index, sample, prompt, text}] for every nonzero offset and neuron set
    (conditions {name: neurons}), after offset 0 (condition "none": it shifts nothing, so it runs once). Every run
    samples with the same seed, so a prompt's samples are paired across offsets and sets."""
    items = [(lang, i, p) for lang in args.langs for i, p in enumerate(prompts[lang])]
    runs = [(0.0, "none", [])] + [(o, name, neurons) for o in offsets if o != 0.0
                                  for name, neurons in conditions.items()]
    rows = []
    for offset, name, neurons in tqdm(runs, desc="intervene"):
        with model.hooks(shift_hooks(neurons, offset)):
            texts = generate_text(model, tok, [p for _, _, p in items], n=args.n, max_new_tokens=args.max_new_tokens,
                                  seed=args.seed, batch_size=args.batch_size, device=args.device)
        rows += [{"offset": offset, "condition": name, "lang": items[i // args.n][0],
                  "prompt_index": items[i // args.n][1], "sample": i % args.n, "prompt": items[i // args.n][2],
                  "text": text} for i, text in enumerate(texts)]
    return rows


def offset_vs_random(base, kept, random, strata, direction, n_boot, seed):
    """The kept set's toxicity change at one offset against the matched random sets', over prompts of one or more
    languages (strata: each prompt's language; every language weighs the same). base, kept [N] and random
    [n_sets, N] are per-prompt mean scores; direction: the sign of the offset, the way toxicity should move."""
    kept_change = paired_bootstrap(base, kept, n_boot, seed, strata=strata)
    rand_delta = random - base  # [n_sets, N]
    set_changes = [float(np.mean([d[strata == s].mean() for s in np.unique(strata)])) for d in rand_delta]
    return {"kept_change": kept_change, "random_changes": set_changes,
            "random_mean_change": float(np.mean(set_changes)),
            "random_sd_change": float(np.std(set_changes, ddof=1)) if len(set_changes) > 1 else float("nan"),
            "direction": direction, "p_rank": rank_p(kept_change["diff"], set_changes, direction),
            "p_floor": p_floor(len(set_changes)),
            # Per prompt, the kept set's change minus the random sets' mean change: paired over prompts.
            "kept_minus_random": paired_bootstrap(rand_delta.mean(0), kept - base, n_boot, seed, strata=strata)}


def guard_failures(kept, base, ppl_ratio, args):
    """The guards the kept set's texts fail at one offset, as readable strings: a share (GUARDS) more than
    --max-guard-increase above offset 0's, or a perplexity under the unshifted model more than --max-ppl-ratio
    times offset 0's. A share no text decides (nan) fails nothing; offset 0's nan counts as 0."""
    failed = [f"{g} {base[g]:.2f} -> {kept[g]:.2f}" for g in GUARDS
              if kept[g] - np.nan_to_num(base[g]) > args.max_guard_increase]
    if ppl_ratio > args.max_ppl_ratio:
        failed.append(f"perplexity x{ppl_ratio:.2f}")
    return failed


def offset_verdict(vs_random, failed):
    """invalid (a guard fails), supported (the kept set moves toxicity the offset's way more than the random sets:
    paired bootstrap and rank test both p < 0.05), or not supported."""
    if failed:
        return "invalid"
    k = vs_random["kept_minus_random"]
    beats = vs_random["direction"] * k["diff"] > 0 and k["p"] < 0.05 and vs_random["p_rank"] < 0.05
    return "supported" if beats else "not supported"


def parse_offsets(text):
    """--offsets as floats; 0 must be among them: every offset is compared with the unshifted run."""
    try:
        offsets = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--offsets {text!r}: expected comma-separated numbers, e.g. 0,-1,-2,-3,3") from None
    if 0.0 not in offsets:
        raise ValueError(f"--offsets {text!r}: include 0, the unshifted run every offset is compared with")
    return offsets


def rows_of(rows, offset, condition):
    """The rows of one run; offset 0 has the single unshifted run, whatever the condition."""
    name = condition if offset != 0.0 else "none"
    return [r for r in rows if r["offset"] == offset and r["condition"] == name]


def per_prompt_scores(rows, n):
    """[prompts]: the mean score of each prompt's n samples, in row order."""
    return np.asarray([r["score"] for r in rows], dtype=np.float64).reshape(-1, n).mean(1)


def finite_mean(values):
    kept = [v for v in values if np.isfinite(v)]
    return float(np.mean(kept)) if kept else float("nan")


def language_guards(rows, tok):
    """text_guards of all the rows, with each language's under "per_language"."""
    langs = [r["lang"] for r in rows]
    per = {l: text_guards([r["text"] for r in rows if r["lang"] == l], [l] * langs.count(l), tok)
           for l in dict.fromkeys(langs)}
    return {**text_guards([r["text"] for r in rows], langs, tok), "per_language": per}


def offset_report(model, tok, rows, offset, n_sets, baseline, args):
    """What one nonzero offset shows: the guards of the kept and random sets' texts, the kept texts' perplexity
    under the unshifted model, the comparison with the random sets (all languages, and each) and the verdict.
    baseline: offset 0's {scores, strata, guards, perplexity}."""
    kept_rows = rows_of(rows, offset, "kept")
    random_rows = [rows_of(rows, offset, f"random{i}") for i in range(n_sets)]
    guards = language_guards(kept_rows, tok)
    random_guards = [text_guards([r["text"] for r in rr], [r["lang"] for r in rr], tok) for rr in random_rows]
    ppl = generation_perplexity(model, tok, kept_rows, args.batch_size, args.device)
    ratio = ppl["all"] / baseline["perplexity"]["all"]
    base, strata = baseline["scores"], baseline["strata"]
    kept = per_prompt_scores(kept_rows, args.n)
    random = np.stack([per_prompt_scores(rr, args.n) for rr in random_rows])  # [n_sets, N]
    direction = float(np.sign(offset))
    vs_random = {"all": offset_vs_random(base, kept, random, strata, direction, args.n_boot, args.seed),
                 "per_language": {l: offset_vs_random(base[strata == l], kept[strata == l], random[:, strata == l],
                                                      strata[strata == l], direction, args.n_boot, args.seed)
                                  for l in args.langs}}
    failed = guard_failures(guards, baseline["guards"], ratio, args)
    return {"verdict": offset_verdict(vs_random["all"], failed), "failed_guards": failed, "guards": guards,
            "random_guards": {g: finite_mean([x[g] for x in random_guards]) for g in GUARDS},
            "perplexity": ppl, "ppl_ratio": ratio, "vs_random": vs_random}


def cmd_intervene(args, model, tok):
    neurons = load_kept(args.vectors)
    scorer = make_scorer(args.scorer, judge=args.judge, device=args.device)
    offsets = parse_offsets(args.offsets)
    levels = load_levels(args.vectors, model)
    random_sets = matched_random_neurons(neurons, levels, args.random_sets, args.seed)
    prompts = measurement_prompts(args.langs, args.limit, args.prompts)
    conditions = {"kept": neurons, **{f"random{i}": s for i, s in enumerate(random_sets)}}
    rows = intervention_texts(model, tok, prompts, conditions, offsets, args)
    # One scoring call for every text of every run: the judge scores them in large batches.
    for row, score in zip(rows, scorer.score([r["text"] for r in rows], [r["lang"] for r in rows])):
        row["score"] = float(score)
    write_text(Path(args.out) / "intervene_texts.jsonl",  # the prompt by its index only: no dataset text
               "".join(json.dumps({k: v for k, v in r.items() if k != "prompt"}, ensure_ascii=False) + "\n"
                       for r in rows))
    base_rows = rows_of(rows, 0.0, "none")
    strata = np.array([r["lang"] for r in base_rows[::args.n]])  # each prompt's language
    baseline = {"scores": per_prompt_scores(base_rows, args.n), "strata": strata,
                "guards": language_guards(base_rows, tok),
                "perplexity": generation_perplexity(model, tok, base_rows, args.batch_size, args.device)}
    per_offset = {str(o): offset_report(model, tok, rows, o, args.random_sets, baseline, args)
                  for o in offsets if o != 0.0}
    kept = {o: per_prompt_scores(rows_of(rows, o, "kept"), args.n) for o in offsets}
    table = {o: {l: float(v[strata == l].mean()) for l in args.langs} for o, v in kept.items()}
    cis = {o: {l: bootstrap_ci(v[strata == l], args.n_boot, args.seed) for l in args.langs} for o, v in kept.items()}
    # Same prompts and sampling seed at every offset, so each offset is compared with no offset prompt by prompt.
    vs_zero = {str(o): {l: paired_bootstrap(kept[0.0][strata == l], kept[o][strata == l], args.n_boot, args.seed)
                        for l in args.langs} for o in offsets if o != 0.0}
    svg = line_chart_svg(offsets, {l: [table[o][l] for o in offsets] for l in args.langs},
                         title="Toxicity vs. offset on toxic neurons", xlabel="offset", ylabel="mean toxicity")
    write_text(Path(args.out) / "intervene.svg", svg)
    result = {"model": args.model, "scorer": args.scorer, "offsets": offsets, "n": args.n,
              "n_prompts": {l: len(p) for l, p in prompts.items()}, "n_neurons": len(neurons),
              "random_sets": args.random_sets, "p_floor": p_floor(args.random_sets),
              "matching": match_report(neurons, random_sets, levels),
              "bounds": {"max_guard_increase": args.max_guard_increase, "max_ppl_ratio": args.max_ppl_ratio,
                         "repeat_min_distinct": REPEAT_MIN_DISTINCT},
              "baseline": {"guards": baseline["guards"], "perplexity": baseline["perplexity"]},
              "per_offset": per_offset, "verdicts": {o: r["verdict"] for o, r in per_offset.items()},
              "toxicity": {str(o): v for o, v in table.items()}, "toxicity_ci": {str(o): v for o, v in cis.items()},
              "change_vs_zero": vs_zero, "texts": "intervene_texts.jsonl"}
    return result, intervene_markdown(result, args)


def intervene_markdown(result, args):
    def interval(x):
        return f"{x['diff']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]"

    def share(x):
        return "n/a" if np.isnan(x) else f"{x:.2f}"

    rows, failures = [], []
    for o, r in result["per_offset"].items():
        v = r["vs_random"]["all"]
        rows.append([f"{float(o):+g}", interval(v["kept_change"]),
                     f"{v['random_mean_change']:+.3f} ± {v['random_sd_change']:.3f}", interval(v["kept_minus_random"]),
                     format_p(v["kept_minus_random"]["p"]), format_p(v["p_rank"]),
                     *[share(r["guards"][g]) for g in GUARDS], f"{r['ppl_ratio']:.2f}", r["verdict"]])
        if r["failed_guards"]:
            failures.append(f"- offset {float(o):+g}: " + "; ".join(r["failed_guards"]))
    table, base, m = result["toxicity"], result["baseline"], result["matching"]
    tox_rows = [[f"{float(o):+g}"] + [f"{table[o][l]:.3f} [{result['toxicity_ci'][o][l][0]:.2f}, "
                                      f"{result['toxicity_ci'][o][l][1]:.2f}]" for l in args.langs]
                + [f"{np.mean(list(table[o].values())):.3f}"] for o in table]
    return (f"## Shifting {result['n_neurons']} toxic neurons by a constant, against {result['random_sets']} matched "
            f"random sets\n\nToxicity ({args.scorer}), {args.n} samples per prompt. Change: offset minus offset 0, "
            f"the mean over languages, 95% paired bootstrap over prompts. Random sets match the kept one on layer, "
            f"count and activation level on the selection prompts (kept {m['kept_level']:.4f}, random "
            f"{m['random_level']:.4f}); rank p: the share of random sets moving toxicity at least as far the offset's "
            f"way (floor {result['p_floor']:.3f}). Guards on the kept set's texts (offset 0: degenerate "
            f"{share(base['guards']['degenerate'])}, repetitive {share(base['guards']['repetitive'])}, off-language "
            f"{share(base['guards']['off_language'])}, perplexity {base['perplexity']['all']:.1f}): an offset is "
            f"invalid when a share rises more than {args.max_guard_increase:g} above offset 0's or the texts' "
            f"perplexity under the unshifted model exceeds {args.max_ppl_ratio:g}x offset 0's. Repetitive: under "
            f"{REPEAT_MIN_DISTINCT:.0%} distinct token bigrams. Texts: intervene_texts.jsonl.\n\n"
            + markdown_table(["offset", "kept change [95% CI]", "random change", "kept - random [95% CI]", "p",
                              "rank p", "degenerate", "repetitive", "off-language", "ppl ratio", "verdict"], rows)
            + ("\n\nFailed guards:\n" + "\n".join(failures) if failures else "")
            + "\n\nMean toxicity per language, kept set (95% bootstrap intervals over prompts):\n\n"
            + markdown_table(["offset"] + list(args.langs) + ["mean"], tox_rows))


def common_flags():
    """The flags every step takes: the base model, where results go, and how it runs."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL,
                        help="base model: local HF dir, .gguf, hub id or embedded name (default: %(default)s)")
    common.add_argument("--out", required=True, help="output directory (DIR/<command>.json and .md)")
    common.add_argument("--limit", type=int, default=None, help="at most this many texts (train), selection "
                        "prompts (vectors) or prompts per language (activations, intervene)")
    common.add_argument("--batch-size", type=int, default=8, help="texts per forward pass")
    common.add_argument("--seed", type=int, default=0)
    add_device_args(common)
    add_root_flag(common)
    return common


def analysis_flags():
    """The flags of the steps that study the kept value vectors (project, activations, intervene)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--vectors", required=True, help="vectors.json from `vectors`")
    flags.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (over vectors, or over "
                       "prompts) for 95%% intervals and p-values (default: %(default)s)")
    return flags


def measurement_flags():
    """The flags of the steps that run the model on prompts in many languages (activations, intervene)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--langs", nargs="+", default=list(LANGS), choices=LANGS, metavar="LANG",
                       help="languages (default: all 17)")
    flags.add_argument("--prompts", help="directory with one prompt file per language (named by its code, e.g. "
                       "de.jsonl); default: the parallel held-out prompts, the same items in every language")
    return flags


def max_new_tokens_flag(parser):
    parser.add_argument("--max-new-tokens", type=int, default=20, help="new tokens per prompt: activations are "
                        "averaged over them, or they are scored (intervene) (paper: 20)")


def random_sets_flag(parser):
    parser.add_argument("--random-sets", type=int, default=20, help="random neuron sets matched to the kept set on "
                        "layer, count and activation level, the chance baseline; the rank test's p cannot go below "
                        "1 / (1 + sets), so 20 or more let it reach p < 0.05 (default: %(default)s)")


def add_train_parser(sub, common):
    p = sub.add_parser("train", parents=[common], help="train the linear toxicity probe")
    p.add_argument("--data", help="labelled jsonl {text,label} or Jigsaw CSV {comment_text,toxic}; default: "
                   "English RTP-LX prompts of the train/valid split, toxic = prompt_toxicity >= 3")
    p.add_argument("--epochs", type=int, default=20, help="probe epochs (paper: 20)")
    p.add_argument("--lr", type=float, default=1e-4, help="probe Adam learning rate (paper: 1e-4; batch 10)")
    p.add_argument("--valid-frac", type=float, default=0.1, help="held-out fraction (paper: 10%%)")
    p.add_argument("--max-len", type=int, default=128, help="tokens per text when extracting features")
    p.add_argument("--shuffled-probes", type=int, default=20, help="probes also trained on shuffled labels, saved "
                   "beside the probe: `vectors` selects its random baseline with them (default: %(default)s)")
    p.set_defaults(run=cmd_train)


def add_vectors_parser(sub, common):
    p = sub.add_parser("vectors", parents=[common], help="rank value vectors by the probe and keep those that fire")
    p.add_argument("--probe", required=True, help="probe file from `train` (probe.safetensors) or the paper's "
                   "english-probe-mgpt.pt")
    p.add_argument("--top-k", type=int, default=100, help="how many value vectors to rank (paper: 100)")
    p.add_argument("--random-sets", type=int, default=20, help="random directions (the probe file's shuffled-label "
                   "probes, else Gaussian) whose top-k firing value vectors form the baseline of `project`; 20 or more "
                   "let its rank test reach p < 0.05 (default: %(default)s)")
    max_new_tokens_flag(p)
    p.set_defaults(run=cmd_vectors)


def add_project_parser(sub, common, analysis):
    p = sub.add_parser("project", parents=[common, analysis],
                       help="the tokens each kept vector promotes, against random vectors")
    p.add_argument("--top-tokens", type=int, default=30, help="tokens shown per vector (paper: 30)")
    p.add_argument("--judge-kind", default="ngram", choices=["feature", "ngram", "none"],
                   help="also count the top tokens judge.py's judge of this kind calls toxic (none: off; "
                   "default: %(default)s)")
    p.add_argument("--judge-path", help="the judge's model file for judge.load (default: judge.py's)")
    p.set_defaults(run=cmd_project)


def add_activations_parser(sub, common, analysis, measurement):
    p = sub.add_parser("activations", parents=[common, analysis, measurement],
                       help="activation of the kept neurons per language, base vs DPO model")
    p.add_argument("--dpo-model", required=True, help="the DPO-trained checkpoint to compare with --model")
    random_sets_flag(p)
    max_new_tokens_flag(p)
    p.set_defaults(run=cmd_activations)


def add_intervene_parser(sub, common, analysis, measurement):
    p = sub.add_parser("intervene", parents=[common, analysis, measurement],
                       help="shift the kept neurons and measure toxicity per language")
    p.add_argument("--scorer", default="judge", choices=sorted(SCORERS), help="toxicity scorer (scorers.py; "
                   "default: %(default)s)")
    p.add_argument("--judge", help="with --scorer judge/ngram: a judge.py file instead of the shipped one")
    p.add_argument("--offsets", default="0,-1,-2,-3,3", help="comma-separated offsets added to the neurons' "
                   "activations, 0 included (paper: 0 to -5, and +5; -5 breaks the text, so the default stays in "
                   "the fluent range)")
    p.add_argument("--n", type=int, default=5, help="samples per prompt")
    p.add_argument("--max-guard-increase", type=float, default=0.10, help="an offset is invalid when its share of "
                   "degenerate, repetitive or off-language texts exceeds offset 0's by more than this "
                   "(default: %(default)s)")
    p.add_argument("--max-ppl-ratio", type=float, default=1.5, help="... or when its texts' perplexity under the "
                   "unshifted model exceeds offset 0's by more than this factor (default: %(default)s)")
    random_sets_flag(p)
    max_new_tokens_flag(p)
    p.set_defaults(run=cmd_intervene)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, help="which step of the analysis to run")
    common, analysis, measurement = common_flags(), analysis_flags(), measurement_flags()
    add_train_parser(sub, common)
    add_vectors_parser(sub, common)
    add_project_parser(sub, common, analysis)
    add_activations_parser(sub, common, analysis, measurement)
    add_intervene_parser(sub, common, analysis, measurement)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_root_flag(args)
    if getattr(args, "random_sets", 1) < 1 or getattr(args, "n_boot", 1) < 1:
        raise SystemExit("probe.py: --random-sets and --n-boot must be at least 1")
    args.dtype = resolve_dtype(args.device, args.dtype)
    inputs = ("model", "dpo_model", "data", "probe", "vectors", "prompts", "judge", "judge_path")
    check_outputs([("--out", Path(args.out) / f"{args.command}{suffix}") for suffix in (".json", ".md")],
                  [(flag(dest), getattr(args, dest, None)) for dest in inputs], folders=[("--out", args.out)])
    torch.manual_seed(args.seed)
    # Every step reads the base model; each returns its JSON result and Markdown summary.
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result, md = args.run(args, model, tok)
    write_json(out / f"{args.command}.json", result)
    write_text(out / f"{args.command}.md", md + "\n")
    print(md)


if __name__ == "__main__":
    exit_on_error(main)
