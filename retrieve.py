"""
Bilingual sentence retrieval: does a model put an English sentence and its translation close together?
Li, Yong & Bach (2024, Sec. 6) find that the better a language's sentences align with English inside the
model, the more English-only DPO detoxification carries over to it. This module measures that alignment
and correlates it with measured transfer.

Sentence representation (per layer): the mean of the hidden states over the sentence's real tokens (BOS
included, pads excluded), at every layer: the embeddings (`hook_embed`), the residual stream after each
block (`blocks.{i}.hook_resid_post`) and, for the last block, after the final norm -- the same L + 1
states, in the same order, as Hugging Face's `output_hidden_states`, which the paper's code averages.

Two scores per language X, per layer and averaged over layers:
  cosine    mean cosine similarity between each English sentence and its own translation. This is what the
            paper's released code (xg/retrieval/retrieval_acc_load.py) computes and reports as "retrieval
            accuracy"; kept for comparability with its numbers.
  accuracy  true top-1 retrieval accuracy, as the paper's text describes it: for each English sentence, is its
            translation the nearest (by cosine) of all N candidates? Reported en->X, X->en and their mean
            (`accuracy`); chance is 1/N. `--center` subtracts each language's mean representation first,
            a known fix for the anisotropy of decoder hidden states (all of them point one way).

    python retrieve.py score --langs de fr zh --limit 50 --out runs/retrieval
    python retrieve.py correlate --retrieval runs/retrieval/retrieval.json --transfer emt=runs/eval/compare.json:emt \\
        --transfer margin=runs/margins/margins.json:mean_margin --control runs/clean_ppl.json:log_ppl --out runs/corr
    python retrieve.py predict --out runs/retrieval
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from checkpoint import DEFAULT_MODEL
from loading import add_device_args, load_model, resolve_dtype
from model import pooled_activations
from report import check_outputs, exit_on_error, flag, markdown_table, scatter_svg, write_json, write_text
from stats import correlation_test, format_p, partial_correlation

SOURCE_LANG = "en"
TARGET_LANGS = tuple(lang for lang in data.LANGS if lang != SOURCE_LANG)
SCORES = ("cosine", "accuracy", "accuracy_en2xx", "accuracy_xx2en")

# -----------------------------------------------------------------------------
# Sentence representations


def layer_names(model):
    """Hook points whose mean-pooled states are the per-layer sentence representations: the embeddings, every
    block's output, and for the last block its final-normed output (HF's hidden_states[-1], which the
    paper's released code averages)."""
    return ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(model.config.n_layers - 1)] + \
        ["hook_final_norm"]


def sentence_reps(model, tokenizer, texts, batch_size=16, device="cpu", progress=None):
    """Per-layer mean-pooled representations of texts (BOS included, as in the paper's code):
    Tensor[n_layers + 1, N, d] (float32, on CPU), in input order."""
    names = layer_names(model)
    pooled = pooled_activations(model, tokenizer, texts, names, batch_size, device=device, progress=progress)
    return torch.stack([pooled["mean"][name] for name in names])


# -----------------------------------------------------------------------------
# Scores


def retrieval_scores(en_reps, xx_reps, center=False):
    """Retrieval scores of aligned sentence pairs (row i of en_reps translates row i of xx_reps).
    en_reps, xx_reps: [L, N, d] (or [N, d] for one layer). Returns {name: Tensor[L]}: cosine (mean cosine of
    true pairs), accuracy_en2xx / accuracy_xx2en (top-1 nearest-neighbour accuracy by cosine among all N
    candidates) and accuracy (their mean)."""
    en, xx = torch.as_tensor(en_reps).float(), torch.as_tensor(xx_reps).float()
    if en.dim() == 2:
        en, xx = en[None], xx[None]
    assert en.shape == xx.shape, f"en {tuple(en.shape)} and xx {tuple(xx.shape)} must be aligned"
    if center:  # per language and layer, so a shared offset direction cannot dominate every cosine
        en, xx = en - en.mean(1, keepdim=True), xx - xx.mean(1, keepdim=True)
    en, xx = F.normalize(en, dim=-1), F.normalize(xx, dim=-1)
    sim = en @ xx.transpose(1, 2)                       # [L, N_en, N_xx] cosines
    target = torch.arange(sim.shape[1])
    en2xx = (sim.argmax(2) == target).float().mean(1)   # [L]
    xx2en = (sim.argmax(1) == target).float().mean(1)
    return {"cosine": sim.diagonal(dim1=1, dim2=2).mean(1), "accuracy": (en2xx + xx2en) / 2,
            "accuracy_en2xx": en2xx, "accuracy_xx2en": xx2en}


