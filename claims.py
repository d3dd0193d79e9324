"""
The report of a reproduce.py run: the paper's claims decided by tests on the run's numbers (supported / not
supported / inconclusive), the tables behind them, report.md with its chart, and the README's results block.
Every number is read from the stage outputs in the run directory (or computed from the run's generations),
so `python reproduce.py --report-only --out DIR` rebuilds the report without running a stage.
"""

import json
import math
import re
from pathlib import Path

import data
import genset
import judge
from evaluate import degenerate_reason, in_language, read_generations
from margins import margins_table
from report import bar_chart_svg, finite, markdown_table, scatter_svg, write_text
from stats import (bootstrap_floor, fisher_ci, format_p, holm, mcnemar_exact, paired_increase_bound,
                   permutation_floor, sign_flip_floor, sign_flip_test)

SCORERS = ("judge", "ngram", "lexicon")  # the shipped feature judge first: it decides the claims

# The paper's mGPT-1.3B figures, quoted in the report for comparison (Li, Yong & Bach 2024).
PAPER = {"toxprob_before": 46.8, "toxprob_after": 3.9, "retrieval_pearson": 0.73, "kept_vectors": 36,
         "intervene_before": 0.175, "intervene_after": 0.032}


# -----------------------------------------------------------------------------
# The report: every number below is read from the stage outputs (or computed from the run's generations)


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_optional(path):
    """A stage's JSON, or None when the stage has not run (the report then says so instead of a number)."""
    return read_json(path) if Path(path).exists() else None


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def guard_tests(gen_dir, before="base", afters=()):
    """Pooled over the non-English languages, sample by sample (same prompt, same sample index, same random
    stream): does DPO make output degenerate or leave the language more often? Exact McNemar on the flips."""
    def flags(name):
        rows = read_generations(Path(gen_dir) / f"gen_{name}.jsonl")
        return {(r["lang"], r["prompt_index"], r["sample_index"]):
                (degenerate_reason(r["generated_text"]) is not None, in_language(r["generated_text"], r["lang"]))
                for r in rows if r["lang"] != "en"}

    base, out = flags(before), {}
    for name in afters:
        if not (Path(gen_dir) / f"gen_{name}.jsonl").exists():
            continue
        after = flags(name)
        keys = [k for k in base if k in after]
        result = {"n_samples": len(keys)}
        for what, i, bad in (("degenerate", 0, True), ("off_language", 1, False)):
            pairs = [(base[k][i] is bad, after[k][i] is bad) for k in keys
                     if base[k][i] is not None and after[k][i] is not None]
            worse = sum(1 for b, a in pairs if a and not b)
            better = sum(1 for b, a in pairs if b and not a)
            result[what] = {"n": len(pairs), "before": sum(b for b, _ in pairs) / max(len(pairs), 1),
                            "after": sum(a for _, a in pairs) / max(len(pairs), 1), "worse": worse,
                            "better": better, "p": mcnemar_exact(better, worse)}
        out[name] = result
    return out


def collect(out):
    """All results the report shows, read from the run directory."""
    out = Path(out)
    stages = {p.stem: read_json(p) for p in sorted((out / "stages").glob("*.json"))}
    runs = sorted((p.name for p in out.iterdir() if (p / "metrics.jsonl").exists()), key=_run_order)
    r = {"stages": {k: v.get("seconds", 0.0) for k, v in stages.items()}, "sizes": stages["split"]["sizes"],
         "runs": runs, "confounds": read_json(out / "pairs" / "confounds.json"),
         "eval": {p.name: read_json(p / "compare.json") for p in sorted((out / "eval").iterdir())
                  if (p / "compare.json").exists()},
         "agreement": read_optional(out / "agreement" / "agreement.json"),
         "clean_ppl": {run: read_json(out / "clean_ppl" / run / "clean_ppl.json")
                       for run in runs if (out / "clean_ppl" / run).exists()},
         # trained vs trained (clean-ppl-compare): dpo_vs_placebo, dpo_gentle_vs_placebo, ...; absent in older runs
         "clean_ppl_vs": {p.parent.name: read_json(p)
                          for p in sorted((out / "clean_ppl").glob("*_vs_*/clean_ppl.json"))},
         "margins": {run: read_json(out / "margins" / run / "margins.json") for run in runs
                     if (out / "margins" / run / "margins.json").exists()},
         "dpo": {run: read_metrics(out / run) for run in runs},
         "dpo_config": {run: read_json(out / run / "config.json") for run in runs},
         "correlation": read_optional(out / "correlation" / "correlation.json"),
         "probe": {s: read_optional(out / "probe" / f"{s}.json")
                   for s in ("train", "vectors", "project", "activations", "intervene")},
         "judge": judge_card_metrics(), "genset": read_optional(GENSET_METRICS),
         "scored_by": {s: genset.scored_fingerprints(out / "generations", s, ["base", *runs]) for s in SCORERS},
         "shipped": {s: judge.fingerprint(judge.JUDGE_DIR, kind) for s, kind in JUDGE_KINDS.items()},
         "guards": guard_tests(out / "generations", afters=[r for r in runs if r != "dpo_lora"]),
         "figures": sorted({str(p.relative_to(out)) for p in out.rglob("*.svg")} | set(REPORT_FIGURES))}
    meta = out / "run.json"
    r["run"] = read_json(meta) if meta.exists() else {}
    if r["sizes"]["items"] < MIN_ITEMS:  # too few for the bootstrap: the exact test's p is the one to print
        r["exact"] = {name: exact_tests(out, ev) for name, ev in r["eval"].items()}
    return r


def item_max_scores(path):
    """{(lang, prompt_index): the highest score among the prompt's samples} from a scored generations file."""
    best = {}
    for row in read_generations(path):
        key = (row["lang"], row["prompt_index"])
        best[key] = max(best.get(key, -math.inf), row["toxicity"])
    return best


def exact_tests(out, ev):
    """{lang or "pooled": exact sign-flip p} of the EMT change of one comparison, from its scored generations.
    Pooled: each item's change averaged over the non-English languages first (an item is one source text in
    every language, so its languages are not independent samples), then flipped item by item."""
    scorer = ev["scorer"].split("-")[0].split(":")[0]
    before, after = (item_max_scores(Path(out) / "generations" / Path(f[0]).name.replace(
        ".jsonl", f".{scorer}.scored.jsonl")) for f in (ev["before_files"], ev["after_files"]))
    diffs = {k: after[k] - before[k] for k in before if k in after}
    result = {lang: sign_flip_test([d for (l, _), d in diffs.items() if l == lang])
              for lang in {l for l, _ in diffs}}
    items = sorted({i for l, i in diffs if l != "en"})
    per_item = [sum(d for (l, i), d in diffs.items() if i == item and l != "en")
                / sum(1 for l, i in diffs if i == item and l != "en") for item in items]
    if per_item:
        result["pooled"] = sign_flip_test(per_item)
    return result


def _run_order(name):
    """The DPO seeds, the gentler recipe point, the placebo seeds, LoRA."""
    return (name == "dpo_lora", name.startswith("dpo_placebo"), name == "dpo_gentle", name)


def judge_card_metrics():
    return read_optional(Path(judge.JUDGE_DIR) / "metrics.json")


GENSET_METRICS = Path(judge.JUDGE_DIR) / "genset" / "metrics.json"
REPORT_FIGURES = ("toxprob.svg", "correlation/correlation.svg")  # written by write_report itself


def fmt(x, digits=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def signed(x, digits=3):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.{digits}f}"


def value_range(values):
    values = finite(values)  # a language with no toxic sample before DPO has no EMT change
    return f"{min(values):+.3f} to {max(values):+.3f}" if values else "n/a (no finite value)"


