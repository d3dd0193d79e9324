"""
The mechanistic half of the paper: why English-only DPO detoxifies other languages.

    train        a linear toxicity probe w on the mean-pooled last-layer residual stream (no bias, BCE, Adam),
                 on human-labelled English RTP-LX prompts (toxic = annotator score >= 3) outside the held-out
                 evaluation items; reports how well text length alone separates the same data
    vectors      MLP value vectors (rows of every layer's down-projection) ranked by cosine with w; keep the
                 top-k, then those that actually fire (mean activation > 0) while the model writes English
                 continuations of English training-split prompts (never the prompts `activations` measures on)
    project      each kept vector times the unembedding: the tokens it promotes, how many scripts they span and
                 how many are toxic, against random value vectors of the same layers (permutation test)
    activations  mean activation of the kept neurons per language, base model vs DPO model (paper Fig. 3), on
                 held-out prompts, with bootstrap intervals and random neuron sets of the same layers as baseline
    intervene    add an offset to the kept neurons at every position and measure toxicity per language (Fig. 2);
                 the generated texts are saved beside their scores

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
from data import DATA_DIR, LANGS, default_split, iter_jsonl, load_parallel, load_rtplx, normalize_prompt, require
from generate import generate, generate_text, load_jobs
from loading import add_device_args, load_model, resolve_dtype
from model import pooled_activations
from report import bar_chart_svg, exit_on_error, line_chart_svg, markdown_table, write_json, write_text
from scorers import SCORERS, TOXIC_THRESHOLD, LexiconScorer, make_scorer
from stats import bootstrap_ci, format_p, paired_bootstrap, permutation_test, roc_auc, wilson_interval

PAPER_VECTORS = DATA_DIR / "official" / "mgpt_toxic_value_vectors.json"
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
    recording during decoding, in one batched pass."""
    order = {n: i for i, n in enumerate(neurons)}
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
            per_prompt = (acts * weights[..., None]).sum(1).cpu()  # [B, k]
            for col, neuron in enumerate(idx.tolist()):
                sums[:, order[(layer, neuron)]] = per_prompt[:, col]

        with model.hooks(neuron_hooks(neurons, record)):
            model(full_ids, full_mask)
        per_prompt_rows.append(sums)
    return torch.cat(per_prompt_rows) if per_prompt_rows else torch.zeros(0, len(neurons))


# -----------------------------------------------------------------------------
# Random baselines: is a property of the kept neurons more than chance for neurons of the same layers?


def random_neurons(kept, d_mlp, n_sets, seed):
    """n_sets lists of (layer, neuron), each with the kept set's per-layer counts, drawn without replacement
    from that layer's neurons outside the kept set (no neuron in two sets); the same seed gives the same sets."""
    counts = {}
    for layer, _ in kept:
        counts[layer] = counts.get(layer, 0) + 1
    kept_set = set(kept)
    rng = np.random.default_rng(seed)
    sets = [[] for _ in range(n_sets)]
    for layer in sorted(counts):
        pool = [n for n in range(d_mlp) if (layer, n) not in kept_set]
        need = counts[layer] * n_sets
        if need > len(pool):
            raise ValueError(f"layer {layer}: {n_sets} random sets of {counts[layer]} neurons need {need} "
                             f"neurons outside the kept set, the layer has {len(pool)}; lower --random-sets")
        draw = rng.choice(pool, size=need, replace=False).tolist()
        for i, chunk in enumerate(range(0, need, counts[layer])):
            sets[i] += [(layer, n) for n in draw[chunk:chunk + counts[layer]]]
    return sets


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
        "p_rank": float((1 + np.sum(set_changes <= change["diff"])) / (1 + n_sets)),
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
    save_probe(Path(args.out) / "probe.safetensors", w, b, model, last_layer(model), {"kind": "probe"})
    result = {"model": args.model, "data": source, "hook": last_layer(model), "n": len(rows),
              "n_toxic": int(labels.sum()), "length_auc": roc_auc(lengths, labels.numpy()), "train": train,
              "valid": valid}
    rows_md = [[split, r["n"], r["n_toxic"], f"{r['accuracy']:.3f}", f"{r['roc_auc']:.3f}", f"{r['length_auc']:.3f}"]
               for split, r in (("train", train), ("valid", valid))]
    return result, ("## Toxicity probe\n\n" + markdown_table(
        ["split", "n", "toxic", "accuracy", "ROC-AUC", "ROC-AUC of length alone"], rows_md))


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


