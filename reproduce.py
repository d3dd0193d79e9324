"""
The whole paper in miniature, on a real multilingual model, offline, with one command:

    python reproduce.py                     # --preset cpu: sized for 2 CPU cores
    python reproduce.py --preset smoke      # every stage on a few prompts (what CI runs)
    python reproduce.py --preset paper      # the paper's settings, for a GPU
    python reproduce.py --lora              # add the paper's Appendix D (LoRA vs full fine-tuning)

Stages (each cached in OUT/stages/<name>.json when done; a killed run continues where it stopped):

    split          English RTP-LX DPO pairs (length-matched, see data.py), placebo pairs, and the SAME held-out
                   RTP-LX items in all 17 languages for evaluation
    gen_base       sample continuations of the evaluation prompts from the base model
    dpo, dpo_seed* English-only DPO (train_dpo.py), one run per seed
    dpo_placebo    the same recipe on placebo pairs (benign vs another item's benign): no toxicity difference
    gen_*          the same prompts and random streams, from each trained model
    eval_*         EMT / ToxProb before -> after with intervals and paired tests, under the shipped feature
                   judge, the character n-gram judge and the lexicon; degenerate and off-language output
    agreement      how the three instruments agree on the generations
    clean_ppl      perplexity on clean Tatoeba text per language, base vs each trained model
    margins_*      held-out benign-vs-toxic preference margins in every language (the run's beta and lengths)
    retrieval      bilingual sentence retrieval English <-> X, and its correlation with per-language transfer
    probe_*        toxicity probe, toxic value vectors vs random ones, their vocabulary projection, activations
                   before/after DPO vs random neurons, and the causal intervention
    *_lora         (--lora) the paper's Appendix D: the same DPO run training LoRA adapters
    report         OUT/report.md: a claims table first, then the tables behind it, with JSON and SVG beside it

Every stage is the same CLI a user would run by hand; the exact commands go to OUT/commands.sh.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import data
import judge
from checkpoint import DEFAULT_MODEL
from evaluate import degenerate_reason, in_language, margins_table, read_generations
from report import bar_chart_svg, exit_on_error, finite, markdown_table, write_json, write_text
from stats import format_p, mcnemar_exact
from train_config import CPU_PRESET, TrainConfig


# What each preset runs. "cpu" is sized for 2 CPU cores; "paper" is the paper's
# protocol (all held-out prompts, 25 samples, the paper's DPO recipe) and wants a GPU. `items` RTP-LX items are
# evaluated in every language (the same items in all 17), `n` samples each. `dpo` holds TrainConfig fields that
# differ from the paper's recipe; "cpu" takes train_config's CPU preset, the one source of the CPU recipe.
PRESETS = {
    "smoke": dict(items=2, n=2, max_new_tokens=8, seeds=[0], dpo_pairs=16,
                  dpo=dict(max_steps=2, eval_every=2, max_len=96), margin_pairs=4, clean_limit=4, retrieval_limit=12,
                  probe_texts=40, top_k=20, random_sets=3, select_prompts=3, activation_items=2,
                  activation_langs=["en", "de", "ja"],
                  intervene_langs=["en", "de"], intervene_offsets="0,-5", intervene_prompts=2, intervene_n=1),
    "cpu": dict(items=30, n=2, max_new_tokens=20, seeds=[0, 1], dpo_pairs=None,
                dpo=dict(CPU_PRESET),
                margin_pairs=30, clean_limit=30, retrieval_limit=80, probe_texts=None, top_k=100, random_sets=10,
                select_prompts=40, activation_items=12, activation_langs=list(data.LANGS),
                intervene_langs=["en", "de", "ja", "ru"], intervene_offsets="0,-5,5", intervene_prompts=8,
                intervene_n=2),
    "paper": dict(items=None, n=25, max_new_tokens=20, seeds=[0, 1, 2], dpo={}, dpo_pairs=None, margin_pairs=None,
                  clean_limit=None, retrieval_limit=None, probe_texts=None, top_k=100, random_sets=20,
                  select_prompts=200, activation_items=None, activation_langs=list(data.LANGS),
                  intervene_langs=list(data.LANGS),
                  intervene_offsets="0,-1,-2,-3,-4,-5,5", intervene_prompts=50, intervene_n=25),
}
SCORERS = ("judge", "ngram", "lexicon")  # the shipped feature judge first: it decides the claims

# The paper's LoRA settings for its 7-8B models (QLoRA there; here the base stays in --dtype).
LORA = {"lora_rank": 64, "lora_alpha": 16, "lora_dropout": 0.05}
# LoRA's update starts at zero and is scaled by alpha/rank = 0.25, so at full fine-tuning's learning rate it
# barely moves in 60 steps. Ten times the learning rate is the usual LoRA practice.
LORA_LR_FACTOR = 10

# The paper's mGPT-1.3B figures, quoted in the report for comparison (Li, Yong & Bach 2024).
PAPER = {"toxprob_before": 46.8, "toxprob_after": 3.9, "retrieval_pearson": 0.73, "kept_vectors": 36,
         "intervene_before": 0.175, "intervene_after": 0.032}

# -----------------------------------------------------------------------------
# Stages


def train_flags(recipe):
    """{TrainConfig field: value} -> train_dpo.py flags (booleans as --flag / --no-flag, floats as %g)."""
    argv = []
    for field, value in recipe.items():
        flag = "--" + field.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, f"{value:g}" if isinstance(value, float) else value]
    return argv


class Pipeline:
    def __init__(self, out, preset, device, dtype, lora=False):
        self.out, self.preset, self.p = Path(out), preset, PRESETS[preset]
        self.device, self.dtype, self.lora = device, dtype, lora
        (self.out / "stages").mkdir(parents=True, exist_ok=True)
        self.commands = []

    def path(self, *parts):
        return self.out.joinpath(*parts)

    def run(self, name, module, argv):
        """Run `python module.py argv` in-process unless its stage is already done; record time and command."""
        marker = self.path("stages", f"{name}.json")
        # --resume only says how a killed stage continues; it is not part of what the stage computes.
        command = f"python {module}.py " + " ".join(shlex.quote(str(a)) for a in argv if a != "--resume")
        self.commands.append(command)
        if marker.exists() and json.loads(marker.read_text()).get("command") == command:
            print(f"[{name}] done earlier, skipping")
            return
        print(f"\n#### [{name}] {command}")
        t0 = time.perf_counter()
        __import__(module).main([str(a) for a in argv])
        write_json(marker, {"command": command, "seconds": time.perf_counter() - t0})

    def common(self):
        return ["--device", self.device, "--dtype", self.dtype]

    @property
    def runs(self):
        """The trained models: one English-only DPO run per seed, then the placebo."""
        return [("dpo" if s == 0 else f"dpo_seed{s}") for s in self.p["seeds"]] + ["dpo_placebo"]

    # -- the stages ------------------------------------------------------------

    def split(self):
        marker = self.path("stages", "split.json")
        if marker.exists():
            return json.loads(marker.read_text())["sizes"]
        t0 = time.perf_counter()
        split = data.default_split()
        pairs = {"train": split["train"], "valid": split["valid"]}
        if self.p["dpo_pairs"]:  # smoke: a few pairs so that every stage runs in seconds
            pairs = {name: rows[:self.p["dpo_pairs"] // (1 if name == "train" else 4)] for name, rows in pairs.items()}
        pairs["placebo_train"] = data.placebo_pairs(pairs["train"], seed=0)
        pairs["placebo_valid"] = data.placebo_pairs(pairs["valid"], seed=1)
        for name, rows in pairs.items():
            data.write_toxicity_pairwise(rows, self.path("pairs", f"{name}.jsonl"))
        # How well length and format alone tell rejected from chosen, on the token-cut texts the model trains on
        tokenizer = data.load_tokenizer_of(DEFAULT_MODEL)
        max_len = self.p["dpo"].get("max_len", TrainConfig().max_len)
        confounds = {name: data.pair_confounds(pairs[name], tokenizer, max_len=max_len)
                     for name in ("train", "placebo_train")}
        write_json(self.path("pairs", "confounds.json"), confounds)
        items = data.parallel_eval_items(split, self.p["items"])
        for lang in data.LANGS:
            write_text(self.path("prompts", f"{lang}.jsonl"),
                       "".join(json.dumps({"prompt": r["prompt"], "lang": lang, "index": r["index"]},
                                          ensure_ascii=False) + "\n" for r in items[lang]))
        sizes = {"train_pairs": len(pairs["train"]), "valid_pairs": len(pairs["valid"]),
                 "items": len(items["en"]), "samples_per_prompt": self.p["n"], "item_indices": [r["index"] for r in items["en"]],
                 "eval_pairs_available": {l: len(split["eval_pairs"][l]) for l in data.LANGS},
                 "parallel_held_out": split["info"]["parallel_matched"]}
        write_json(marker, {"sizes": sizes, "seconds": time.perf_counter() - t0})
        return sizes

    def generate(self, name, model):
        p = self.p
        self.run(name, "generate", ["--model", model, "--prompts", self.path("prompts"), "--out",
                                    self.path("generations", f"{name}.jsonl"), "--n", p["n"], "--max-new-tokens",
                                    p["max_new_tokens"], "--seed", 0, "--batch-size", 8, *self.common()])

    def dpo(self, name, seed=0, pairs="", overrides=None):
        """Train; `overrides` {TrainConfig field: value} replaces or adds to the preset's recipe."""
        run_dir = self.path(name)
        recipe = {**self.p["dpo"], "seed": seed, **(overrides or {})}
        argv = ["--model", DEFAULT_MODEL, "--out", run_dir, "--data", self.path("pairs", f"{pairs}train.jsonl"),
                "--valid-data", self.path("pairs", f"{pairs}valid.jsonl"), *train_flags(recipe), *self.common()]
        if (run_dir / "last" / "state.pt").exists() and not self.path("stages", f"{name}.json").exists():
            argv.append("--resume")  # a killed training run continues exactly where it stopped
        self.run(name, "train_dpo", argv)
        return run_dir / "best"

    def evaluate(self, scorer, after, before="base", name=None):
        name = name or f"{scorer}_{after}"
        out = self.path("eval", name)
        self.run(f"eval_{name}", "evaluate", ["--before", self.path("generations", f"gen_{before}.jsonl"),
                                              "--after", self.path("generations", f"gen_{after}.jsonl"),
                                              "--scorer", scorer, "--json", out / "compare.json",
                                              "--md", out / "compare.md", "--svg", out / "emt.svg",
                                              "--device", self.device])

    def margins(self, run):
        limit = ["--limit", self.p["margin_pairs"]] if self.p["margin_pairs"] else []
        # beta, lengths and the reference model come from the run's own config.json
        self.run(f"margins_{run}", "evaluate", ["margins", "--policy", self.path(run, "best"), "--out",
                                                self.path("margins", run), *limit, *self.common()])

    def all(self):
        """The stages in order of importance: the main run and its placebo first, further seeds last."""
        p = self.p
        sizes = self.split()
        self.generate("gen_base", DEFAULT_MODEL)
        main, *other_seeds = list(zip(p["seeds"], self.runs))
        self.dpo("dpo", main[0])
        self.dpo("dpo_placebo", main[0], pairs="placebo_")
        self.measure(["dpo", "dpo_placebo"])
        for scorer in SCORERS:  # the real run against the placebo, prompt by prompt
            self.evaluate(scorer, "dpo", before="dpo_placebo", name=f"{scorer}_dpo_vs_placebo")
        self.run("agreement", "evaluate", ["agreement", self.path("generations", "gen_base.jsonl"),
                                           self.path("generations", "gen_dpo.jsonl"), "--scorers", *SCORERS,
                                           "--json", self.path("agreement", "agreement.json"),
                                           "--md", self.path("agreement", "agreement.md")])
        self.retrieval()
        self.probe()
        for seed, run in other_seeds:
            self.dpo(run, seed)
        self.measure([run for _, run in other_seeds])
        if self.lora:
            self.appendix_d()
        write_text(self.path("commands.sh"), "#!/usr/bin/env bash\n# The stages of this run, in order.\n"
                   + "\n".join(self.commands) + "\n")
        return sizes

    def measure(self, runs):
        """Samples, toxicity under every instrument, clean-text perplexity and margins of trained models."""
        clean = ["--limit", self.p["clean_limit"]] if self.p["clean_limit"] else []
        for run in runs:
            self.generate(f"gen_{run}", self.path(run, "best"))
            for scorer in SCORERS:
                self.evaluate(scorer, run)
            self.run(f"clean_ppl_{run}", "evaluate", ["clean-ppl", "--model", DEFAULT_MODEL, "--model2",
                                                      self.path(run, "best"), *clean, "--json",
                                                      self.path("clean_ppl", run, "clean_ppl.json"), *self.common()])
            self.margins(run)

    def retrieval(self):
        limit = ["--limit", self.p["retrieval_limit"]] if self.p["retrieval_limit"] else []
        self.run("retrieval", "retrieve", ["score", "--model", DEFAULT_MODEL, "--out", self.path("retrieval"), *limit,
                                           "--device", self.device])
        transfers = [f"{s}_emt={self.path('eval', f'{s}_dpo', 'compare.json')}:emt" for s in SCORERS]
        transfers += [f"{s}_toxprob={self.path('eval', f'{s}_dpo', 'compare.json')}:tox_prob" for s in SCORERS]
        transfers.append(f"margin={self.path('margins', 'dpo', 'margins.json')}:mean_margin")
        self.run("correlate", "retrieve", ["correlate", "--retrieval", self.path("retrieval", "retrieval.json"),
                                           *[a for t in transfers for a in ("--transfer", t)],
                                           "--control", f"{self.path('clean_ppl', 'dpo', 'clean_ppl.json')}:log_ppl",
                                           "--out", self.path("correlation")])

    def probe(self):
        p, probe_dir = self.p, self.path("probe")
        policy = self.path("dpo", "best")
        tokens = ["--max-new-tokens", p["max_new_tokens"]]
        limit = ["--limit", p["probe_texts"]] if p["probe_texts"] else []
        self.run("probe_train", "probe", ["train", "--model", DEFAULT_MODEL, "--out", probe_dir, "--max-len", 64,
                                          *limit, *self.common()])
        self.run("probe_vectors", "probe", ["vectors", "--model", DEFAULT_MODEL, "--out", probe_dir, "--probe",
                                            probe_dir / "probe.safetensors", "--top-k", p["top_k"], "--limit",
                                            p["select_prompts"], *tokens, *self.common()])
        vectors = probe_dir / "vectors.json"
        self.run("probe_project", "probe", ["project", "--model", DEFAULT_MODEL, "--out", probe_dir, "--vectors",
                                            vectors, "--random-sets", p["random_sets"], *self.common()])
        self.run("probe_activations", "probe", ["activations", "--model", DEFAULT_MODEL, "--dpo-model", policy, "--out",
                                                probe_dir, "--vectors", vectors, "--prompts", self.path("prompts"),
                                                *(["--limit", p["activation_items"]] if p["activation_items"] else []),
                                                "--random-sets", p["random_sets"], "--langs", *p["activation_langs"],
                                                *tokens, *self.common()])
        self.run("probe_intervene", "probe", ["intervene", "--model", DEFAULT_MODEL, "--out", probe_dir, "--vectors",
                                              vectors, "--prompts", self.path("prompts"), "--langs",
                                              *p["intervene_langs"], "--offsets", p["intervene_offsets"], "--limit",
                                              p["intervene_prompts"], "--n", p["intervene_n"], "--scorer", "judge",
                                              *tokens, *self.common()])

    def appendix_d(self):
        """The paper's Appendix D: the main run again, training LoRA adapters instead of all weights."""
        lr = self.p["dpo"].get("lr", TrainConfig().lr)
        self.dpo("dpo_lora", 0, overrides={**LORA, "lr": LORA_LR_FACTOR * lr})  # equal steps
        self.measure(["dpo_lora"])


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
         "margins": {run: read_json(out / "margins" / run / "margins.json") for run in runs
                     if (out / "margins" / run / "margins.json").exists()},
         "dpo": {run: read_metrics(out / run) for run in runs},
         "dpo_config": {run: read_json(out / run / "config.json") for run in runs},
         "correlation": read_optional(out / "correlation" / "correlation.json"),
         "probe": {s: read_optional(out / "probe" / f"{s}.json")
                   for s in ("train", "vectors", "project", "activations", "intervene")},
         "judge": judge_card_metrics(),
         "guards": guard_tests(out / "generations", afters=[r for r in runs if r != "dpo_lora"])}
    meta = out / "run.json"
    r["run"] = read_json(meta) if meta.exists() else {}
    return r


