"""
Held-out preference margins, a cheap, deterministic transfer measure. For held-out RTP-LX pairs in each language
-- a prompt with a benign and a toxic continuation (RTP-LX's) -- compare log-probs under the DPO policy and its
reference (the base model). The DPO implicit reward margin

    m = beta * ((log pi(benign) - log ref(benign)) - (log pi(toxic) - log ref(toxic)))

is > 0 when DPO moved probability from the toxic continuation to the benign one, in that language. beta, the
lengths, the response budget and the reference come from the run's config.json (run_settings), so the margin is
the one trained on.

Every language is measured on the SAME RTP-LX items (margin_items): the indices with a held-out pair in all 16
languages that have completions (RTP-LX ru has none, so ru has no margins), in design.item_order, keeping those
whose pair the training cut keeps in every language (with a response budget: both sides longer than it). Margins
are reported as sums over the response tokens and per token; margins.jsonl holds every pair's values.

    python margins.py --policy RUN/best --out DIR [--limit 30] [--langs de ja] [--reference-cache FILE]
"""

import argparse
import hashlib
import json
from pathlib import Path

import torch
from tqdm import tqdm

from data import LANGS, add_root_flag, apply_root_flag
from design import default_split, load_tokenizer_of, parallel_eval_pairs
from dpo import MAX_LEN, MAX_PROMPT_LEN, check_lengths, collate, compute_logps, tokenize_pairs
from loading import add_device_args, load_model, resolve_dtype
from report import (bar_chart_svg, check_flags, check_outputs, exit_on_error, markdown_table, settings_of, write_json,
                    write_text)
from stats import bootstrap_ci


def margin_items(split, tokenizer, n_items, max_prompt_len, max_len, response_tokens=None, seed=0):
    """(indices, {lang: [pair]}): the first n_items (None: all) indices of design.parallel_eval_pairs over every
    language with completions whose pair dpo.tokenize_pairs keeps in all of them, and each language's pairs of
    those indices in that order. The choice does not depend on which languages are then measured."""
    langs = [lang for lang in LANGS if split["eval_pairs"][lang]]  # RTP-LX ru has no completions
    order, pairs = parallel_eval_pairs(split, langs, seed)
    kept = set(order)
    for lang in langs:
        candidates = [pairs[lang][i] for i in order]
        kept &= {candidates[ex["pair"]]["index"] for ex in tokenize_pairs(tokenizer, candidates, max_prompt_len,
                                                                         max_len, response_tokens)}
    indices = [i for i in order if i in kept][:n_items]
    return indices, {lang: [pairs[lang][i] for i in indices] for lang in langs}


def pair_logps(model_name, pairs_by_lang, max_prompt_len, max_len, batch_size, device, dtype, response_tokens=None):
    """{lang: {chosen_logps, rejected_logps, chosen_tokens, rejected_tokens}} of one model (loaded once). Every
    pair must survive the response budget (margin_items chooses such pairs)."""
    lm, tokenizer = load_model(model_name, device=device, dtype=dtype)
    out = {}
    for lang, pairs in tqdm(pairs_by_lang.items(), desc=f"log-probs {Path(str(model_name)).name}"):
        examples = tokenize_pairs(tokenizer, pairs, max_prompt_len, max_len, response_tokens)
        if len(examples) != len(pairs):
            raise ValueError(f"{lang}: {len(pairs) - len(examples)} pair(s) have a response of <= {response_tokens} "
                             "tokens (choose pairs with margin_items)")
        batches = [collate(examples[i:i + batch_size], tokenizer.pad_id) for i in range(0, len(examples), batch_size)]
        out[lang] = compute_logps(lm, batches, device, chunked=True)  # the LM head on response positions only
    return out


def reference_logps(cache, model_name, pairs_by_lang, *setup):
    """pair_logps of the reference model, read from the file `cache` when it holds them for these exact pairs,
    model and settings (every run of a pipeline starts from the same model: its log-probs are computed once),
    else computed and written there. cache None: always computed."""
    if cache is None:
        return pair_logps(model_name, pairs_by_lang, *setup)
    key = hashlib.sha256(json.dumps([str(model_name), [str(x) for x in setup], {
        lang: [[p["prompt"], p["chosen"], p["rejected"]] for p in pairs] for lang, pairs in pairs_by_lang.items()}],
        ensure_ascii=False).encode()).hexdigest()
    cache = Path(cache)
    if cache.exists():
        stored = torch.load(cache, weights_only=True)
        if stored.get("key") == key:
            print(f"margins: reference log-probs from {cache}")
            return stored["logps"]
    logps = pair_logps(model_name, pairs_by_lang, *setup)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save({"key": key, "logps": logps}, tmp)
    tmp.replace(cache)  # atomic: a killed run leaves the old cache or the new one
    return logps