# -----------------------------------------------------------------------------
# Data


def _dir_texts(data_dir, lang):
    """Sentences of one language from --data DIR: the .jsonl (field Prompt or prompt) or .txt file whose name
    names the language (data.lang_from_path: de.txt, my_de_set.jsonl)."""
    data_dir = Path(data_dir)
    files = sorted(f for f in data_dir.iterdir()
                   if f.suffix in (".jsonl", ".txt") and data.lang_from_path(f) == lang)
    if not files:
        raise FileNotFoundError(f"{data_dir}: no file for language {lang!r} (expected e.g. {lang}.txt or "
                                f"*_{lang}_*.jsonl)")
    if len(files) > 1:
        raise ValueError(f"{data_dir}: several files for language {lang!r}: {', '.join(f.name for f in files)}")
    return [row["prompt"] for row in data.load_prompts(files[0])], str(files[0])


def load_pair(lang, dataset="parallel", data_dir=None, limit=None):
    """(English sentences, their translations into lang), line-aligned, first `limit` pairs."""
    if dataset == "tatoeba":
        xx, en = data.load_tatoeba(lang)
    elif data_dir is not None:
        (en, en_file), (xx, xx_file) = _dir_texts(data_dir, SOURCE_LANG), _dir_texts(data_dir, lang)
        if len(en) != len(xx):
            raise ValueError(f"{xx_file}: {len(xx)} sentences but {en_file} has {len(en)}; files must be line-aligned")
    else:
        en, xx = data.load_parallel(SOURCE_LANG), data.load_parallel(lang)
        if len(en) != len(xx):
            raise ValueError(f"official-assets/translated_pairwise_data: {lang} has {len(xx)} prompts but en has {len(en)}")
    return en[:limit], xx[:limit]


# -----------------------------------------------------------------------------
# score: representations -> retrieval.json / retrieval.md


def _settings(args):
    """What determines the numbers; a saved run with other settings is not resumed."""
    return {"model": args.model, "dataset": args.dataset, "data": args.data, "limit": args.limit,
            "center": args.center, "dtype": args.dtype}


def score_languages(args):
    """Score every language of args.langs, resuming from args.out/retrieval.json when its settings match
    (languages scored there earlier are kept). The file is rewritten atomically after each language, so an
    interrupted run loses at most the language it was on."""
    out_json = Path(args.out) / "retrieval.json"
    settings = _settings(args)
    result = {"settings": settings, "languages": {}}
    if out_json.exists():
        saved = json.loads(out_json.read_text(encoding="utf-8"))
        if saved.get("settings") == settings:
            result = saved
            print(f"resuming {out_json}: {', '.join(saved['languages']) or 'no'} language(s) done")
        else:
            print(f"{out_json}: saved with other settings {saved.get('settings')}; starting over")
    todo = [lang for lang in args.langs if lang not in result["languages"]]
    if todo:
        t0 = time.perf_counter()
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        print(f"loaded {args.model} ({model.config.family}, {model.config.n_layers} layers) "
              f"in {time.perf_counter() - t0:.1f}s")
        result["n_layers"] = model.config.n_layers + 1
        result["layers"] = ["embed"] + [str(i) for i in range(1, model.config.n_layers + 1)]
        # The parallel sets share one English side, encoded once; Tatoeba's English differs per language.
        en_done, en_reps = None, None
        for lang in tqdm(todo, desc="languages"):
            en_texts, xx_texts = load_pair(lang, args.dataset, args.data, args.limit)
            t0 = time.perf_counter()
            if en_texts != en_done:
                en_reps = sentence_reps(model, tokenizer, en_texts, args.batch_size, args.device, "en batches")
                en_done = en_texts
            xx_reps = sentence_reps(model, tokenizer, xx_texts, args.batch_size, args.device, f"{lang} batches")
            per_layer = {k: v.tolist() for k, v in retrieval_scores(en_reps, xx_reps, args.center).items()}
            entry = {"n": len(xx_texts), **{k: float(np.mean(v)) for k, v in per_layer.items()},
                     "per_layer": per_layer, "seconds": round(time.perf_counter() - t0, 2)}
            result["languages"][lang] = entry
            write_json(out_json, result)
            tqdm.write(f"{lang}: cosine {entry['cosine']:.3f}  accuracy {entry['accuracy']:.3f} "
                       f"(en->{lang} {entry['accuracy_en2xx']:.3f}, {lang}->en {entry['accuracy_xx2en']:.3f}, "
                       f"chance {1 / entry['n']:.3f})  {entry['seconds']:.1f}s")
    result["languages"] = {lang: result["languages"][lang] for lang in TARGET_LANGS if lang in result["languages"]}
    write_json(out_json, result)
    return result