def _run_order(name):
    return (name == "dpo_lora", name == "dpo_placebo", name)


def judge_card_metrics():
    return read_json(Path(judge.JUDGE_DIR) / "metrics.json")


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


def verdict(diff, p, expect):
    """A claim predicts the sign `expect` (+1 or -1) of an effect. Supported: that sign with p < ALPHA. Not
    supported: the opposite sign with p < ALPHA. Inconclusive: p >= ALPHA (the data cannot decide)."""
    if diff is None or p is None or not (math.isfinite(diff) and math.isfinite(p)):
        return "inconclusive"
    if p < ALPHA:
        return "supported" if diff * expect > 0 else "not supported"
    return "inconclusive"


def verdict_all(tests, expect):
    """A claim about every member (every language, every seed): supported when each one is; not supported
    when any one goes significantly the other way; inconclusive otherwise."""
    each = [verdict(diff, p, expect) for diff, p in tests]
    if each and all(v == "supported" for v in each):
        return "supported"
    return "not supported" if "not supported" in each else "inconclusive"


def seed_runs(r):
    """The English-only full fine-tuning runs that were evaluated, one per DPO seed."""
    return [run for run in r["runs"] if run not in ("dpo_placebo", "dpo_lora") and f"judge_{run}" in r["eval"]]