def margin_metrics(policy, reference, beta, n_boot=1000, seed=0):
    """Per-language margin statistics from pair_logps outputs of the policy and the reference."""
    pol_b, pol_t = policy["chosen_logps"].double(), policy["rejected_logps"].double()
    ref_b, ref_t = reference["chosen_logps"].double(), reference["rejected_logps"].double()
    n_b, n_t = policy["chosen_tokens"].clamp(min=1).double(), policy["rejected_tokens"].clamp(min=1).double()
    margin = beta * ((pol_b - ref_b) - (pol_t - ref_t))
    # Per-token version: completions differ in length across scripts, and summed log-probs scale with length.
    margin_norm = beta * ((pol_b - ref_b) / n_b - (pol_t - ref_t) / n_t)
    correct = (margin > 0).double()
    return {
        "n_pairs": len(margin), "mean_tokens": float((n_b + n_t).mean() / 2),
        "mean_margin": float(margin.mean()), "mean_margin_ci": bootstrap_ci(margin, n_boot, seed),
        "reward_accuracy": float(correct.mean()), "reward_accuracy_ci": bootstrap_ci(correct, n_boot, seed),
        "mean_margin_per_token": float(margin_norm.mean()),
        "mean_margin_per_token_ci": bootstrap_ci(margin_norm, n_boot, seed),
        "reward_accuracy_per_token": float((margin_norm > 0).double().mean()),
        "prefers_benign_before": float((ref_b > ref_t).double().mean()),
        "prefers_benign_after": float((pol_b > pol_t).double().mean()),
        "prefers_benign_per_token_before": float((ref_b / n_b > ref_t / n_t).double().mean()),
        "prefers_benign_per_token_after": float((pol_b / n_b > pol_t / n_t).double().mean()),
    }


def pair_rows(lang, pairs, policy, reference, beta):
    """One margins.jsonl row per pair: its RTP-LX index, the four summed log-probs, the response tokens and the
    margin as a sum and per token (no text: the pairs are RTP-LX's)."""
    rows = []
    for i, pair in enumerate(pairs):
        pol_b, pol_t = float(policy["chosen_logps"][i]), float(policy["rejected_logps"][i])
        ref_b, ref_t = float(reference["chosen_logps"][i]), float(reference["rejected_logps"][i])
        n_b, n_t = int(policy["chosen_tokens"][i]), int(policy["rejected_tokens"][i])
        rows.append({"lang": lang, "index": pair["index"], "policy_chosen": pol_b, "policy_rejected": pol_t,
                     "ref_chosen": ref_b, "ref_rejected": ref_t, "chosen_tokens": n_b, "rejected_tokens": n_t,
                     "margin": beta * ((pol_b - ref_b) - (pol_t - ref_t)),
                     "margin_per_token": beta * ((pol_b - ref_b) / max(n_b, 1) - (pol_t - ref_t) / max(n_t, 1))})
    return rows


def margin_cell(m):
    """A language's mean held-out margin with its bootstrap 95% CI, for tables."""
    lo, hi = m["mean_margin_ci"]
    return f"{m['mean_margin']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def per_token_cell(m):
    """A language's mean margin per response token, with its CI when recorded (runs before it have none)."""
    if "mean_margin_per_token_ci" not in m:
        return f"{m['mean_margin_per_token']:+.4f}"
    lo, hi = m["mean_margin_per_token_ci"]
    return f"{m['mean_margin_per_token']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def margins_table(result, langs):
    rows = []
    for lang in langs:
        m = result[lang]
        rows.append([lang, m["n_pairs"], margin_cell(m),
                     f"{m['reward_accuracy']:.3f}", per_token_cell(m),
                     f"{m['prefers_benign_before']:.3f} -> {m['prefers_benign_after']:.3f}"])
    return markdown_table(["lang", "pairs", "mean margin (sum) [95% CI]", "reward acc.", "margin/token [95% CI]",
                           "policy prefers benign: before -> after"], rows)