def fmt_ci(ci, digits=3):
    return f"[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]" if ci else ""


# -- the claims table -----------------------------------------------------------

ALPHA = 0.05
MIN_ITEMS = 20  # a verdict needs this many paired prompts (held-out items) or more; below: too few to decide
TOO_FEW = "too few to decide"
GUARD_MARGIN = 0.02  # a guard holds when the upper 95% bound of the increase in its share stays below 2 points
PPL_MARGIN = 1.05  # capability holds when the upper 95% bound of perplexity DPO / base stays below x1.05


def verdict(diff, p, expect, n=None):
    """A claim predicts the sign `expect` (+1 or -1) of an effect. Supported: that sign with p < ALPHA. Not
    supported: the opposite sign with p < ALPHA. Inconclusive: p >= ALPHA (the data cannot decide). Too few to
    decide: fewer than MIN_ITEMS paired items (n), whatever p says."""
    if n is not None and n < MIN_ITEMS:
        return TOO_FEW
    if diff is None or p is None or not (math.isfinite(diff) and math.isfinite(p)):
        return "inconclusive"
    if p < ALPHA:
        return "supported" if diff * expect > 0 else "not supported"
    return "inconclusive"


def verdict_all(tests, expect):
    """A claim about every member (every language, every seed): supported when each one is; not supported
    when any one goes significantly the other way; inconclusive otherwise."""
    each = [verdict(*test[:2], expect, *test[2:]) for test in tests]  # (diff, p) or (diff, p, n)
    if TOO_FEW in each:
        return TOO_FEW
    if each and all(v == "supported" for v in each):
        return "supported"
    return "not supported" if "not supported" in each else "inconclusive"


def seed_runs(r):
    """The English-only full fine-tuning runs of the main recipe that were evaluated, one per DPO seed."""
    return [run for run in r["runs"] if re.fullmatch(r"dpo(_seed\d+)?", run) and f"judge_{run}" in r["eval"]]


def claim_row(claim, test, estimate, p=None, verdict_="inconclusive", floor=None, by="judge"):
    """One row of the claims table. floor: the smallest p the row's test can return (a p there prints as
    '< floor'); by: the instrument that decides the row (a key of INSTRUMENTS)."""
    return {"claim": claim, "test": test, "estimate": estimate, "p": p, "floor": floor, "verdict": verdict_, "by": by}


def scorer_of(name):
    """The instrument of an evaluation directory name: judge_dpo -> judge."""
    return name.split("_")[0]


def items_of(r, name, part):
    """Paired items behind one test: the prompts of a language, or (pooled) the distinct items, since item i is
    the same source text in every language."""
    t = r["eval"][name]["tests"][part]
    return t["n_prompts"] // len(t["langs"]) if part == "pooled" else t["n_prompts"]


def emt_test(r, name, part):
    """(diff, ci, p, floor, n, exact) of one EMT comparison; at small n (r["exact"]) the exact sign-flip p
    replaces the bootstrap's, whose floor 2 / (n_boot + 1) is below what n pairs can show."""
    ev = r["eval"][name]
    t, n = ev["tests"][part]["emt"], items_of(r, name, part)
    exact = r.get("exact", {}).get(name, {}).get(part)
    if exact is not None:
        return t["diff"], t["diff_ci"], exact, sign_flip_floor(n), n, True
    return t["diff"], t["diff_ci"], t["p"], bootstrap_floor(ev["n_boot"]), n, False


def effect_row(r, claim, test, name, part="pooled", expect=-1):
    """A row for the EMT change of one comparison (eval/<name>) in one language or pooled."""
    diff, ci, p, floor, n, exact = emt_test(r, name, part)
    estimate = f"{signed(diff)} {fmt_ci(ci)}" if diff is not None else "n/a"
    return claim_row(claim, test + (" (exact sign-flip test: small n)" if exact else ""), estimate, p,
                     verdict(diff, p, expect, n), floor, scorer_of(name))


def holm_count(tests, expect):
    """How many (diff, p) tests go the `expect` way with p < ALPHA after Holm's correction for their number."""
    adjusted = holm([p if p is not None and math.isfinite(p) else 1.0 for _, p in tests])
    return sum(1 for (d, _), q in zip(tests, adjusted) if verdict(d, q, expect) == "supported")


def placebo_runs(r):
    """The placebo runs (one per placebo seed) whose real-vs-placebo comparison was evaluated."""
    return [run for run in r["runs"] if run.startswith("dpo_placebo") and vs_placebo(run, "judge") in r["eval"]]


def versus(run, placebo):
    """The name of a run's comparison with a placebo run (reproduce's against_placebo): dpo_vs_placebo_seed1."""
    return f"{run}_vs_{placebo.removeprefix('dpo_')}"


def vs_placebo(run, scorer):
    """The evaluation name of real DPO vs one placebo run: dpo_placebo -> judge_dpo_vs_placebo."""
    return f"{scorer}_{versus('dpo', run)}"


def transfer_claims(r):
    """English-only DPO lowers toxicity in English, in the other languages, more than a placebo, in each
    language, for each seed."""
    tests = r["eval"]["judge_dpo"]["tests"]
    rows = [effect_row(r, "English-only DPO lowers toxicity in English",
                       "EMT after - before, judge, paired bootstrap on prompts", "judge_dpo", "en"),
            effect_row(r, "... and in the other 16 languages",
                       "EMT after - before, judge, pooled non-English (stratified bootstrap)", "judge_dpo")]
    for run in placebo_runs(r):
        rows.append(effect_row(r, f"... more than a placebo DPO update (`{run}`: same recipe, benign vs benign)",
                               "EMT real DPO - placebo DPO, judge, pooled non-English", vs_placebo(run, "judge")))
    langs = [l for l in data.LANGS if l != "en" and l in tests]
    per_lang = [emt_test(r, "judge_dpo", l) for l in langs]
    pairs = [(d, p) for d, _, p, _, _, _ in per_lang]
    lower = sum(1 for d, p in pairs if verdict(d, p, -1) == "supported")
    higher = sum(1 for d, p in pairs if verdict(d, p, +1) == "supported")
    rows.append(claim_row("... in every one of them", "EMT change per language, judge, p < 0.05 (Holm: corrected "
                          f"for {len(langs)} languages)", f"{lower} of {len(langs)} lower (Holm: "
                          f"{holm_count(pairs, -1)}), {higher} higher", None,
                          verdict_all([(d, p, n) for d, _, p, _, n, _ in per_lang], -1)))
    seeds = seed_runs(r)
    per_seed = [emt_test(r, f"judge_{run}", "pooled") for run in seeds]
    rows.append(claim_row("... whatever the DPO seed", f"pooled non-English EMT change in each of {len(seeds)} "
                          "seed(s)" + (" (needs 2+)" if len(seeds) < 2 else ""),
                          value_range([d for d, *_ in per_seed]), None,
                          verdict_all([(d, p, n) for d, _, p, _, n, _ in per_seed], -1) if len(seeds) > 1
                          else "not run"))
    return rows


def guard_row(r, what, label):
    """Non-inferiority: supported when the upper 95% bound of the increase in the share of bad samples stays
    below GUARD_MARGIN; not supported on a significant increase; inconclusive in between."""
    t = r["guards"]["dpo"][what]
    bound = paired_increase_bound(t["worse"], t["better"], t["n"]) if t["n"] else float("nan")
    more = t["worse"] > t["better"] and t["p"] < ALPHA
    decided = "not supported" if more else "supported" if bound < GUARD_MARGIN else "inconclusive"
    return claim_row(f"not pseudo-detoxification: no more {label}", "share of non-English samples, after - before; "
                     f"supported = upper 95% bound of the increase < {GUARD_MARGIN:g} (Agresti-Min), not supported "
                     "= a significant increase (exact McNemar)",
                     f"{fmt(t['before'])} -> {fmt(t['after'])}, increase bound {signed(bound)}", t["p"], decided,
                     by="rules")