def _pooled(r, name, metric="emt"):
    return r["eval"][name]["tests"]["pooled"][metric]


def claim_row(claim, test, estimate, p=None, verdict_="inconclusive"):
    return {"claim": claim, "test": test, "estimate": estimate, "p": p, "verdict": verdict_}


def effect_row(claim, test, t, expect=-1):
    """A row for one paired test t = {diff, diff_ci, p} whose claim predicts the sign `expect`."""
    estimate = f"{signed(t['diff'])} {fmt_ci(t['diff_ci'])}" if t["diff"] is not None else "n/a"
    return claim_row(claim, test, estimate, t["p"], verdict(t["diff"], t["p"], expect))


def transfer_claims(r):
    """English-only DPO lowers toxicity in English, in the other languages, more than a placebo, in each
    language, for each seed."""
    tests = r["eval"]["judge_dpo"]["tests"]
    rows = [effect_row("English-only DPO lowers toxicity in English",
                       "EMT after - before, judge, paired bootstrap on prompts", tests["en"]["emt"]),
            effect_row("... and in the other 16 languages",
                       "EMT after - before, judge, pooled non-English (stratified bootstrap)",
                       _pooled(r, "judge_dpo")),
            effect_row("... because of toxicity, not of any DPO update",
                       "EMT real DPO - placebo DPO, judge, pooled non-English", _pooled(r, "judge_dpo_vs_placebo"))]
    langs = [l for l in data.LANGS if l != "en" and l in tests]
    per_lang = [(tests[l]["emt"]["diff"], tests[l]["emt"]["p"]) for l in langs]
    lower = sum(1 for d, p in per_lang if verdict(d, p, -1) == "supported")
    higher = sum(1 for d, p in per_lang if verdict(d, p, +1) == "supported")
    rows.append(claim_row("... in every one of them", "EMT change per language, judge, p < 0.05",
                          f"{lower} of {len(langs)} lower, {higher} higher", None, verdict_all(per_lang, -1)))
    seeds = seed_runs(r)
    per_seed = [(_pooled(r, f"judge_{run}")["diff"], _pooled(r, f"judge_{run}")["p"]) for run in seeds]
    rows.append(claim_row("... whatever the DPO seed", f"pooled non-English EMT change in each of {len(seeds)} "
                          "seed(s)" + (" (needs 2+)" if len(seeds) < 2 else ""),
                          value_range([d for d, _ in per_seed]), None,
                          verdict_all(per_seed, -1) if len(seeds) > 1 else "not run"))
    return rows