def retrieval_markdown(result):
    s = result["settings"]
    langs = list(result["languages"])
    rows = [[lang, e["n"], e["cosine"], e["accuracy"], e["accuracy_en2xx"], e["accuracy_xx2en"], 1 / e["n"],
             result["layers"][int(np.argmax(e["per_layer"]["accuracy"]))]] for lang, e in result["languages"].items()]
    text = (f"# Bilingual retrieval: {s['model']} ({s['data'] or s['dataset']}"
            f"{', mean-centred' if s['center'] else ''})\n\n"
            "Scores averaged over all layers (embeddings + every block). `cosine`: mean cosine between an English "
            "sentence and its translation (the paper's released code, reported there as 'retrieval accuracy'). "
            "`accuracy`: top-1 nearest-neighbour retrieval among all n candidates, mean of both directions.\n\n")
    text += markdown_table(["lang", "n", "cosine", "accuracy", "en->X", "X->en", "chance", "best layer"], rows)
    for name in ("accuracy", "cosine"):
        layer_rows = [[layer] + [result["languages"][lang]["per_layer"][name][i] for lang in langs]
                      for i, layer in enumerate(result["layers"])]
        text += f"\n## {name} per layer\n\n" + markdown_table(["layer"] + langs, layer_rows)
    return text


def run_score(args):
    result = score_languages(args)
    text = retrieval_markdown(result)
    write_text(Path(args.out) / "retrieval.md", text)
    print(text, end="")
    print(f"wrote {Path(args.out) / 'retrieval.json'} and retrieval.md")
    return result


# -----------------------------------------------------------------------------
# correlate: retrieval score vs measured transfer