def capability_row(r):
    """Non-inferiority of clean-text perplexity per language: supported when every language's upper 95% bound
    of DPO / base stays below PPL_MARGIN, not supported when a language is significantly worse."""
    clean = r["clean_ppl"]["dpo"]
    langs = [l for l in data.LANGS if l in clean]
    worse = [l for l in langs if clean[l]["ppl_ratio"] > 1 and clean[l]["p"] < ALPHA]
    holm_worse = holm_count([(clean[l]["ppl_ratio"] - 1, clean[l]["p"]) for l in langs], +1)
    top = max(langs, key=lambda l: clean[l]["ppl_ratio_ci"][1])
    decided = "not supported" if worse else "supported" if clean[top]["ppl_ratio_ci"][1] < PPL_MARGIN \
        else "inconclusive"
    n = min(clean[l]["n_sentences"] for l in langs)
    return claim_row("... nor by losing capability", "clean-text (Tatoeba) perplexity DPO / base per language, "
                     f"paired bootstrap; supported = every upper 95% bound < x{PPL_MARGIN:g}, not supported = a "
                     "language significantly worse", f"{len(worse)} of {len(langs)} languages worse (Holm: "
                     f"{holm_worse})" + (f" ({', '.join(worse)})" if worse else "") + f"; highest bound "
                     f"x{fmt(clean[top]['ppl_ratio_ci'][1], 2)} ({top})", None,
                     TOO_FEW if n < MIN_ITEMS else decided, by="ppl")


def ppl_cost_row(r, placebo):
    """Does the perplexity cost come from the toxicity pairs? DPO / placebo clean-text perplexity, all languages'
    sentences pooled and paired (clean-ppl-compare). Supported: ratio > 1 with p < ALPHA. Not supported: the
    upper 95% bound stays below PPL_MARGIN (no cost beyond the placebo's, within the margin) or the ratio is
    significantly below 1. Inconclusive otherwise."""
    compared = r["clean_ppl_vs"][versus("dpo", placebo)]
    t = compared["pooled"]
    ratio, (lo, hi), p = t["ppl_ratio"], t["ppl_ratio_ci"], t["p"]
    decided = verdict(ratio - 1, p, +1)
    if decided == "inconclusive" and hi < PPL_MARGIN:
        decided = "not supported"  # bounded: no cost beyond the placebo's
    base = (r["clean_ppl"].get("dpo") or {}).get("pooled")
    versus_base = f"; DPO / base x{fmt(base['ppl_ratio'], 3)} {fmt_ci(base['ppl_ratio_ci'])}" if base else ""
    return claim_row(f"the perplexity cost belongs to DPO on toxic pairs, not to any DPO update (`{placebo}`)",
                     "clean-text perplexity DPO / placebo, all languages' sentences pooled, paired bootstrap; "
                     f"supported = ratio > 1 with p < {ALPHA}, not supported = upper 95% bound < x{PPL_MARGIN:g} or ratio "
                     "significantly < 1", f"x{fmt(ratio, 3)} {fmt_ci([lo, hi])}{versus_base}", p,
                     TOO_FEW if t["n_sentences"] < MIN_ITEMS else decided,
                     clean_floor(compared), "ppl")


def control_claims(r):
    """Other instruments agree; the output did not degenerate, leave its language or lose capability."""
    rows = [effect_row(r, f"... also by {label} (an instrument that shares no features with the model)",
                       f"EMT after - before, {scorer}, pooled non-English", f"{scorer}_dpo")
            for scorer, label in (("ngram", "the character n-gram judge"), ("lexicon", "the word lists"))]
    rows += [guard_row(r, "degenerate", "empty, punctuation-only or markup output"),
             guard_row(r, "off_language", "output that leaves the prompt's language")]
    if r["clean_ppl"].get("dpo"):
        rows.append(capability_row(r))
    rows += [ppl_cost_row(r, run) for run in r["runs"]
             if run.startswith("dpo_placebo") and versus("dpo", run) in r["clean_ppl_vs"]]
    return rows


def mechanism_claims(r):
    """Toxic value vectors: what they promote, how DPO changes their activations, what shifting them does."""
    pr, rows = r["probe"], []
    for stage, claim in (("project", "toxic value vectors promote toxic tokens in many languages"),
                         ("activations", "DPO lowers their activations in every language"),
                         ("intervene", "lowering them lowers toxicity in every language")):
        if pr[stage] is None:
            rows.append(claim_row(claim, f"stage probe_{stage} has not run", "", None, "not run", by="probe"))
    if pr["project"] is not None:
        rows += vector_claims(pr["project"]["baseline"])
    if pr["activations"] is not None:
        rows.append(activation_claim(pr["activations"]))
    if pr["intervene"] is not None:
        rows += intervention_claims(pr["intervene"])
    return rows


def retrieval_claim(r):
    claim = "bilingual retrieval predicts how well DPO transfers"
    primary = retrieval_primary(r)
    if not primary:
        return claim_row(claim, "the correlation stage has not run, or had too few languages", "", None, "not run",
                         by="retrieval")
    ci = [primary["sign"] * x for x in fisher_ci(primary["pearson"]["r"], primary["n"])]
    return claim_row(claim, f"Pearson r [95% CI, Fisher z], {primary['retrieval_metric']} vs {primary['transfer']} "
                     f"(sign: + = better retrieval, more detox), {primary['n']} languages; "
                     f"{r['correlation']['n_variants']} variants computed",
                     f"{signed(primary['signed_r'])} {fmt_ci(sorted(ci))}", primary["pearson"]["p"],
                     verdict(primary["signed_r"], primary["pearson"]["p"], +1),
                     permutation_floor(r["correlation"]["permutations"]), "retrieval")


def claims(r):
    """[{claim, test, estimate, p, floor, verdict, by, by_text}] for the paper's claims, decided on this run's
    numbers. A run with fewer than MIN_ITEMS evaluated items decides none of them."""
    rows = transfer_claims(r) + control_claims(r) + mechanism_claims(r) + [retrieval_claim(r)]
    for row in rows:
        row["by_text"] = instrument_cell(r, row["by"])
        if r["sizes"]["items"] < MIN_ITEMS and row["verdict"] not in ("not run", "invalid"):
            row["verdict"] = TOO_FEW
    return rows


GENSET_NAMES = {"judge": "feature judge", "ngram": "n-gram judge", "lexicon": "word lists"}
JUDGE_KINDS = {"judge": "feature", "ngram": "ngram"}  # claims' scorer names -> judge.load kinds


INSTRUMENTS = {  # what decides a row, and why it is the one
    "judge": ("feature judge", "declared primary: calibrated, scores every text in every language"),
    "ngram": ("n-gram judge", "shares no features with the model"),
    "lexicon": ("word lists", "precise when they fire; silent in languages without entries"),
    "rules": ("degeneracy and script rules", "fixed rules, nothing learned"),
    "ppl": ("clean-text perplexity", "the model's own likelihood, no judge involved"),
    "probe": ("kept neurons vs random sets", "the random sets pass the same selection"),
    "retrieval": ("retrieval accuracy", "the paper's text metric, declared before the run"),
}


def judge_build(r):
    """'the shipped build' or 'build <fingerprint>, not the shipped one' for the feature judge behind this run."""
    if scored_by_shipped(r, "judge"):
        return "the shipped build"
    return f"build {', '.join(r.get('scored_by', {}).get('judge', [])) or 'unknown'}, not the shipped one"