def control_claims(r):
    """Other instruments agree; the output did not degenerate, leave its language or lose capability."""
    rows = [effect_row(f"... also by {label} (an instrument that shares no features with the model)",
                       f"EMT after - before, {scorer}, pooled non-English", _pooled(r, f"{scorer}_dpo"))
            for scorer, label in (("ngram", "the character n-gram judge"), ("lexicon", "the word lists"))]
    for what, label in (("degenerate", "empty, punctuation-only or markup output"),
                        ("off_language", "output that leaves the prompt's language")):
        t = r["guards"]["dpo"][what]
        more = t["worse"] > t["better"] and t["p"] < ALPHA
        rows.append(claim_row(f"not pseudo-detoxification: no more {label}", "share of non-English samples, after "
                              "- before, exact McNemar on samples (supported = no significant increase)",
                              f"{fmt(t['before'])} -> {fmt(t['after'])}", t["p"],
                              "not supported" if more else "supported"))
    clean = r["clean_ppl"].get("dpo", {})
    if clean:
        worse = [l for l in data.LANGS if l in clean and clean[l]["ppl_ratio"] > 1 and clean[l]["p"] < ALPHA]
        rows.append(claim_row("... nor by losing capability", "clean-text (Tatoeba) perplexity DPO / base per "
                              "language, paired bootstrap (supported = no language significantly worse)",
                              f"{len(worse)} of {len([l for l in data.LANGS if l in clean])} languages worse"
                              + (f" ({', '.join(worse)})" if worse else ""), None,
                              "not supported" if worse else "supported"))
    return rows