def _number(value, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {json.dumps(value)[:60]}")
    return float(value)


def _dig(entry, fields, where):
    """entry[f1][f2]... as a float (null -> nan), or an error naming the missing field and the fields there are."""
    for name in fields:
        if not isinstance(entry, dict) or name not in entry:
            has = ", ".join(sorted(entry)) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{where}: missing field {name!r} (has: {has})")
        entry, where = entry[name], f"{where}.{name}"
    if entry is None:  # write_json stores NaN (e.g. a % change from a zero baseline) as null
        return float("nan")
    if isinstance(entry, dict):
        raise ValueError(f"{where}: entries are objects with fields {', '.join(sorted(entry))}; "
                         "choose one with --transfer NAME=PATH:KEY")
    return _number(entry, where)


def read_transfer(path, key=None):
    """Per-language transfer {lang: float} (non-finite values dropped) and a description of what was read.
    Accepts: evaluate.py --before/--after output ({"comparison": {lang: {metric: {before, after,
    change_pct}}}}: % change of `key`, default emt), {"languages": {lang: {"change_pct": {metric: ...}}}},
    margin files {lang: {"reward_accuracy": ..., "mean_margin": ...}} (pick a field with key), or {lang: number}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: transfer file not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object of languages, got {type(obj).__name__}")
    if "comparison" in obj:    # evaluate.py --before/--after
        entries, fields, what = obj["comparison"], [key or "emt", "change_pct"], f"% change in {key or 'emt'}"
    elif "languages" in obj:   # {"languages": {lang: {"before", "after", "change_pct": {metric: ...}}}}
        entries, fields, what = obj["languages"], ["change_pct", key or "emt"], f"% change in {key or 'emt'}"
    else:                      # margin transfer {lang: {field: ...}} or {lang: number}
        entries, fields, what = obj, [key] if key else [], key or "transfer"
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected an object of languages")
    values = {}
    for lang, entry in entries.items():
        if lang not in data.LANGS:
            continue  # the "average" row, metadata fields
        value = _dig(entry, fields, f"{path}: {lang}")
        if math.isfinite(value):
            values[lang] = value
    if not values:
        raise ValueError(f"{path}: no language code ({' '.join(data.LANGS)}) with a finite value")
    return values, what


def read_retrieval(path, score="cosine", layer=None):
    """{lang: retrieval score} from a retrieval.json: the mean over layers, or one layer (index or name)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: retrieval file not found (write it with: python retrieve.py score)")
    result = json.loads(path.read_text(encoding="utf-8"))
    if "languages" not in result or "layers" not in result:
        raise ValueError(f"{path}: not a retrieve.py score output (missing field 'languages' or 'layers')")
    if layer is None:
        return {lang: _dig(e, [score], f"{path}: {lang}") for lang, e in result["languages"].items()}, result
    layers = result["layers"]
    index = layers.index(layer) if layer in layers else int(layer) if str(layer).isdigit() else -1
    if not 0 <= index < len(layers):
        raise ValueError(f"{path}: no layer {layer!r} (layers: {', '.join(layers)}, or index 0-{len(layers) - 1})")
    return {lang: e["per_layer"][score][index] for lang, e in result["languages"].items()}, result


RETRIEVAL_METRICS = ("cosine", "accuracy")  # the paper's code (mean cosine of true pairs) and its text (top-1)
SIGN_CONVENTION = ("% change measures (EMT, ToxProb): negative = more detoxification, so retrieval predicting "
                   "transfer shows as a NEGATIVE r; margin / reward-accuracy measures: positive = more "
                   "detoxification, so it shows as a POSITIVE r.")


def parse_transfer_spec(spec):
    """'NAME=PATH:KEY' -> (name, path, key); NAME= and :KEY are optional (name defaults to the file stem[:key])."""
    name, sep, rest = spec.partition("=")
    if not sep:
        name, rest = None, spec
    path, sep, key = rest.rpartition(":")
    if not sep or not path or "/" in key:
        path, key = rest, None
    if not path:
        raise ValueError(f"--transfer {spec!r}: expected NAME=PATH:KEY")
    return name or (Path(path).stem + (f":{key}" if key else "")), path, key or None


def lower_is_more_detox(what):
    return what.startswith("% change")


def _tests(xs, ys, zs, args):
    out = {}
    for method in ("pearson", "spearman"):
        r, p = correlation_test(xs, ys, method, args.permutations, args.seed)
        out[method] = {"r": r, "p": p}
        if zs is not None:
            r, p = partial_correlation(xs, ys, zs, method, args.permutations, args.seed)
            out[f"partial_{method}"] = {"r": r, "p": p}
    return out


def read_control(spec):
    """{lang: value} of a --control PATH:KEY covariate, or None without one."""
    if not spec:
        return None
    path, _, key = spec.rpartition(":")
    if not path or not key:
        raise ValueError(f"--control {spec!r}: expected PATH:KEY (e.g. clean_ppl.json:log_ppl)")
    return read_transfer(path, key)[0]


def correlate_transfers(retrievals, control, args):
    """(rows, languages, skipped): one row of tests per transfer measure and retrieval metric; per language the
    values that went in; the transfer measures with too few languages to test."""
    rows, languages, skipped = [], {}, []
    for spec in args.transfer:
        name, path, key = parse_transfer_spec(spec)
        transfer, what = read_transfer(path, key)
        langs = [l for l in retrievals["cosine"] if l in transfer and (control is None or l in control)]
        need = 4 if control else 3  # a partial correlation spends one more degree of freedom
        if len(langs) < need:  # e.g. a % change of EMT is undefined where EMT starts at 0
            skipped.append({"transfer": name, "path": str(path), "key": key,
                            "reason": f"only {len(langs)} language(s) with a finite value shared with the "
                                      f"retrieval{' and the control' if control else ''}; need {need}+"})
            print(f"{name}: skipped, {skipped[-1]['reason']}")
            continue
        ys = [transfer[l] for l in langs]
        zs = [control[l] for l in langs] if control else None
        direction = "lower = more detoxification" if lower_is_more_detox(what) else "higher = more detoxification"
        for metric in RETRIEVAL_METRICS:
            xs = [retrievals[metric][l] for l in langs]
            rows.append({"transfer": name, "path": str(path), "key": key, "transfer_measure": what,
                         "direction": direction, "retrieval_metric": metric, "n": len(langs), "langs": langs,
                         "not_in_both": sorted((set(retrievals[metric]) ^ set(transfer)) - {SOURCE_LANG}),
                         **_tests(xs, ys, zs, args)})
        for l in langs:
            languages.setdefault(l, {m: retrievals[m][l] for m in RETRIEVAL_METRICS})[name] = transfer[l]
            if control:
                languages[l]["control"] = control[l]
    return rows, languages, skipped


TESTS = ("pearson", "spearman", "partial_pearson", "partial_spearman")


def add_bonferroni(rows):
    """Add p_bonferroni to every test of every row and return how many tests there are: the reader should weigh
    any one p against how many were computed."""
    n_variants = sum(1 for row in rows for k in TESTS if k in row)
    for row in rows:
        for k in TESTS:
            if k in row:
                row[k]["p_bonferroni"] = min(1.0, row[k]["p"] * n_variants)
    return n_variants


def correlation_markdown(out, layer):
    """correlation.md from run_correlate's result: the tests per transfer measure, then the values per language."""
    rows, languages, control = out["results"], out["languages"], out["control"]

    def stat(row, k):
        return [f"{row[k]['r']:+.2f}", format_p(row[k]["p"])] if k in row else []

    methods = list(TESTS if control else TESTS[:2])
    headers = ["transfer", "measure", "direction", "retrieval", "langs"]
    for m in methods:
        headers += [f"{m.replace('partial_', 'partial ').capitalize()} r", "p"]
    table = markdown_table(headers, [[r["transfer"], r["transfer_measure"], r["direction"], r["retrieval_metric"],
                                      r["n"]] + [x for m in methods for x in stat(r, m)] for r in rows])
    text = (f"# Retrieval vs transfer ({out['model']})\n\nx: retrieval ({layer}), both `cosine` (the paper's "
            f"code) and `accuracy` (top-1, the paper's text); y: each transfer measure. Sign convention: "
            f"{SIGN_CONVENTION}\n\n")
    if control:
        text += (f"Partial correlations control for `{control['spec']}` (how well the model knows each language), "
                 "residualised linearly (Spearman: on ranks).\n\n")
    text += table + (f"\n{out['n_variants']} correlation variants computed (p: two-sided, {out['permutations']} "
                     f"permutations each; JSON gives Bonferroni-adjusted p as p_bonferroni).\n")
    names = list(dict.fromkeys(r["transfer"] for r in rows))
    cols = list(RETRIEVAL_METRICS) + names + (["control"] if control else [])
    return text + "\n" + markdown_table(["lang"] + cols, [[l] + [v.get(c, "") for c in cols]
                                                          for l, v in languages.items()])


def correlation_svg(out, retrievals, layer):
    """Scatter of the first transfer measure against the retrieval cosine, with a fitted line."""
    first = out["results"][0]
    xs = [retrievals["cosine"][l] for l in first["langs"]]
    ys = [out["languages"][l][first["transfer"]] for l in first["langs"]]
    return scatter_svg(xs, ys, first["langs"], f"Retrieval vs {first['transfer']}, {first['n']} languages "
                       f"(Pearson r = {first['pearson']['r']:.2f})", f"retrieval cosine ({layer})",
                       first["transfer_measure"], fit=True)


def run_correlate(args):
    retrievals = {}
    for metric in RETRIEVAL_METRICS:
        retrievals[metric], result = read_retrieval(args.retrieval, metric, args.layer)
    control = read_control(args.control)
    rows, languages, skipped = correlate_transfers(retrievals, control, args)
    n_variants = add_bonferroni(rows)
    layer = "mean over layers" if args.layer is None else f"layer {args.layer}"
    out = {"retrieval": str(args.retrieval), "layer": args.layer, "model": result["settings"]["model"],
           "retrieval_metrics": list(RETRIEVAL_METRICS), "sign_convention": SIGN_CONVENTION,
           "control": {"spec": args.control, "values": control} if control else None,
           "permutations": args.permutations, "seed": args.seed, "n_variants": n_variants, "results": rows,
           "skipped": skipped, "languages": languages}
    out_dir = Path(args.out)
    write_json(out_dir / "correlation.json", out)
    text = correlation_markdown(out, layer)
    write_text(out_dir / "correlation.md", text)
    write_text(out_dir / "correlation.svg", correlation_svg(out, retrievals, layer))
    print(text, end="")
    print(f"{n_variants} correlation variants computed")
    print(f"wrote {out_dir / 'correlation.json'}, correlation.md, correlation.svg")
    return out


# -----------------------------------------------------------------------------
# predict: rank languages by retrieval alone, before any DPO run


def run_predict(args):
    if args.retrieval:
        scores, result = read_retrieval(args.retrieval, args.score)
    else:
        result = run_score(args)
        scores = {lang: e[args.score] for lang, e in result["languages"].items()}
    ranked = sorted(scores, key=lambda lang: -scores[lang])
    rows = [[rank, lang, scores[lang]] for rank, lang in enumerate(ranked, 1)]
    text = (f"# Predicted cross-lingual transfer of English DPO ({result['settings']['model']})\n\n"
            f"Languages ranked by retrieval `{args.score}` with English (mean over layers): the higher, the more "
            "detoxification is expected to carry over (Li, Yong & Bach 2024, Sec. 6).\n\n")
    text += markdown_table(["rank", "lang", args.score], rows)
    ranking = [{"rank": rank, "lang": lang, args.score: score} for rank, lang, score in rows]
    write_json(Path(args.out) / "prediction.json",
               {"score": args.score, "model": result["settings"]["model"], "ranking": ranking})
    write_text(Path(args.out) / "prediction.md", text)
    print(text, end="")
    print(f"wrote {Path(args.out) / 'prediction.json'} and prediction.md")
    return rows


# -----------------------------------------------------------------------------
# CLI


def scoring_flags():
    """The flags of every command that runs the model on sentence pairs (score, predict)."""
    scoring = argparse.ArgumentParser(add_help=False)
    scoring.add_argument("--model", default=DEFAULT_MODEL,
                         help="loading.load_model name or path: HF dir, .gguf, hub id, or an embedded name "
                              "(default: %(default)s)")
    scoring.add_argument("--dataset", choices=("parallel", "tatoeba"), default="parallel",
                         help="parallel: the paper's 200 toxic prompts, one English side for all languages "
                              "(default); tatoeba: 1,000 everyday sentence pairs per language (English differs)")
    scoring.add_argument("--data", metavar="DIR", default=None,
                         help="instead of the paper's parallel prompts under the data root, read DIR/*_{lang}_*.jsonl (field Prompt "
                              "or prompt) or DIR/{lang}.txt (one sentence per line), line-aligned with English")
    scoring.add_argument("--langs", nargs="+", choices=TARGET_LANGS, default=list(TARGET_LANGS), metavar="LANG",
                         help=f"languages to pair with English (default: all 16: {' '.join(TARGET_LANGS)})")
    scoring.add_argument("--limit", type=int, default=None, help="use only the first N sentence pairs (quick runs)")
    scoring.add_argument("--center", action="store_true",
                         help="subtract each language's mean representation (per layer) before both scores; "
                              "fixes anisotropy for `accuracy`, but `cosine` is then no longer the paper's number")
    scoring.add_argument("--batch-size", type=int, default=16, help="sentences per forward pass (default 16)")
    add_device_args(scoring)  # pooling is always in fp32
    scoring.add_argument("--out", required=True, metavar="DIR", help="output folder; an interrupted run resumes")
    return scoring


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip() + "\n\n" + __doc__.split("\n\n")[1].strip() + "\n\n"
        + __doc__.split("\n\n")[2].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python retrieve.py score --langs de fr zh --limit 50 --out runs/retrieval\n"
               "  python retrieve.py score --dataset tatoeba --center --out runs/retrieval_tatoeba\n"
               "  python retrieve.py correlate --retrieval runs/retrieval/retrieval.json \\\n"
               "      --transfer runs/eval/after.lexicon.compare.json --out runs/retrieval\n"
               "  python retrieve.py predict --out runs/retrieval")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{score,correlate,predict}")

    scoring = scoring_flags()

    sub.add_parser("score", parents=[scoring], help="score English-X retrieval per layer -> retrieval.json/.md",
                   description="Mean-pooled per-layer sentence representations of English and each language; "
                               "cosine (the paper's released-code score) and top-1 retrieval accuracy, per layer "
                               "and averaged over layers.").set_defaults(run=run_score)

    corr = sub.add_parser("correlate", help="correlate a retrieval score with measured transfer",
                          description="Pearson and Spearman r, with two-sided permutation p-values, between each "
                                      "retrieval metric (cosine and top-1 accuracy, side by side) and every transfer "
                                      "measure given, optionally partial on a --control; prints how many variants "
                                      "were computed. Markdown table and SVG scatter. " + SIGN_CONVENTION)
    corr.add_argument("--retrieval", required=True, metavar="JSON", help="retrieval.json written by `score`")
    corr.add_argument("--transfer", required=True, action="append", metavar="NAME=PATH:KEY",
                      help="a transfer measure (repeatable): an evaluate.py --before/--after JSON (KEY: a metric, "
                           "default emt; its %% change is read), a margin file {lang: {mean_margin, "
                           "reward_accuracy}} (KEY: the field), or {lang: number}; NAME= labels it")
    corr.add_argument("--control", metavar="PATH:KEY", default=None,
                      help="a per-language covariate for partial correlations, e.g. how well the model knows the "
                           "language: clean_ppl.json:log_ppl from `evaluate.py clean-ppl`")
    corr.add_argument("--layer", default=None,
                      help="use one layer (index, or name: embed, 1 .. L) instead of the mean over layers")
    corr.add_argument("--permutations", type=int, default=10000, help="permutations for the p-values (default 10000)")
    corr.add_argument("--seed", type=int, default=0, help="seed of the permutations (default 0: reproducible p)")
    corr.add_argument("--out", required=True, metavar="DIR", help="writes correlation.json, .md and .svg here")
    corr.set_defaults(run=run_correlate)

    pred = sub.add_parser("predict", parents=[scoring],
                          help="rank languages by expected transfer from retrieval alone",
                          description="Rank languages by retrieval with English, the paper's predictor of how "
                                      "much English-only DPO transfers; run it before spending compute on DPO.")
    pred.add_argument("--score", choices=SCORES, default="cosine", help="score to rank by (default cosine)")
    pred.add_argument("--retrieval", metavar="JSON", default=None,
                      help="rank an existing retrieval.json instead of running the model")
    pred.set_defaults(run=run_predict)
    for command in sub.choices.values():
        data.add_root_flag(command)
    return parser