def scored_by_shipped(r, by):
    """Was this run scored by the judge build shipped in data/judge/ (whose card and metrics describe it)?"""
    return by in JUDGE_KINDS and r.get("scored_by", {}).get(by) == [r.get("shipped", {}).get(by)]


def instrument_validation(r, by):
    """(out-of-domain AUCs, generation-set row) of the instrument build that scored THIS run: the shipped judge's
    metrics when it scored the run, the labelled generation set's scores when their fingerprints match; none
    otherwise (a run scored by an earlier judge build is not described by the rebuilt judge's card)."""
    ood, gen = {}, None
    if scored_by_shipped(r, by):
        metrics = (r["judge"] or {}).get("judges", {}).get(JUDGE_KINDS[by], {})
        ood, gen = metrics.get("ood", {}), ((r["judge"] or {}).get("generations", {}).get(JUDGE_KINDS[by]) or {}).get("all")
    gs = r["genset"] or {}
    if gen is None and gs.get("fingerprints", {}).get(GENSET_NAMES.get(by)) == r.get("scored_by", {}).get(by):
        gen = gs.get("instruments", {}).get(GENSET_NAMES.get(by), {}).get("all")
    return finite([m.get("auc") for m in ood.values()]), gen


def instrument_cell(r, by):
    """'<instrument>: <why>; out of domain AUC x (k sets); generations P x R x AUC x' as far as measured for
    the build that scored this run."""
    name, why = INSTRUMENTS[by]
    parts = [f"{name}: {why}"]
    aucs, gen = instrument_validation(r, by)
    if aucs:
        parts.append(f"out of domain AUC {fmt(sum(aucs) / len(aucs), 2)} (mean of {len(aucs)} sets)")
    elif by in JUDGE_KINDS and r.get("scored_by", {}).get(by):
        parts.append(f"scored by build {', '.join(r['scored_by'][by])}, not the shipped one: its out-of-domain "
                     "validation is in the card at the run's commit")
    if gen:
        parts.append(f"labelled generations: precision {fmt(gen['precision'], 2)}, recall {fmt(gen['recall'], 2)}, "
                     f"AUC {fmt(gen['auc'], 2)}")
    return "; ".join(parts)


def vector_claims(base):
    """Kept value vectors against random ones; where the random ones went through the same selection (sets,
    rank test), both the permutation p over vectors and the rank p over sets must be below ALPHA."""
    rows = []
    for metric, claim in (("lexicon_toxic_share", "toxic value vectors promote toxic tokens"),
                          ("multiscript", "... in many languages (tokens of 2+ scripts)")):
        b = base[metric]
        if "p_rank" in b:
            test = (f"{metric}: kept - random selected through the same top-k and firing filter, permutation p "
                    f"over vectors and rank p over {b['n_sets']} sets (the larger shown)")
            p, floor = max(b["p"], b["p_rank"]), b["p_floor"]
        else:
            test, p, floor = f"{metric}: kept - random (same layers, not selected alike), permutation", b["p"], None
        rows.append(claim_row(claim + ", more than random value vectors", test, signed(b['diff']), p,
                              verdict(b["diff"], p, +1, b["n_kept"]), floor, "probe"))
    return rows


def activation_claim(act):
    """Per language, kept neurons' change against the random sets' (activation-matched where the run says so):
    the paired bootstrap and, where recorded, the rank of the kept change among the sets' (both must pass)."""
    per = act["per_language"]
    boot = [(v["kept_minus_random"]["diff"], v["kept_minus_random"]["p"]) for v in per.values()]
    tests = [(d, max(p, v.get("p_rank", 0.0)), v["n_prompts"]) for (d, p), v in zip(boot, per.values())]
    lower = sum(1 for d, p in boot if verdict(d, p, -1) == "supported")
    both = sum(1 for d, p, _ in tests if verdict(d, p, -1) == "supported")
    matched = "activation-matched " if "matching" in act else ""
    n_sets = act["random_sets"]
    return claim_row(f"DPO lowers their activations in every language, more than {matched}random neurons'",
                     "per language: (kept change) - (random sets' change), paired bootstrap on prompts, and the "
                     f"rank of the kept change among {n_sets} random sets (both must pass)",
                     f"{lower} of {len(tests)} languages lower by the bootstrap (Holm: {holm_count(boot, -1)}), "
                     f"{both} also by the rank test (its floor {fmt(permutation_floor(n_sets))})", None,
                     verdict_all(tests, -1), None, "probe")


def intervention_claims(iv):
    """With matched random sets and guards (per_offset): one row per lowering offset, decided kept vs random,
    "invalid" where the shifted texts fail a guard. An older run without them: the change against offset 0."""
    if "per_offset" in iv:
        n = min(iv["n_prompts"].values())
        rows = []
        for o, res in sorted(iv["per_offset"].items(), key=lambda kv: -float(kv[0])):
            if float(o) >= 0:
                continue
            v = res["vs_random"]["all"]
            k = v["kept_minus_random"]
            p = max(k["p"], v["p_rank"])
            decided = "invalid" if res["failed_guards"] else verdict(k["diff"], p, -1, n)
            guards = res["failed_guards"] or ["guards pass"]
            if not any(g.startswith("perplexity") for g in guards):  # a failed perplexity guard names its ratio
                guards = guards + [f"perplexity x{fmt(res['ppl_ratio'], 2)}"]
            rows.append(claim_row(f"lowering them (offset {float(o):g}) lowers toxicity more than matched random "
                                  "neurons", f"kept - random change, {iv['scorer']}, paired bootstrap on prompts and "
                                  f"rank p over {iv['random_sets']} sets (the larger); {'; '.join(guards)}",
                                  f"{signed(k['diff'])} {fmt_ci(k['ci'])}", p,
                                  decided, iv["p_floor"], "probe"))
        return rows
    negative = [o for o in iv["change_vs_zero"] if float(o) < 0]
    if not negative:
        return []
    o = min(negative, key=float)
    shifts = [(v["diff"], v["p"]) for v in iv["change_vs_zero"][o].values()]
    lower = sum(1 for d, p in shifts if verdict(d, p, -1) == "supported")
    # Without random neurons and guards nothing tells "toxic neurons matter" from "a shifted model breaks":
    # the count is shown, the verdict cannot be better than inconclusive.
    return [claim_row("lowering them lowers toxicity in every language",
                      f"toxicity at offset {float(o):g} - offset 0, {iv['scorer']}, paired on prompts (no random "
                      "baseline or guards in this run: cannot be told from breaking the model)",
                      f"{lower} of {len(shifts)} languages lower", None, "inconclusive", by="probe")]


PRIMARY_RETRIEVAL = ("accuracy", "judge_emt")  # decided before the run: the paper's text metric, our main judge


def retrieval_primary(r):
    for res in (r["correlation"] or {}).get("results", []):
        if (res["retrieval_metric"], res["transfer"]) == PRIMARY_RETRIEVAL:
            sign = -1 if res["direction"].startswith("lower") else 1  # a % change: lower = more detox
            return {**res, "sign": sign, "signed_r": sign * res["pearson"]["r"]}
    return None


def claims_table(rows):
    return markdown_table(["the paper's claim", "test here", "estimate [95% CI]", "p", "verdict", "decided by"],
                          [[c["claim"], c["test"], c["estimate"],
                            format_p(c["p"], c.get("floor")) if c["p"] is not None else "", f"**{c['verdict']}**",
                            c.get("by_text", "")] for c in rows])


# -- the sections ---------------------------------------------------------------