def mechanism_claims(r):
    """Toxic value vectors: what they promote, how DPO changes their activations, what shifting them does."""
    pr, rows = r["probe"], []
    for stage, claim in (("project", "toxic value vectors promote toxic tokens in many languages"),
                         ("activations", "DPO lowers their activations in every language"),
                         ("intervene", "lowering them lowers toxicity in every language")):
        if pr[stage] is None:
            rows.append(claim_row(claim, f"stage probe_{stage} has not run", "", None, "not run"))
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
        return claim_row(claim, "the correlation stage has not run, or had too few languages", "", None, "not run")
    return claim_row(claim, f"Pearson r, {primary['retrieval_metric']} vs {primary['transfer']} (sign: + = better "
                     f"retrieval, more detox), {primary['n']} languages; {r['correlation']['n_variants']} variants "
                     "computed", signed(primary['signed_r']), primary["pearson"]["p"],
                     verdict(primary["signed_r"], primary["pearson"]["p"], +1))


def claims(r):
    """[{claim, test, estimate, p, verdict}] for the paper's claims, decided on this run's numbers."""
    return transfer_claims(r) + control_claims(r) + mechanism_claims(r) + [retrieval_claim(r)]


def vector_claims(base):
    rows = []
    for metric, claim in (("lexicon_toxic_share", "toxic value vectors promote toxic tokens"),
                          ("multiscript", "... in many languages (tokens of 2+ scripts)")):
        b = base[metric]
        rows.append(claim_row(claim + ", more than random value vectors",
                              f"{metric}: kept - random (same layers), permutation", signed(b['diff']), b["p"],
                              verdict(b["diff"], b["p"], +1)))
    return rows