# What each command writes into --out.
OUTPUTS = {"score": ("retrieval.json", "retrieval.md"), "predict": ("prediction.json", "prediction.md"),
           "correlate": ("correlation.json", "correlation.md", "correlation.svg")}


def check_out(args):
    """report.check_outputs on the command's files in --out against every file it reads (the model, --data,
    --retrieval, and the PATH of each NAME=PATH:KEY)."""
    specs = [spec.split("=", 1)[-1] for spec in getattr(args, "transfer", None) or []]
    specs.append(getattr(args, "control", None))
    read = [spec if spec is None or Path(spec).exists() else spec.rsplit(":", 1)[0] for spec in specs]
    inputs = [(flag(dest), getattr(args, dest, None)) for dest in ("model", "data", "retrieval")]
    check_outputs([("--out", Path(args.out) / name) for name in OUTPUTS[args.command]],
                  inputs + [("--transfer/--control", path) for path in read], folders=[("--out", args.out)])


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    data.apply_root_flag(args)
    check_out(args)
    if args.command in ("score", "predict"):
        if args.limit is not None and args.limit < 2:
            parser.error("--limit must be >= 2 (retrieval needs candidates)")
        if args.batch_size < 1:
            parser.error("--batch-size must be >= 1")
        if args.data and args.dataset == "tatoeba":
            parser.error("--data and --dataset tatoeba exclude each other")
        args.dtype = resolve_dtype(args.device, args.dtype)
    if args.command == "correlate" and args.permutations < 1:
        parser.error("--permutations must be >= 1")
    return args.run(args)


if __name__ == "__main__":
    exit_on_error(main)