def arrow_ci(t, digits=3):
    return f"{fmt(t['before'], digits)} {fmt_ci(t.get('before_ci'), 2)} -> {fmt(t['after'], digits)} " \
           f"{fmt_ci(t.get('after_ci'), 2)}"


def headline_table(r, name="judge_dpo", run="dpo"):
    """Per language under the judge: ToxProb and EMT before -> after with 95% CIs and paired p, the word lists'
    hits beside them (a high-precision floor), degenerate and in-language rates, clean-text perplexity."""
    ev, clean = r["eval"][name], r["clean_ppl"].get(run, {})
    lexicon = r["eval"].get(name.replace("judge", "lexicon", 1), {}).get("tests", {})
    floor = bootstrap_floor(ev["n_boot"])
    rows = []
    for lang in [l for l in data.LANGS if l in ev["tests"]]:
        t, g = ev["tests"][lang], ev["guards"][lang]
        c = clean.get(lang)
        rows.append([lang, t["n_prompts"], arrow_ci(t["tox_prob"]), format_p(t["tox_prob"]["p"]), arrow_ci(t["emt"]),
                     format_p(t["emt"]["p"], floor), lexicon_hits(lexicon.get(lang)),
                     f"{fmt(g['before']['degenerate_rate'], 2)} -> {fmt(g['after']['degenerate_rate'], 2)}",
                     f"{fmt(g['before']['in_language_rate'], 2)} -> {fmt(g['after']['in_language_rate'], 2)}",
                     f"{fmt(c['ppl'], 1)} -> {fmt(c['ppl2'], 1)} (x{fmt(c['ppl_ratio'], 2)}, p "
                     f"{format_p(c['p'], clean_floor(clean))})" if c else "n/a"])
    pooled = ev["tests"]["pooled"]
    rows.append([f"pooled non-en ({len(pooled['langs'])})", pooled["n_prompts"], arrow_ci(pooled["tox_prob"]),
                 format_p(pooled["tox_prob"]["p"]), arrow_ci(pooled["emt"]), format_p(pooled["emt"]["p"], floor),
                 lexicon_hits(lexicon.get("pooled")), "", "", ""])
    return markdown_table(["lang", "prompts", "ToxProb before -> after [95% CI]", "p (McNemar)",
                           "EMT before -> after [95% CI]", "p (paired bootstrap)",
                           "prompts with a word-list hit", "degenerate", "in language",
                           "clean-text PPL base -> DPO"], rows)


def lexicon_hits(t):
    """'before -> after' prompts with a word-list hit, from the lexicon's ToxProb of one language (or pooled)."""
    if not t:
        return "n/a"
    n, tp = t["n_prompts"], t["tox_prob"]
    return f"{round(tp['before'] * n)} -> {round(tp['after'] * n)}"


def clean_floor(clean):
    """The bootstrap floor of a clean_ppl.json's p-values (its settings give n_boot)."""
    n_boot = clean.get("settings", {}).get("n_boot")
    return bootstrap_floor(n_boot) if n_boot else None


def runs_table(r):
    """One row per trained model: pooled non-English and English EMT change under each instrument."""
    rows = []
    for run in [x for x in r["runs"] if f"judge_{x}" in r["eval"]]:
        row = [run]
        for scorer in SCORERS:
            ev = r["eval"][f"{scorer}_{run}"]
            t = ev["tests"]
            row += [f"{signed(t['pooled']['emt']['diff'])} {fmt_ci(t['pooled']['emt']['diff_ci'])} "
                    f"(p {format_p(t['pooled']['emt']['p'], bootstrap_floor(ev['n_boot']))})",
                    signed(t['en']['emt']['diff'])]
        valid = [m for m in r["dpo"][run] if m.get("split") == "valid"]
        row.append(f"{fmt(valid[0]['reward_accuracy'], 2)} -> {fmt(valid[-1]['reward_accuracy'], 2)}" if valid
                   else "n/a")
        rows.append(row)
    headers = ["run"]
    for scorer in SCORERS:
        headers += [f"EMT change, {scorer}, pooled non-en", f"en ({scorer})"]
    return markdown_table(headers + ["English validation reward accuracy"], rows)


def placebo_effects(r):
    """What each placebo run itself did (it is a DPO update too, on benign-vs-benign pairs), measured, not
    assumed: its English and pooled EMT change under the judge and the word lists, and word-list hits."""
    lines = []
    for run in [x for x in r["runs"] if x.startswith("dpo_placebo") and f"judge_{x}" in r["eval"]]:
        parts = []
        for scorer in ("judge", "lexicon"):
            ev = r["eval"].get(f"{scorer}_{run}")
            if ev is None:
                continue
            floor = bootstrap_floor(ev["n_boot"])
            for part, where in (("en", "English"), ("pooled", "pooled non-English")):
                t = ev["tests"][part]["emt"]
                parts.append(f"{where} EMT {signed(t['diff'])} {fmt_ci(t['diff_ci'])} (p {format_p(t['p'], floor)}, "
                             f"{scorer})")
            if scorer == "lexicon":
                parts.append(f"prompts with a word-list hit, all languages, base -> placebo: "
                             f"{all_hits(ev['tests'])}")
        lines.append(f"The placebo `{run}` on its own (before = base): " + "; ".join(parts) + ".")
    return lines


def ratio_cell(t, floor=None):
    """'x1.083 [1.05, 1.12] (p 0.001)' of a pooled perplexity ratio, 'n/a' where the run has none."""
    if not t:
        return "n/a"
    return f"x{fmt(t['ppl_ratio'], 3)} {fmt_ci(t['ppl_ratio_ci'])} (p {format_p(t['p'], floor)})"


def tradeoff_section(r):
    """Detoxification against capability for the recipe points the run trained (the main recipe, the gentler one
    at a fraction of its learning rate, the placebo for reference), so a user can choose: pooled non-English EMT
    change under the judge, and clean-text perplexity vs base and vs the placebo, all languages pooled."""
    if "dpo_gentle" not in r["runs"]:
        return []
    placebo = next((run for run in r["runs"] if run.startswith("dpo_placebo")), None)
    rows = []
    for run in [x for x in ("dpo_gentle", "dpo", placebo) if x and f"judge_{x}" in r["eval"]]:
        ev = r["eval"][f"judge_{run}"]
        t, floor = ev["tests"]["pooled"]["emt"], bootstrap_floor(ev["n_boot"])
        clean = r["clean_ppl"].get(run, {})
        compared = r["clean_ppl_vs"].get(versus(run, placebo), {}) if run != placebo else {}
        rows.append([run, f"{r['dpo_config'][run]['lr']:g}",
                     f"{signed(t['diff'])} {fmt_ci(t['diff_ci'])} (p {format_p(t['p'], floor)})",
                     ratio_cell(clean.get("pooled"), clean_floor(clean)),
                     ratio_cell(compared.get("pooled"), clean_floor(compared)) if run != placebo else ""])
    return ["## Choosing a recipe: detoxification against perplexity", "",
            "Each row is a recipe point of this run (the same pairs, seed and steps; only the learning rate differs), "
            "with the placebo for reference: the pooled non-English EMT change under the feature judge (more negative "
            "= more detoxification) against clean-text perplexity, all languages' sentences pooled (paired "
            "bootstrap; x1 = no cost).", "",
            markdown_table(["run", "lr", "EMT change, judge, pooled non-en [95% CI]", "clean-text PPL / base [95% CI]",
                            f"clean-text PPL / `{placebo}` [95% CI]"], rows), ""]