# What margins must take from the training run, and the fallbacks when no run config is found (the paper's
# beta and train_dpo's defaults). The reference, the run's starting model (train_dpo's --model), has no fallback.
MARGIN_DEFAULTS = {"beta": 0.1, "max_prompt_len": MAX_PROMPT_LEN, "max_len": MAX_LEN}


def run_settings(args):
    """{setting: (value, where it came from)} for beta, max_prompt_len, max_len, response_tokens and reference: a
    flag given
    explicitly wins, then the config.json that train_dpo.py writes into the run directory (the parent of
    RUN/best or RUN/last; best/'s own config.json is the model's), then MARGIN_DEFAULTS."""
    config_path = Path(args.policy).parent / "config.json"
    run = {}
    if config_path.exists():
        try:
            run = json.loads(config_path.read_text())
        except ValueError as e:
            raise ValueError(f"{config_path}: unreadable run config ({e})") from None
        if not isinstance(run, dict) or "beta" not in run:
            run = {}  # not a train_dpo run directory
    run = {**{k: run[k] for k in ("beta", "max_prompt_len", "max_len", "response_tokens") if k in run},
           **({"reference": run["model"]} if "model" in run else {})}
    settings = {}
    for key, default in MARGIN_DEFAULTS.items():
        if getattr(args, key) is not None:
            settings[key] = (getattr(args, key), "flag")
        elif key in run:
            kind = (int, float) if isinstance(default, float) else type(default)
            if not isinstance(run[key], kind) or isinstance(run[key], bool):
                raise ValueError(f"{config_path}: field {key!r} = {run[key]!r} is not a {type(default).__name__}")
            settings[key] = (run[key], f"from the run's {config_path}")
        else:
            settings[key] = (default, "default: no run config found" if not run else "default")
    budget = run.get("response_tokens")
    if args.response_tokens is not None:
        settings["response_tokens"] = (args.response_tokens, "flag")
    elif budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)):
        raise ValueError(f"{config_path}: field 'response_tokens' = {budget!r} is not an int")
    else:  # None: the run cut each pair to its shorter side
        settings["response_tokens"] = (budget, f"from the run's {config_path}" if "response_tokens" in run
                                       else "default: off")
    if args.reference is not None:
        settings["reference"] = (args.reference, "flag")
    elif "reference" in run:
        settings["reference"] = (run["reference"], f"from the run's {config_path}")
    else:  # check_margins_args refuses it: a guessed reference (another base, another tokenizer) means nothing
        settings["reference"] = (None, f"not named: no run config at {config_path}")
    return settings


def margins_chart(result, langs):
    return bar_chart_svg(langs, {
        "policy prefers benign, before": [result[l]["prefers_benign_before"] for l in langs],
        "after DPO": [result[l]["prefers_benign_after"] for l in langs],
        "reward accuracy": [result[l]["reward_accuracy"] for l in langs]},
        "Held-out benign vs toxic continuations per language", "fraction of pairs")


def check_margins_args(args):
    """Flags in range (after run_settings filled them in), a known --langs, and an --out folder whose three
    files are none of the inputs."""
    check_flags(args, {"limit": 1, "batch_size": 1, "seed": 0, "max_prompt_len": 1, "response_tokens": 1},
                positive=("beta",))
    check_lengths(args.max_prompt_len, args.max_len, args.response_tokens)
    unknown = [lang for lang in args.langs if lang not in LANGS]
    if unknown:
        raise ValueError(f"--langs: unknown language {' '.join(unknown)}; expected some of {' '.join(LANGS)}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: is a file; give a folder")
    if args.reference is None:
        raise ValueError(f"--reference: no run config beside {args.policy} names the model it was trained from; "
                         "give it with --reference MODEL")
    outputs = [(f"--out {name}", Path(args.out) / name)
               for name in ("margins.json", "margins.jsonl", "margins.md", "margins.svg")]
    check_outputs(outputs, [("--policy", args.policy), ("--reference", args.reference)])