def cmd_vectors(args, model, tok):
    w, _ = load_probe(args.probe, model.config.d_model)
    ranked = rank_value_vectors(model, w, args.top_k)
    indices, prompts = selection_prompts(args.seed, args.limit)
    acts = generation_activations(model, tok, prompts, [(l, n) for l, n, _ in ranked], args.max_new_tokens,
                                  args.batch_size, args.device).mean(0)
    vectors = [{"layer": l, "neuron": n, "cosine": c, "activation": float(a)}
               for (l, n, c), a in zip(ranked, acts)]
    kept = [v for v in vectors if v["activation"] > 0]
    result = {"model": args.model, "probe": args.probe, "top_k": args.top_k, "n_prompts": len(prompts),
              "selection": {"source": "English RTP-LX prompts of the DPO training split", "seed": args.seed,
                            "indices": indices},
              "n_kept": len(kept), "kept": kept, "ranked": vectors}
    md = (f"## Toxic value vectors\n\n{len(kept)} of the top {args.top_k} value vectors by cosine with the probe "
          f"have a positive mean activation over {args.max_new_tokens} greedy tokens on {len(prompts)} English "
          f"training-split prompts.\n\n" + markdown_table(["layer", "neuron", "cosine", "activation"],
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
        kept = [(v["layer"], v["neuron"]) for v in json.loads(path.read_text())["kept"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
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


def cmd_project(args, model, tok):
    kept = load_kept(args.vectors)
    random_sets = random_neurons(kept, model.config.d_mlp, args.random_sets, args.seed)
    rand = [n for s in random_sets for n in s]
    ids = top_token_ids(model, kept + rand, args.top_tokens)
    tokens = [[tok.decode([t], skip_special=False) for t in row] for row in ids.tolist()]
    all_tokens = [t for row in tokens for t in row]
    lexicon = lexicon_toxic_tokens(LexiconScorer(), all_tokens)
    token_judge, judge_note = load_token_judge(args.judge_kind, args.judge_path, args.device)
    judged = judge_toxic_tokens(token_judge, all_tokens) if token_judge else None
    records = []
    for (layer, neuron), top in zip(kept + rand, tokens):
        scripts = sorted({s for s in map(token_script, top) if s})
        rec = {"layer": layer, "neuron": neuron, "top_tokens": top, "scripts": scripts, "n_scripts": len(scripts),
               "lexicon_toxic_tokens": [t for t in top if lexicon[t]],
               "lexicon_toxic_share": sum(lexicon[t] for t in top) / len(top)}
        if judged:
            rec["judge_toxic_share"] = sum(judged[t] for t in top) / len(top)
        records.append(rec)
    out, rand_records = records[:len(kept)], records[len(kept):]

    def column(recs, key):
        return [r[key] for r in recs]

    baseline = {"lexicon_toxic_share": compare_to_random(column(out, "lexicon_toxic_share"),
                                                         column(rand_records, "lexicon_toxic_share"), args.n_boot, args.seed),
                "n_scripts": compare_to_random(column(out, "n_scripts"), column(rand_records, "n_scripts"),
                                               args.n_boot, args.seed),
                "multiscript": compare_to_random([r["n_scripts"] >= 2 for r in out],
                                                 [r["n_scripts"] >= 2 for r in rand_records], seed=args.seed,
                                                 proportion=True)}
    if judged:
        baseline["judge_toxic_share"] = compare_to_random(column(out, "judge_toxic_share"),
                                                          column(rand_records, "judge_toxic_share"), args.n_boot,
                                                          args.seed)
    multi = sum(1 for o in out if o["n_scripts"] >= 2)
    rows = [[o["layer"], o["neuron"], o["n_scripts"], ", ".join(o["scripts"]), f"{o['lexicon_toxic_share']:.2f}",
             " ".join(repr(t)[1:-1] for t in o["top_tokens"][:12]).replace("|", "\\|")] for o in out]
    labels = {"lexicon_toxic_share": f"share of top-{args.top_tokens} tokens in a word list",
              "judge_toxic_share": f"share of top-{args.top_tokens} tokens the {args.judge_kind} judge calls toxic",
              "n_scripts": f"scripts among the top {args.top_tokens}",
              "multiscript": "share of vectors with >= 2 scripts"}
    base_rows = [[labels[m], f"{b['kept_mean']:.3f} [{b['kept_ci'][0]:.3f}, {b['kept_ci'][1]:.3f}]",
                  f"{b['random_mean']:.3f} [{b['random_ci'][0]:.3f}, {b['random_ci'][1]:.3f}]", format_p(b["p"])]
                 for m, b in baseline.items()]
    md = (f"## Vocabulary projection of the kept value vectors\n\n{multi} of {len(out)} vectors promote tokens in "
          f"two or more scripts among their top {args.top_tokens}. Baseline: {len(rand_records)} random value "
          f"vectors with the kept set's per-layer counts (seed {args.seed}); 95% intervals, permutation p-values "
          f"({judge_note}).\n\n"
          + markdown_table(["metric", f"kept (n={len(out)})", f"random (n={len(rand_records)})", "p"], base_rows)
          + "\n\n" + markdown_table(["layer", "neuron", "#scripts", "scripts", "toxic share", "top tokens"], rows))
    result = {"model": args.model, "top_tokens": args.top_tokens, "vectors": out, "n_multiscript": multi,
              "judge": judge_note, "baseline": baseline,
              "random": {"n_sets": args.random_sets, "seed": args.seed,
                         "vectors": [{k: r[k] for k in ("layer", "neuron", "n_scripts", "lexicon_toxic_share",
                                                         "judge_toxic_share") if k in r} for r in rand_records]}}
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
    random_sets = random_neurons(kept, model.config.d_mlp, args.random_sets, args.seed)
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
    result = {"model": args.model, "dpo_model": args.dpo_model, "n_neurons": len(kept),
              "random_sets": args.random_sets, "seed": args.seed,
              "prompts": args.prompts or "parallel held-out prompts", "n_prompts": {l: len(p) for l, p in prompts.items()},
              "pre_dpo": {l: s["before"]["mean"] for l, s in stats.items()},
              "post_dpo": {l: s["after"]["mean"] for l, s in stats.items()},
              "per_language": stats,
              "summary": {"n_langs": len(args.langs), "n_lower": len(lower), "n_lower_p05": len(significant),
                          "n_lower_than_random_p05": len(beyond_random)}}

    def ci(x):
        return f"[{x[0]:+.4f}, {x[1]:+.4f}]"

    rows = [[l, f"{s['before']['mean']:.4f}", f"{s['after']['mean']:.4f}",
             f"{s['change']['diff']:+.4f} {ci(s['change']['ci'])}", format_p(s["change"]["p"]),
             f"{s['random']['mean_change']:+.4f} ± {s['random']['sd_change']:.4f}",
             f"{s['kept_minus_random']['diff']:+.4f} {ci(s['kept_minus_random']['ci'])}",
             format_p(s["kept_minus_random"]["p"])] for l, s in stats.items()]
    md = (f"## Mean activation of {len(kept)} toxic neurons, before and after DPO\n\nOn held-out prompts (never the "
          f"ones that selected the neurons). Lower after DPO in {len(lower)} of {len(args.langs)} languages "
          f"({len(significant)} at p < 0.05); lowered more than {args.random_sets} random neuron sets of the same "
          f"layers and size in {len(beyond_random)} (p < 0.05). Intervals: 95% paired bootstrap over prompts; "
          f"random: mean ± sd of the sets' changes.\n\n"
          + markdown_table(["language", "before", "after", "change [95% CI]", "p", "random change",
                            "kept - random [95% CI]", "p"], rows))
    svg = bar_chart_svg(args.langs, {"before DPO": [stats[l]["before"]["mean"] for l in args.langs],
                                     "after DPO": [stats[l]["after"]["mean"] for l in args.langs]},
                        title="Toxic neuron activation per language", ylabel="mean activation")
    write_text(Path(args.out) / "activations.svg", svg)
    return result, md


def cmd_intervene(args, model, tok):
    neurons = load_kept(args.vectors)
    scorer = make_scorer(args.scorer, judge=args.judge, device=args.device)
    offsets = [float(x) for x in args.offsets.split(",")]
    prompts = measurement_prompts(args.langs, args.limit, args.prompts)
    per_prompt, lines = {}, []  # per_prompt[offset][lang]: mean score of each prompt's n samples
    for offset in tqdm(offsets, desc="offsets"):
        def shift(layer, idx, t, offset=offset):
            t = t.clone()
            t[..., idx] += offset
            return t

        per_prompt[offset] = {}
        with model.hooks(neuron_hooks(neurons, shift)):
            for lang in args.langs:
                texts = generate_text(model, tok, prompts[lang], n=args.n, max_new_tokens=args.max_new_tokens,
                                      seed=args.seed, batch_size=args.batch_size, device=args.device)
                scores = scorer.score(texts, [lang] * len(texts))
                per_prompt[offset][lang] = np.asarray(scores, dtype=np.float64).reshape(-1, args.n).mean(1)
                lines += [json.dumps({"offset": offset, "lang": lang, "prompt_index": i // args.n,
                                      "sample": i % args.n, "prompt": prompts[lang][i // args.n], "text": text,
                                      "score": float(score)}, ensure_ascii=False)
                          for i, (text, score) in enumerate(zip(texts, scores))]
    write_text(Path(args.out) / "intervene_texts.jsonl", "\n".join(lines) + "\n")
    table = {o: {l: float(v.mean()) for l, v in by_lang.items()} for o, by_lang in per_prompt.items()}
    cis = {o: {l: bootstrap_ci(v, args.n_boot, args.seed) for l, v in by_lang.items()}
           for o, by_lang in per_prompt.items()}
    # Same prompts and sampling seed at every offset, so each offset is compared with no offset prompt by prompt.
    vs_zero = ({str(o): {l: paired_bootstrap(per_prompt[0.0][l], per_prompt[o][l], args.n_boot, args.seed)
                         for l in args.langs} for o in offsets if o != 0.0} if 0.0 in per_prompt else {})
    rows = [[f"{o:+g}"] + [f"{table[o][l]:.3f} [{cis[o][l][0]:.2f}, {cis[o][l][1]:.2f}]" for l in args.langs]
            + [f"{np.mean(list(table[o].values())):.3f}"] for o in offsets]
    md = (f"## Mean toxicity ({args.scorer}) after shifting {len(neurons)} toxic neurons by a constant\n\n"
          f"{args.n} samples per prompt; 95% bootstrap intervals over prompts. Texts: intervene_texts.jsonl.\n\n"
          + markdown_table(["offset"] + list(args.langs) + ["mean"], rows))
    svg = line_chart_svg(offsets, {l: [table[o][l] for o in offsets] for l in args.langs},
                         title="Toxicity vs. offset on toxic neurons", xlabel="offset", ylabel="mean toxicity")
    write_text(Path(args.out) / "intervene.svg", svg)
    return {"model": args.model, "scorer": args.scorer, "offsets": offsets, "n": args.n,
            "n_prompts": {l: len(p) for l, p in prompts.items()},
            "toxicity": {str(o): v for o, v in table.items()},
            "toxicity_ci": {str(o): v for o, v in cis.items()},
            "change_vs_zero": vs_zero, "texts": "intervene_texts.jsonl"}, md


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
    parser.add_argument("--random-sets", type=int, default=10, help="random neuron sets, each with the kept set's "
                        "per-layer counts, as the chance baseline (default: %(default)s)")


def add_train_parser(sub, common):
    p = sub.add_parser("train", parents=[common], help="train the linear toxicity probe")
    p.add_argument("--data", help="labelled jsonl {text,label} or Jigsaw CSV {comment_text,toxic}; default: "
                   "English RTP-LX prompts of the train/valid split, toxic = prompt_toxicity >= 3")
    p.add_argument("--epochs", type=int, default=20, help="probe epochs (paper: 20)")
    p.add_argument("--lr", type=float, default=1e-4, help="probe Adam learning rate (paper: 1e-4; batch 10)")
    p.add_argument("--valid-frac", type=float, default=0.1, help="held-out fraction (paper: 10%%)")
    p.add_argument("--max-len", type=int, default=128, help="tokens per text when extracting features")
    p.set_defaults(run=cmd_train)


def add_vectors_parser(sub, common):
    p = sub.add_parser("vectors", parents=[common], help="rank value vectors by the probe and keep those that fire")
    p.add_argument("--probe", required=True, help="probe file from `train` (probe.safetensors) or the paper's "
                   "english-probe-mgpt.pt")
    p.add_argument("--top-k", type=int, default=100, help="how many value vectors to rank (paper: 100)")
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
    random_sets_flag(p)
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
    p.add_argument("--offsets", default="0,-1,-2,-3,-4,-5,5", help="comma-separated offsets added to the "
                   "neurons' activations (paper: 0 to -5, and +5)")
    p.add_argument("--n", type=int, default=5, help="samples per prompt")
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
    if getattr(args, "random_sets", 1) < 1 or getattr(args, "n_boot", 1) < 1:
        raise SystemExit("probe.py: --random-sets and --n-boot must be at least 1")
    args.dtype = resolve_dtype(args.device, args.dtype)
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