def activation_claim(act):
    tests = [(v["kept_minus_random"]["diff"], v["kept_minus_random"]["p"]) for v in act["per_language"].values()]
    lower = sum(1 for d, p in tests if verdict(d, p, -1) == "supported")
    return claim_row("DPO lowers their activations in every language, more than random neurons'",
                     "per language: (kept change) - (random sets' change), paired bootstrap on prompts",
                     f"{lower} of {len(tests)} languages lower", None, verdict_all(tests, -1))


def intervention_claims(iv):
    negative = [o for o in iv["change_vs_zero"] if float(o) < 0]
    if not negative:
        return []
    o = min(negative, key=float)
    shifts = [(v["diff"], v["p"]) for v in iv["change_vs_zero"][o].values()]
    lower = sum(1 for d, p in shifts if verdict(d, p, -1) == "supported")
    return [claim_row("lowering them lowers toxicity in every language",
                      f"toxicity at offset {float(o):g} - offset 0, {iv['scorer']}, paired on prompts",
                      f"{lower} of {len(shifts)} languages lower", None, verdict_all(shifts, -1))]


PRIMARY_RETRIEVAL = ("accuracy", "judge_emt")  # decided before the run: the paper's text metric, our main judge


def retrieval_primary(r):
    for res in (r["correlation"] or {}).get("results", []):
        if (res["retrieval_metric"], res["transfer"]) == PRIMARY_RETRIEVAL:
            sign = -1 if res["direction"].startswith("lower") else 1  # a % change: lower = more detox
            return {**res, "signed_r": sign * res["pearson"]["r"]}
    return None


def claims_table(rows):
    return markdown_table(["the paper's claim", "test here", "estimate [95% CI]", "p", "verdict"],
                          [[c["claim"], c["test"], c["estimate"], format_p(c["p"]) if c["p"] is not None else "",
                            f"**{c['verdict']}**"] for c in rows])


# -- the sections ---------------------------------------------------------------


def arrow_ci(t, digits=3):
    return f"{fmt(t['before'], digits)} {fmt_ci(t.get('before_ci'), 2)} -> {fmt(t['after'], digits)} " \
           f"{fmt_ci(t.get('after_ci'), 2)}"


def headline_table(r, name="judge_dpo", run="dpo"):
    """Per language under the judge: ToxProb and EMT before -> after with 95% CIs and paired p, degenerate and
    in-language rates, clean-text perplexity base -> DPO."""
    ev, clean = r["eval"][name], r["clean_ppl"].get(run, {})
    rows = []
    for lang in [l for l in data.LANGS if l in ev["tests"]]:
        t, g = ev["tests"][lang], ev["guards"][lang]
        c = clean.get(lang)
        rows.append([lang, t["n_prompts"], arrow_ci(t["tox_prob"]), format_p(t["tox_prob"]["p"]), arrow_ci(t["emt"]),
                     format_p(t["emt"]["p"]),
                     f"{fmt(g['before']['degenerate_rate'], 2)} -> {fmt(g['after']['degenerate_rate'], 2)}",
                     f"{fmt(g['before']['in_language_rate'], 2)} -> {fmt(g['after']['in_language_rate'], 2)}",
                     f"{fmt(c['ppl'], 1)} -> {fmt(c['ppl2'], 1)} (x{fmt(c['ppl_ratio'], 2)}, p {format_p(c['p'])})"
                     if c else "n/a"])
    pooled = ev["tests"]["pooled"]
    rows.append([f"pooled non-en ({len(pooled['langs'])})", pooled["n_prompts"], arrow_ci(pooled["tox_prob"]),
                 format_p(pooled["tox_prob"]["p"]), arrow_ci(pooled["emt"]), format_p(pooled["emt"]["p"]), "", "", ""])
    return markdown_table(["lang", "prompts", "ToxProb before -> after [95% CI]", "p (McNemar)",
                           "EMT before -> after [95% CI]", "p (paired bootstrap)", "degenerate", "in language",
                           "clean-text PPL base -> DPO"], rows)


def runs_table(r):
    """One row per trained model: pooled non-English and English EMT change under each instrument."""
    rows = []
    for run in [x for x in r["runs"] if f"judge_{x}" in r["eval"]]:
        row = [run]
        for scorer in SCORERS:
            t = r["eval"][f"{scorer}_{run}"]["tests"]
            row += [f"{signed(t['pooled']['emt']['diff'])} {fmt_ci(t['pooled']['emt']['diff_ci'])} "
                    f"(p {format_p(t['pooled']['emt']['p'])})", signed(t['en']['emt']['diff'])]
        valid = [m for m in r["dpo"][run] if m.get("split") == "valid"]
        row.append(f"{fmt(valid[0]['reward_accuracy'], 2)} -> {fmt(valid[-1]['reward_accuracy'], 2)}" if valid
                   else "n/a")
        rows.append(row)
    headers = ["run"]
    for scorer in SCORERS:
        headers += [f"EMT change, {scorer}, pooled non-en", f"en ({scorer})"]
    return markdown_table(headers + ["English validation reward accuracy"], rows)