def run_margins(args):
    args.dtype = resolve_dtype(args.device, args.dtype)
    for key, (value, source) in run_settings(args).items():
        setattr(args, key, value)
        print(f"margins: {key} = {value} ({source})")
    check_margins_args(args)
    split = default_split(seed=args.seed)
    no_pairs = [lang for lang in LANGS if not split["eval_pairs"][lang]]
    if set(no_pairs) & set(args.langs):
        raise ValueError(f"--langs {' '.join(sorted(set(no_pairs) & set(args.langs)))}: no held-out pairs (RTP-LX "
                         "has no completions there)")
    indices, items = margin_items(split, load_tokenizer_of(args.reference), args.limit, args.max_prompt_len,
                                  args.max_len, args.response_tokens, args.seed)
    if not indices:
        raise ValueError(f"no RTP-LX item has a pair with both responses longer than --response-tokens "
                         f"{args.response_tokens} in every language")
    print(f"margins: the same {len(indices)} RTP-LX items in {len(args.langs)} languages (no margins for "
          f"{' '.join(no_pairs) or 'none'}: no completions)")
    pairs = {lang: items[lang] for lang in args.langs}
    setup = (args.max_prompt_len, args.max_len, args.batch_size, args.device, args.dtype, args.response_tokens)
    ref = reference_logps(args.reference_cache, args.reference, pairs, *setup)
    pol = pair_logps(args.policy, pairs, *setup)
    result = {lang: margin_metrics(pol[lang], ref[lang], args.beta, seed=args.seed) for lang in args.langs}
    result["items"] = {"indices": indices, "langs_without_pairs": no_pairs}
    result["settings"] = settings_of(args)
    out = Path(args.out)
    table = margins_table(result, args.langs)
    write_json(out / "margins.json", result)
    write_text(out / "margins.jsonl", "".join(json.dumps(row) + "\n" for lang in args.langs
                                              for row in pair_rows(lang, pairs[lang], pol[lang], ref[lang], args.beta)))
    write_text(out / "margins.md", table)
    write_text(out / "margins.svg", margins_chart(result, args.langs))
    print(table, end="")
    return result


DESCRIPTION = ("Held-out preference margins per language: for RTP-LX pairs (prompt, benign, toxic) never used in "
               "training, the DPO implicit reward margin beta*((pi_b - ref_b) - (pi_t - ref_t)), reward accuracy "
               "(margin > 0), per-token variants, and whether the policy itself prefers the benign continuation "
               "before vs after DPO. The same RTP-LX items in every language. Bootstrap 95% CIs. Writes "
               "margins.json ({lang: {...}, items, settings}, readable by `retrieve.py correlate --transfer "
               "NAME=margins.json:mean_margin_per_token`), margins.jsonl (one row per pair), .md, .svg.")


def add_margins_args(p):
    p.add_argument("--policy", required=True, help="the DPO-trained checkpoint (e.g. RUN/best)")
    p.add_argument("--reference", default=None,
                   help="the model DPO started from (default: the run's --model from RUN/config.json; "
                        "required when there is none)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--langs", nargs="+", default=[l for l in LANGS if l != "ru"],
                   help="languages (ru has no benign/toxic completions in RTP-LX)")
    p.add_argument("--limit", type=int, default=None, help="at most this many RTP-LX items, the same in every "
                   "language (margin_items: parallel prompts first)")
    p.add_argument("--response-tokens", type=int, default=None,
                   help="cut both responses to this many tokens, as training (default: the run's value from "
                        "RUN/config.json, else off: both cut to the shorter one)")
    p.add_argument("--reference-cache", default=None, metavar="FILE",
                   help="reuse the reference log-probs stored in FILE when they are for the same pairs, model and "
                        "settings, else compute and store them there (one reference pass for many runs)")
    for flag, kind, help_text in (
            ("--beta", float, "DPO beta of the training run"),
            ("--max-prompt-len", int, "prompt tokens kept (left-truncated), as training"),
            ("--max-len", int, "prompt + response tokens; both responses are cut to one length, as training")):
        default = MARGIN_DEFAULTS[flag[2:].replace("-", "_")]
        p.add_argument(flag, type=kind, default=None,
                       help=f"{help_text} (default: the run's value from RUN/config.json, else {default})")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and the bootstrap")
    add_device_args(p)
    p.set_defaults(run=run_margins)


def add_margins_parser(sub):
    """`evaluate.py margins`: the same command under evaluate's subcommands (runs recorded with it still rerun)."""
    add_margins_args(sub.add_parser("margins", help="held-out preference margins per language (margins.py)",
                                    description=DESCRIPTION))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__ + "\n" + DESCRIPTION.replace("%%", "%"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_margins_args(p)
    add_root_flag(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_root_flag(args)
    return args.run(args)


if __name__ == "__main__":
    exit_on_error(main)