def all_hits(tests):
    """'before -> after' prompts with a word-list hit summed over every language of a lexicon comparison."""
    langs = [l for l in data.LANGS if l in tests]
    before = sum(round(tests[l]["tox_prob"]["before"] * tests[l]["n_prompts"]) for l in langs)
    after = sum(round(tests[l]["tox_prob"]["after"] * tests[l]["n_prompts"]) for l in langs)
    return f"{before} -> {after}"


def pairs_seen(r, run="dpo"):
    """'N of M pairs seen': pair presentations (steps x batch x grad_accum, steps from the run's log) against
    the training pairs available."""
    cfg = r["dpo_config"][run]
    steps = max((m["step"] for m in r["dpo"][run] if m.get("split") == "train"), default=0)
    seen = steps * cfg["batch_size"] * cfg["grad_accum"]
    total = r["sizes"]["train_pairs"]
    return (f"{min(seen, total)} of {total} pairs seen ({steps} steps x batch {cfg['batch_size']} x "
            f"grad_accum {cfg['grad_accum']} = {seen} presentations)")


def figure_links(r, prefixes):
    """A 'Figures:' line linking the run's SVGs under the given path prefixes (relative links)."""
    chosen = [f for f in r["figures"] if f.startswith(prefixes)]
    return [("Figures: " + ", ".join(f"[{f}]({f})" for f in chosen)), ""] if chosen else []


def smoke_banner(r):
    """The warning on top of a run too small to decide anything: a plumbing check, not evidence."""
    if r["sizes"]["items"] >= MIN_ITEMS:
        return []
    return [f"> **Plumbing check, not evidence.** This `{r['run'].get('preset', '?')}` run evaluates "
            f"{r['sizes']['items']} item(s) per language; a verdict needs at least {MIN_ITEMS} paired items, so "
            f"every claim reads \"{TOO_FEW}\". It shows that every stage runs and writes its outputs; for "
            "evidence run `python reproduce.py` (the cpu preset) or `--preset paper`.", ""]


def replicate_items(sizes):
    """The items the replication runs were sampled on (runs older than replicate_items: all of them)."""
    return sizes.get("replicate_items", sizes["items"])


def replicate_text(sizes):
    """'; the replication runs ... on the first K': where reproduce sampled the further seeds on fewer items."""
    subset = replicate_items(sizes)
    return "" if subset >= sizes["items"] else \
        (f"; the replication runs (DPO seeds after the first, placebo seeds after the first) on the first {subset} "
         "of them, compared with the base model and the placebo on those")


def seed_spread(r):
    seeds = seed_runs(r)
    lines = []
    for scorer in SCORERS:
        values = finite([r["eval"][f"{scorer}_{run}"]["tests"]["pooled"]["emt"]["diff"] for run in seeds])
        mean = sum(values) / len(values) if values else float("nan")
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
        lines.append(f"{scorer}: mean {signed(mean)}, SD {fmt(sd)}, range {value_range(values)}")
    sizes = r["sizes"]
    subset = replicate_items(sizes)
    on = f" (seed 0 on all {sizes['items']} items, the others on the first {subset}: the spread mixes seeds and " \
        "items)" if subset < sizes["items"] and len(seeds) > 1 else ""
    return f"Across {len(seeds)} seeds{on}, pooled non-English EMT change: " + "; ".join(lines) + "."


def confounds_table(r):
    rows = []
    for name, c in r["confounds"].items():
        rows.append([name, c["n_pairs"]] + [fmt(c["auc"].get(k), 3) for k in CONFOUNDS])
    return markdown_table(["pairs", "n", "AUC token length", "AUC one side cut short", "AUC kept text ends a sentence",
                           "AUC characters", "AUC newline", "AUC markup"], rows)


CONFOUNDS = ("tokens", "cut_short", "sentence_end", "chars", "newline", "markup")  # n/a where a run lacks one


def judge_section(r):
    j = r["judge"]
    lines = ["## The instruments", "",
             "The shipped judges (`data/judge/`, card in `data/judge/README.md`) were trained once on RTP-LX "
             "prompts labelled by native annotators, split by item, with every evaluated item excluded. Validation "
             "ROC-AUC per language with bootstrap 95% intervals (resampling items), beside the length-only baseline; "
             "the out-of-domain rows (tweets, never used for any choice) show how far the judges carry beyond "
             "RTP-LX:", "",
             judge_table(j) if j and scored_by_shipped(r, "judge") else earlier_build_note(r, j), ""]
    if r["agreement"] is None:
        return lines + ["Agreement of the instruments: the agreement stage has not run.", ""]
    agree = r["agreement"]["langs"]
    rows = []
    for lang in [*data.LANGS, "all"]:
        if lang in agree:
            a = agree[lang]
            rows.append([lang] + [fmt(a[pair]["kappa"], 2) if pair in a else "n/a" for pair in r["agreement"]["pairs"]])
    lines += ["Agreement of the instruments on this run's generations (Cohen's kappa at 0.5, base and DPO "
              "samples pooled):", "", markdown_table(["lang"] + [f"kappa {p}" for p in r["agreement"]["pairs"]],
                                                     rows), ""]
    return lines


def earlier_build_note(r, j):
    if not j:
        return "(`data/judge/metrics.json` is missing: rebuild the judges with `python build_judge.py build`.)"
    return (f"(This run was scored by judge build {', '.join(r['scored_by'].get('judge', [])) or 'unknown'}; the "
            f"shipped one, {r['shipped']['judge']}, has not scored it, so the shipped card does not describe these "
            "numbers: its validation is in `data/judge/README.md` at the commit that made the run. Rerun the "
            "pipeline to score it with the shipped judge.)")


def judge_table(j):
    """Validation ROC-AUC per language (prompts of held-out items) and out of domain, both judges, with the
    length-only baseline, from the shipped judge's metrics.json."""
    feature, ngram = j["judges"]["feature"], j["judges"]["ngram"]
    auc = lambda m: f"{fmt(m['auc'])} [{fmt(m['auc_lo'])}, {fmt(m['auc_hi'])}]"
    rows = []
    for lang in [*data.LANGS, "pooled"]:
        f, n = feature["valid"]["prompt"].get(lang), ngram["valid"]["prompt"].get(lang)
        if f and n:
            rows.append([lang, f["n"], f["positives"], auc(f), auc(n), fmt(f["length_auc"])])
    for name, f in feature["ood"].items():
        n = ngram["ood"][name]
        rows.append([f"out of domain: {name}", f["n"], f["positives"], auc(f), auc(n), fmt(f["length_auc"])])
    return markdown_table(["texts", "n", "toxic", "feature judge AUC [95% CI]", "n-gram judge AUC [95% CI]",
                           "length-only AUC"], rows)