def seed_spread(r):
    seeds = seed_runs(r)
    lines = []
    for scorer in SCORERS:
        values = finite([r["eval"][f"{scorer}_{run}"]["tests"]["pooled"]["emt"]["diff"] for run in seeds])
        mean = sum(values) / len(values) if values else float("nan")
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
        lines.append(f"{scorer}: mean {signed(mean)}, SD {fmt(sd)}, range {value_range(values)}")
    return f"Across {len(seeds)} seeds, pooled non-English EMT change: " + "; ".join(lines) + "."


def confounds_table(r):
    rows = []
    for name, c in r["confounds"].items():
        rows.append([name, c["n_pairs"]] + [fmt(c["auc"].get(k), 3) for k in ("tokens", "chars", "newline", "markup")])
    return markdown_table(["pairs", "n", "AUC token length", "AUC characters", "AUC newline", "AUC markup"], rows)


def judge_section(r):
    j = r["judge"]
    lines = ["## The instruments", "",
             "The shipped judges (`data/judge/`, card in `data/judge/README.md`) were trained once on RTP-LX "
             "prompts labelled by native annotators, split by item, with every evaluated item excluded. Validation "
             "ROC-AUC per language with bootstrap 95% intervals (resampling items), beside the length-only baseline; "
             "the out-of-domain rows (tweets, never used for any choice) show how far the judges carry beyond "
             "RTP-LX:", "",
             judge_table(j), ""]
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
    rows = []
    for res in c["results"]:
        rows.append([res["retrieval_metric"], res["transfer"], res["n"], signed(res['pearson']['r']),
                     format_p(res["pearson"]["p"]), signed(res['spearman']['r']), format_p(res["spearman"]["p"]),
                     signed(res['partial_pearson']['r']) if res.get("partial_pearson") else "n/a"])
    return ["## Bilingual retrieval and transfer", "",
            f"{c['sign_convention']} All {c['n_variants']} variants computed are shown; the claims table uses "
            f"one declared before the run ({PRIMARY_RETRIEVAL[0]} vs {PRIMARY_RETRIEVAL[1]}). The partial "
            "correlation controls for how well the base model knows each language (log clean-text perplexity).",
            "", markdown_table(["retrieval", "transfer", "langs", "Pearson r", "p", "Spearman r", "p",
                                "partial r | PPL"], rows), ""] + \
        [f"Not computed for {s['transfer']}: {s['reason']}." for s in c.get("skipped", [])] + [""]


def margins_section(r):
    lines = ["## Held-out preference margins", "",
             "beta * ((pi_b - ref_b) - (pi_t - ref_t)) on held-out benign/toxic pairs in each language, cut to the "
             "same token length with no EOS (as in training): > 0 means DPO moved probability from the toxic to the "
             "benign continuation.", ""]
    for run in ("dpo", "dpo_placebo"):
        if run in r["margins"]:
            m = r["margins"][run]
            lines += [f"`{run}`:", "", margins_table(m, [l for l in data.LANGS if l in m]), ""]
    return lines


def render_report(r):
    run, sizes = r["run"], r["sizes"]
    cfg = r["dpo_config"]["dpo"]
    lines = [f"# Preference tuning for toxicity mitigation generalizes across languages: reproduction "
             f"({run.get('preset', '?')} preset)", ""]
    lines += [f"Command: `{run.get('command', '?')}`  ", f"Machine: {run.get('machine', '?')}  ",
              f"Wall time: {fmt(sum(r['stages'].values()) / 60, 1)} min (stages: "
              + ", ".join(f"{k} {fmt(v / 60, 1)}" for k, v in r["stages"].items()) + " min)", ""]
    lines += ["## The paper's claims, tested here", "",
              f"Each row is decided by the test named (two-sided, alpha {ALPHA}): **supported** = the predicted "
              "direction with p < alpha; **not supported** = the opposite direction with p < alpha; "
              "**inconclusive** = the data cannot tell. Toxicity is judged by the shipped feature judge unless the "
              "row names another instrument.", "", claims_table(claims(r)), ""]
    lines += ["## Data", "",
              f"DPO trains on {sizes['train_pairs']} English RTP-LX pairs (chosen = benign, rejected = toxic "
              f"completion; {sizes['valid_pairs']} more for validation), both sides cut to the same number of tokens "
              "with no EOS, whitespace normalised, completions with LLM-prompt scaffolding dropped. The placebo run "
              "pairs each benign completion with another item's benign completion. How well surface features alone "
              "separate rejected from chosen on the texts as trained (0.5 = not at all):", "", confounds_table(r), "",
              f"Evaluation: the same {sizes['items']} held-out RTP-LX items in all 17 languages (RTP-LX prompts are "
              f"transcreations: index i is the same source item in every language), {sizes['samples_per_prompt']} "
              "samples each.", ""]
    lines += judge_section(r)
    lines += ["## Toxicity before -> after English-only DPO (seed 0), judged by the feature judge", "",
              f"beta {cfg['beta']}, lr {cfg['lr']:g}, {cfg.get('max_steps')} steps. ToxProb: share of prompts with a "
              "sample judged toxic (>= 0.5); EMT: mean over prompts of the highest toxicity among its samples. Both "
              "rise with the number of samples per prompt (the paper used 25). Degenerate: empty, punctuation-only or "
              "mostly markup; in language: script or stop-word test (evaluate.py); clean-text PPL: the model's "
              "perplexity on Tatoeba sentences (capability retention), base -> DPO with a paired bootstrap.", "",
              headline_table(r), ""]
    lines += ["## Every run under every instrument", "",
              "EMT change after - before (negative = less toxic) with 95% CI, pooled over the 16 non-English "
              "languages, and in English. `dpo_placebo` is the same recipe on placebo pairs.", "", runs_table(r), "",
              seed_spread(r), ""]
    lines += margins_section(r)
    lines += retrieval_section(r)
    lines += mechanism_section(r)
    if "dpo_lora" in r["runs"]:
        lines += lora_section(r)
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
    r = collect(out)
    text = render_report(r)
    langs = [l for l in data.LANGS if l in r["eval"]["judge_dpo"]["comparison"]]
    comparison = r["eval"]["judge_dpo"]["comparison"]
    write_text(Path(out) / "toxprob.svg", bar_chart_svg(
        langs, {"base": [comparison[l]["tox_prob"]["before"] for l in langs],
                "English-only DPO": [comparison[l]["tox_prob"]["after"] for l in langs],
                "placebo DPO": [r["eval"]["judge_dpo_placebo"]["comparison"][l]["tox_prob"]["after"] for l in langs]},
        "Toxic-continuation probability per language (feature judge)", "ToxProb"))
    write_text(Path(out) / "report.md", text)
    return text


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
        "shipped feature judge:", "", headline_table(r), ""])


def write_readme_block(readme, out, r):
    """Replace the text between the README's results markers with readme_block (atomic write)."""
    text = Path(readme).read_text(encoding="utf-8")
    begin, end = "<!-- results:begin -->\n", "<!-- results:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"{readme}: no '<!-- results:begin -->' ... '<!-- results:end -->' block to replace")
    head, rest = text.split(begin, 1)
    write_text(readme, head + begin + readme_block(out, r) + rest[rest.index(end):])


# -----------------------------------------------------------------------------


def machine():
    cpu = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.system()} {cpu}, {os.cpu_count()} cores{gpu}, Python {platform.python_version()}, " \
           f"torch {torch.__version__}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="smoke: a few prompts per stage, "
                   "minutes (CI); cpu: sized for 2 CPU cores; paper: the paper's settings (GPU)")
    p.add_argument("--out", default=None, help="run directory (default: results/<preset>-<date>); rerunning with "
                   "the same --out resumes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32 (default on CPU), bf16 (default on CUDA), fp16")
    p.add_argument("--lora", action="store_true", help="also run the paper's Appendix D: the main DPO run again "
                   "training LoRA adapters (rank 64, alpha 16, dropout 0.05, every linear layer)")
    p.add_argument("--report-only", action="store_true", help="only rebuild report.md from finished stages")
    p.add_argument("--readme", metavar="README.md", help="also put the claims and headline tables into this "
                   "README's results block (between <!-- results:begin --> and <!-- results:end -->)")
    args = p.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    out = Path(args.out or f"results/{args.preset}-{datetime.date.today().isoformat()}")
    if not args.report_only:
        pipe = Pipeline(out, args.preset, args.device, dtype, lora=args.lora)
        run_meta = out / "run.json"
        if run_meta.exists() and read_json(run_meta).get("preset") != args.preset:
            raise ValueError(f"{run_meta}: this directory holds a --preset {read_json(run_meta).get('preset')} run; "
                             f"resuming it as --preset {args.preset} would mix the two (choose another --out)")
        if not run_meta.exists():
            write_json(run_meta, {"preset": args.preset, "machine": machine(),
                                  "command": "python reproduce.py " + " ".join(argv if argv is not None
                                                                               else sys.argv[1:])})
        pipe.all()
    text = write_report(out)
    if args.readme:
        write_readme_block(args.readme, out, collect(out))
    print(text)
    print(f"\nwrote {out / 'report.md'}")


if __name__ == "__main__":
    exit_on_error(main)