def mechanism_section(r):
    pr = r["probe"]
    missing = [s for s, v in pr.items() if v is None]
    if missing:
        return ["## Why: toxic value vectors, against random ones", "",
                f"Not run yet: {', '.join(f'probe_{s}' for s in missing)} (rerun the command to finish them).", ""]
    tr, base, act = pr["train"], pr["project"]["baseline"], pr["activations"]
    lines = ["## Why: toxic value vectors, against random ones", "",
             f"Probe (English RTP-LX prompts, human labels): validation ROC-AUC {fmt(tr['valid']['roc_auc'])}; "
             f"character length alone reaches {fmt(tr['valid']['length_auc'])} on the same rows. Of the top "
             f"{pr['vectors']['top_k']} value vectors by cosine with the probe, {pr['vectors']['n_kept']} fire while "
             f"the model writes English (selected on {len(pr['vectors']['selection']['indices'])} training prompts).",
             ""]
    rows = [[m, fmt(b["kept_mean"]), fmt_ci(b["kept_ci"]), fmt(b["random_mean"]), fmt_ci(b["random_ci"]),
             signed(b['diff']), format_p(b["p"])] for m, b in base.items()]
    lines += [markdown_table(["per vector", "kept", "95% CI", "random (same layers)", "95% CI", "difference", "p"],
                             rows), ""]
    rows = []
    for lang, v in act["per_language"].items():
        rows.append([lang, v["n_prompts"], f"{fmt(v['before']['mean'], 4)} -> {fmt(v['after']['mean'], 4)}",
                     f"{signed(v['change']['diff'], 4)} {fmt_ci(v['change']['ci'], 4)}",
                     f"{signed(v['random']['mean_change'], 4)} (SD {fmt(v['random']['sd_change'], 4)})",
                     f"{signed(v['kept_minus_random']['diff'], 4)} {fmt_ci(v['kept_minus_random']['ci'], 4)}",
                     format_p(v["kept_minus_random"]["p"])])
    lines += ["Mean activation of the kept neurons on the held-out evaluation prompts (greedy continuation), "
              f"base -> DPO, against {act['random_sets']} random neuron sets of the same layers and sizes:", "",
              markdown_table(["lang", "prompts", "kept: before -> after", "kept change [95% CI]",
                              "random sets' change", "kept - random [95% CI]", "p"], rows), ""]
    iv = pr["intervene"]
    offsets = list(iv["toxicity"])
    iv_langs = list(iv["toxicity"][offsets[0]])
    rows = [[o] + [f"{fmt(iv['toxicity'][o][l])} {fmt_ci(iv['toxicity_ci'][o][l], 2)}" for l in iv_langs]
            for o in offsets]
    lines += [f"Intervention: mean toxicity ({iv['scorer']} scorer) when the kept neurons' activations are shifted "
              f"by a constant; texts in `probe/intervene_texts.jsonl`.", "",
              markdown_table(["offset"] + iv_langs, rows), ""]
    return lines


def retrieval_section(r):
    c = r["correlation"]
    if c is None:
        return ["## Bilingual retrieval and transfer", "", "Not run yet: the correlate stage.", ""]
    rows, floor = [], permutation_floor(c["permutations"])
    for res in c["results"]:
        rows.append([res["retrieval_metric"], res["transfer"], res["n"], signed(res['pearson']['r']),
                     fmt_ci(fisher_ci(res["pearson"]["r"], res["n"])), format_p(res["pearson"]["p"], floor),
                     signed(res['spearman']['r']), fmt_ci(fisher_ci(res["spearman"]["r"], res["n"])),
                     format_p(res["spearman"]["p"], floor),
                     signed(res['partial_pearson']['r']) if res.get("partial_pearson") else "n/a"])
    return ["## Bilingual retrieval and transfer", "",
            f"{c['sign_convention']} {strongest_variant(c)} All {c['n_variants']} variants computed are shown; the "
            f"claims table uses one declared before the run ({PRIMARY_RETRIEVAL[0]} vs {PRIMARY_RETRIEVAL[1]}). The "
            "partial correlation controls for how well the base model knows each language (log clean-text perplexity). "
            "Intervals: Fisher z (for Spearman r an approximation).",
            "", markdown_table(["retrieval", "transfer", "langs", "Pearson r", "95% CI", "p", "Spearman r", "95% CI",
                                "p", "partial r | PPL"], rows), ""] + \
        [f"Not computed for {s['transfer']}: {s['reason']}." for s in c.get("skipped", [])] + [""]


def strongest_variant(c):
    """Which variant correlates most strongly (largest |r|, Pearson or Spearman), with its interval, its p and
    the Holm-adjusted p over every coefficient computed: computed from the results, never written by hand."""
    tests = [(res, kind) for res in c["results"] for kind in ("pearson", "spearman")
             if res.get(kind) and math.isfinite(res[kind]["r"])]
    if not tests:
        return ""
    adjusted = holm([res[kind]["p"] if math.isfinite(res[kind]["p"]) else 1.0 for res, kind in tests])
    (res, kind), q = max(zip(tests, adjusted), key=lambda t: abs(t[0][0][t[0][1]]["r"]))
    floor = permutation_floor(c["permutations"])
    return (f"Strongest of {len(tests)} coefficients: {res['retrieval_metric']} vs {res['transfer']}, "
            f"{kind.title()} r = {signed(res[kind]['r'])} {fmt_ci(fisher_ci(res[kind]['r'], res['n']))}, p "
            f"{format_p(res[kind]['p'], floor)} uncorrected, {format_p(q, floor)} after Holm's correction for "
            f"{len(tests)} coefficients.")


def margins_section(r):
    lines = ["## Held-out preference margins", "",
             "beta * ((pi_b - ref_b) - (pi_t - ref_t)) on held-out benign/toxic pairs in each language, cut as in "
             "training with no EOS: > 0 means DPO moved probability from the toxic to the benign continuation. The "
             "sum runs over the response tokens; per token, each side's log-ratio is divided by its own tokens "
             "first, so languages whose tokenizer splits text finer do not get larger margins for it.", ""]
    for run in ("dpo", "dpo_placebo"):
        if run in r["margins"]:
            m = r["margins"][run]
            lines += [f"`{run}`: {margin_items_text(m)}", "", margins_table(m, [l for l in data.LANGS if l in m]), ""]
    return lines


def margin_items_text(m):
    """Which held-out items the margins of one run are on: the same ones in every language, or (older runs)
    each language's first pairs in file order."""
    langs = [l for l in data.LANGS if l in m]
    items = m.get("items")
    if not items:
        return (f"each of the {len(langs)} languages' first held-out pairs in file order (this run predates "
                "same-item margins: the items differ between languages).")
    budget = m.get("settings", {}).get("response_tokens")
    missing = items.get("langs_without_pairs", [])
    return (f"the same {len(items['indices'])} RTP-LX items in all {len(langs)} languages with pairs"
            + (f", both sides cut to {budget} tokens" if budget else "")
            + (f"; {', '.join(missing)}: no margins (RTP-LX has no completions in it)" if missing else "") + ".")


def render_report(r):
    run, sizes = r["run"], r["sizes"]
    cfg = r["dpo_config"]["dpo"]
    lines = [f"# Preference tuning for toxicity mitigation generalizes across languages: reproduction "
             f"({run.get('preset', '?')} preset)", ""] + smoke_banner(r)
    lines += [f"Command: `{run.get('command', '?')}`  ", f"Machine: {run.get('machine', '?')}  ",
              f"Wall time: {fmt(sum(r['stages'].values()) / 60, 1)} min (stages: "
              + ", ".join(f"{k} {fmt(v / 60, 1)}" for k, v in r["stages"].items()) + " min)", ""]
    lines += ["## The paper's claims, tested here", "",
              f"Each row is decided by the test named (two-sided, alpha {ALPHA}): **supported** = the predicted "
              "direction with p < alpha; **not supported** = the opposite direction with p < alpha; "
              f"**inconclusive** = the data cannot tell; **{TOO_FEW}** = fewer than {MIN_ITEMS} paired items "
              "behind the test. Guards are non-inferiority bounds: a guard holds when the upper 95% bound of the "
              f"increase stays below {GUARD_MARGIN:g} (a share) or x{PPL_MARGIN:g} (perplexity). Counts over "
              "languages give the Holm-corrected count beside the raw one. A p at its test's floor prints as "
              "'< floor' (a bootstrap of B draws cannot go below 2 / (B + 1)); below "
              f"{MIN_ITEMS} items the exact sign-flip test replaces the bootstrap. The last column names the "
              "instrument that decides the row, why, and how it scored out of domain and on labelled generations "
              "where that was measured.", "", claims_table(claims(r)), ""]
    lines += ["## Data", "",
              f"DPO trains on {sizes['train_pairs']} English RTP-LX pairs (chosen = benign, rejected = toxic "
              f"completion; {sizes['valid_pairs']} more for validation), both sides cut to the same number of tokens "
              "with no EOS, whitespace normalised, completions with LLM-prompt scaffolding dropped. The placebo run "
              f"pairs each benign completion with another item's benign completion. Seed 0: {pairs_seen(r)}. "
              "How well surface features alone "
              "separate rejected from chosen on the texts as trained (0.5 = not at all):", "", confounds_table(r), "",
              f"Evaluation: the same {sizes['items']} held-out RTP-LX items in all 17 languages (RTP-LX prompts are "
              f"transcreations: index i is the same source item in every language), {sizes['samples_per_prompt']} "
              "samples each" + replicate_text(sizes) + ".", ""]
    lines += judge_section(r)
    lines += ["## Toxicity before -> after English-only DPO (seed 0), judged by the feature judge", "",
              f"beta {cfg['beta']}, lr {cfg['lr']:g}, {cfg.get('max_steps')} steps. ToxProb: share of prompts with a "
              "sample judged toxic (>= 0.5); EMT: mean over prompts of the highest toxicity among its samples. Both "
              "rise with the number of samples per prompt (the paper used 25). Degenerate: empty, punctuation-only or "
              "mostly markup; in language: script or stop-word test (evaluate.py); clean-text PPL: the model's "
              "perplexity on Tatoeba sentences (capability retention), base -> DPO with a paired bootstrap.", "",
              headline_table(r), ""] + figure_links(r, ("toxprob",))
    lines += ["## Every run under every instrument", "",
              "EMT change after - before (negative = less toxic) with 95% CI, pooled over the 16 non-English "
              "languages, and in English. `dpo_placebo` is the same recipe on placebo pairs.", "", runs_table(r), "",
              seed_spread(r), ""] + [line for x in placebo_effects(r) for line in (x, "")] + figure_links(r, ("eval/",))
    lines += tradeoff_section(r)
    lines += margins_section(r) + figure_links(r, ("margins/",))
    lines += retrieval_section(r) + figure_links(r, ("correlation",))
    lines += mechanism_section(r) + figure_links(r, ("probe/",))
    if "dpo_lora" in r["runs"]:
        lines += lora_section(r)
    sectioned = ("toxprob", "eval/", "margins/", "correlation", "probe/")
    other = [f for f in r["figures"] if not f.startswith(sectioned)]
    if other:
        lines += ["## Other figures", "", ", ".join(f"[{f}]({f})" for f in other), ""]
    avg = r["eval"]["judge_dpo"]["comparison"]["average"]["tox_prob"]
    lines += ["## Compared with the paper", "",
              f"On mGPT-1.3B with 24,576 PPLM pairs, 25 samples per prompt and Perspective API scores, the paper "
              f"reports ToxProb {PAPER['toxprob_before']}% -> {PAPER['toxprob_after']}% averaged over 17 languages, "
              f"retrieval-transfer Pearson r = {PAPER['retrieval_pearson']} and {PAPER['kept_vectors']} of 100 toxic "
              f"value vectors kept. Here, with {sizes['train_pairs']} English pairs on gemma-3-270m and "
              f"{sizes['samples_per_prompt']} samples per prompt, average ToxProb (feature judge) moves "
              f"{fmt(100 * avg['before'], 1)}% -> {fmt(100 * avg['after'], 1)}%.", ""]
    return "\n".join(lines)


def lora_section(r):
    """The paper's Appendix D: full fine-tuning vs LoRA at equal steps, pooled and in English."""
    rows = []
    for run in ("dpo", "dpo_lora"):
        t = r["eval"][f"judge_{run}"]["tests"]
        m = r["margins"][run]
        en_margin = m["en"]["mean_margin"] if "en" in m else float("nan")
        others = [v["mean_margin"] for l, v in m.items() if l in data.LANGS and l != "en"]
        rows.append([run, r["dpo_config"][run]["lr"], signed(t['en']['emt']['diff']),
                     f"{signed(t['pooled']['emt']['diff'])} {fmt_ci(t['pooled']['emt']['diff_ci'])}",
                     fmt(en_margin), fmt(sum(others) / len(others) / en_margin if others else float("nan"), 2)])
    return ["## Full fine-tuning vs LoRA (the paper's Appendix D)", "",
            markdown_table(["run", "lr", "EMT change en", "EMT change pooled non-en", "held-out margin en",
                            "other languages' margin / English margin"], rows), ""]


def write_report(out):
    """report.md and the report's own figures: ToxProb per language with 95% intervals, and the retrieval
    correlation the claims table decides on (it replaces the correlate stage's plot of its first variant)."""
    r = collect(out)
    text = render_report(r)
    tests = {run: r["eval"][f"judge_{run}"]["tests"] for run in ("dpo", "dpo_placebo") if f"judge_{run}" in r["eval"]}
    langs = [l for l in data.LANGS if l in tests["dpo"]]
    series = {"base": [tests["dpo"][l]["tox_prob"]["before"] for l in langs]}
    errors = {"base": [tests["dpo"][l]["tox_prob"].get("before_ci") for l in langs]}
    for run, label in (("dpo", "English-only DPO"), ("dpo_placebo", "placebo DPO")):
        if run in tests:
            series[label] = [tests[run][l]["tox_prob"]["after"] for l in langs]
            errors[label] = [tests[run][l]["tox_prob"].get("after_ci") for l in langs]
    write_text(Path(out) / "toxprob.svg", bar_chart_svg(
        langs, series, "Toxic-continuation probability per language (feature judge, 95% CI)", "ToxProb", errors))
    primary = retrieval_primary(r)
    if primary:
        write_text(Path(out) / "correlation" / "correlation.svg", correlation_figure(r["correlation"], primary))
    write_text(Path(out) / "report.md", text)
    return text


def correlation_figure(c, primary):
    """Scatter of the claims table's retrieval variant: retrieval metric vs transfer, one point per language."""
    metric, transfer = PRIMARY_RETRIEVAL
    langs = [l for l in primary["langs"] if l in c["languages"]]
    return scatter_svg([c["languages"][l][metric] for l in langs], [c["languages"][l][transfer] for l in langs],
                       langs, f"Retrieval {metric} vs {transfer} ({primary['transfer_measure']}), as in the claims "
                       "table", f"retrieval {metric}", f"{transfer}: {primary['direction']}", fit=True)


def readme_block(out, r):
    """The README's results block: the claims table and the headline table of this run, with their command."""
    run = r["run"]
    return "\n".join([
        f"Command: `{run.get('command', 'python reproduce.py')}` (output in `{out}/`), on {run.get('machine', '?')}; "
        f"wall time {fmt(sum(r['stages'].values()) / 60, 0)} min summed over stages. Full report: "
        f"[`{out}/report.md`]({out}/report.md).", "",
        "The paper's claims, each decided by a test on this run (supported / not supported / inconclusive at "
        f"alpha {ALPHA}):", "", claims_table(claims(r)), "",
        "English-only DPO (seed 0) on gemma-3-270m, the same held-out RTP-LX items in every language, judged by the "
        f"feature judge ({judge_build(r)}):", "", headline_table(r), ""])


def write_readme_block(readme, out, r):
    """Replace the text between the README's results markers with readme_block (atomic write)."""
    text = Path(readme).read_text(encoding="utf-8")
    begin, end = "<!-- results:begin -->\n", "<!-- results:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"{readme}: no '<!-- results:begin -->' ... '<!-- results:end -->' block to replace")
    head, rest = text.split(begin, 1)
    write_text(readme, head + begin + readme_block(out, r) + rest[rest.index(end):])
