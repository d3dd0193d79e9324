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
    clean_ppl_*    perplexity on clean Tatoeba text per language, base vs each trained model, and each DPO run vs
                   a placebo run sentence by sentence (clean_ppl_dpo_vs_placebo: is the cost DPO's on toxic pairs?)
    margins_*      held-out benign-vs-toxic preference margins in every language (the run's beta and lengths)
    retrieval      bilingual sentence retrieval English <-> X, and its correlation with per-language transfer
    probe_*        toxicity probe, toxic value vectors vs random ones, their vocabulary projection, activations
                   before/after DPO vs random neurons, and the causal intervention
    *_lora         (--lora) the paper's Appendix D: the same DPO run training LoRA adapters
    report         OUT/report.md (claims.py): a claims table first, then the tables behind it, with SVG beside it

Every stage is the same CLI a user would run by hand; the exact commands go to OUT/commands.sh.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

import data
import design
from checkpoint import DEFAULT_MODEL
from claims import SCORERS, collect, read_json, write_readme_block, write_report
from loading import resolve_dtype
from report import exit_on_error, write_json, write_text
from train_config import CPU_PRESET, TrainConfig


# Sequences per sampling batch (prompts x samples). Measured with gemma-3-270m, 20 new tokens, 4 samples per prompt,
# one thread on a busy 2-core CPU: 128 sequences ran ~4% more samples per CPU-second than 32. Sampling is
# compute-bound by the 262k-row LM head, so larger batches help little; the batch changes speed, not the text.
GEN_BATCH = 128

# What each preset runs. "cpu" is sized for 2 CPU cores; "paper" is the paper's
# protocol (all held-out prompts, 25 samples, the paper's DPO recipe) and wants a GPU. `items` RTP-LX items are
# evaluated in every language (the same items in all 17), `n` samples each. `dpo` holds TrainConfig fields that
# differ from the paper's recipe; "cpu" takes train_config's CPU preset, the one source of the CPU recipe.
# `seeds`: one DPO run each; `placebo_seeds`: one placebo run each (its own derangement and pair order);
# `gentle_lr_factor`: one more DPO run ("dpo_gentle", seed 0) at this fraction of the learning rate, a second
# point of the detoxification / perplexity trade-off; `gen_batch`: sequences (prompts x samples) per sampling batch.
# `replicate_items`: the replication runs (further DPO seeds, further placebo seeds) are sampled on the first this
# many of the `items` (the same ones in every language; None: all) and compared on those: they answer "does the
# pooled effect hold again", which needs fewer prompts than the per-language claims of the main run, but at least
# claims.MIN_ITEMS: a pooled verdict counts distinct items (item i is one source text in all 17). dpo_gentle is
# sampled on all items, like the main run it is set beside. Margins: the main DPO run and the main placebo only.
# `random_sets`: the probe stages' random baselines (shuffled-label probes, matched neuron sets); with 20 a rank test
# can reach p < 0.05. The intervention samples offset 0, then each nonzero offset for the kept neurons and for every
# random set: 1 + offsets x (1 + random_sets) generation runs; cpu stays in the fluent range (-5 breaks the text).
PRESETS = {
    "smoke": dict(items=2, replicate_items=1, n=2, max_new_tokens=8, seeds=[0], placebo_seeds=[0],
                  gentle_lr_factor=None, gen_batch=64, dpo_pairs=16,
                  dpo=dict(max_steps=2, eval_every=2, max_len=48, max_prompt_len=32, response_tokens=8),
                  margin_pairs=2, clean_limit=4, retrieval_limit=12,
                  probe_texts=40, top_k=20, random_sets=2, select_prompts=3, activation_items=2,
                  activation_langs=["en", "de", "ja"],
                  intervene_langs=["en", "de"], intervene_offsets="0,-2", intervene_prompts=2, intervene_n=1),
    "cpu": dict(items=30, replicate_items=20, n=4, max_new_tokens=20, seeds=[0, 1, 2], placebo_seeds=[0, 1],
                gentle_lr_factor=0.5, gen_batch=GEN_BATCH, dpo_pairs=None, dpo=dict(CPU_PRESET),
                margin_pairs=30, clean_limit=30, retrieval_limit=80, probe_texts=None, top_k=100, random_sets=20,
                select_prompts=40, activation_items=12, activation_langs=list(data.LANGS),
                intervene_langs=["en", "de", "ja", "ru"], intervene_offsets="0,-1,-2", intervene_prompts=8,
                intervene_n=2),
    "paper": dict(items=None, replicate_items=None, n=25, max_new_tokens=20, seeds=[0, 1, 2], placebo_seeds=[0, 1],
                  gentle_lr_factor=0.5, gen_batch=GEN_BATCH, dpo={}, dpo_pairs=None, margin_pairs=None,
                  clean_limit=None, retrieval_limit=None, probe_texts=None, top_k=100, random_sets=20,
                  select_prompts=200, activation_items=None, activation_langs=list(data.LANGS),
                  intervene_langs=list(data.LANGS),
                  intervene_offsets="0,-1,-2,-3,-4,-5,5", intervene_prompts=50, intervene_n=25),
}
# The paper's LoRA settings for its 7-8B models (QLoRA there; here the base stays in --dtype).
LORA = {"lora_rank": 64, "lora_alpha": 16, "lora_dropout": 0.05}
# LoRA's update starts at zero and is scaled by alpha/rank = 0.25, so at full fine-tuning's learning rate it
# barely moves in 60 steps. Ten times the learning rate is the usual LoRA practice.
LORA_LR_FACTOR = 10

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


PRIOR_STAGES = Path(__file__).resolve().parent / "results" / "cpu-2026-12-03" / "stages"  # measured, quiet 2 cores


def stage_kind(name):
    """A stage's kind, the same for every seed, placebo and recipe point: gen_dpo_seed1, gen_dpo_placebo_seed1,
    gen_dpo_gentle -> gen_dpo; clean_ppl_dpo_gentle_vs_placebo -> clean_ppl_dpo_vs."""
    return re.sub(r"_placebo|_seed\d+|_lora|_gentle", "", name)


def measured_prior(stages_dir=PRIOR_STAGES):
    """{stage name: seconds} a committed run measured (empty when it is not there): the estimate before this run
    has measured anything."""
    return {p.stem: json.loads(p.read_text()).get("seconds", 0.0) for p in sorted(Path(stages_dir).glob("*.json"))}


class Progress:
    """Prints "stage i of N", each stage's measured time and an estimate of the time left: the remaining stages'
    prior times (from a measured run, by name or kind), scaled by how this run's finished stages compare."""

    def __init__(self, names, prior):
        self.names, self.prior, self.seconds = names, prior, {}

    def position(self, name):
        return f"stage {self.names.index(name) + 1} of {len(self.names)}" if name in self.names else "stage"

    def start(self, name, command):
        print(f"\n#### {self.position(name)} [{name}] {command}")

    def done(self, name, seconds, earlier=False):
        self.seconds[name] = seconds
        what = "done earlier, skipping" if earlier else f"done in {seconds / 60:.1f} min"
        print(f"[{name}] {self.position(name)} {what}{self.left_text()}")

    def guess(self, name):
        """Prior seconds of one stage: the same name, else the mean of its kind, else None."""
        if name in self.prior:
            return self.prior[name]
        kind = [v for k, v in self.prior.items() if stage_kind(k) == stage_kind(name)]
        return sum(kind) / len(kind) if kind else None

    def estimate_left(self):
        """Seconds the stages not yet done should take, summed over those a prior covers (unestimated() names the
        others), or None when stages are pending and no prior covers any of them."""
        pending = [n for n in self.names if n not in self.seconds]
        guesses = [g for g in map(self.guess, pending) if g is not None]
        if pending and not guesses:
            return None
        known = [n for n in self.seconds if self.guess(n)]
        scale = sum(self.seconds[n] for n in known) / sum(self.guess(n) for n in known) if known else 1.0
        return scale * sum(guesses)

    def unestimated(self):
        """The pending stages no prior covers (a kind the measured run did not have)."""
        return [n for n in self.names if n not in self.seconds and self.guess(n) is None]

    def left_text(self):
        """'; about N min left' (plus the stages that estimate leaves out), or '' without an estimate."""
        left, new = self.estimate_left(), self.unestimated()
        if left is None:
            return ""
        return f"; about {left / 60:.0f} min left" + (f" (+ {len(new)} stage(s) never measured)" if new else "")


class Pipeline:
    def __init__(self, out, preset, device, dtype, lora=False):
        self.out, self.preset, self.p = Path(out), preset, PRESETS[preset]
        self.device, self.dtype, self.lora = device, dtype, lora
        (self.out / "stages").mkdir(parents=True, exist_ok=True)
        self.commands = []
        self.progress = Progress([], {})  # main() replaces it with one that knows the plan

    def path(self, *parts):
        return self.out.joinpath(*parts)

    def run(self, name, module, argv):
        """Run `python module.py argv` in-process unless its stage is already done; record time and command.
        While planning (self.progress is None) only the stage's name is recorded."""
        marker = self.path("stages", f"{name}.json")
        # --resume only says how a killed stage continues; it is not part of what the stage computes.
        command = f"python {module}.py " + " ".join(shlex.quote(str(a)) for a in argv if a != "--resume")
        self.commands.append(command)
        if self.progress is None:
            self.planned.append(name)
            return
        if marker.exists() and json.loads(marker.read_text()).get("command") == command:
            self.progress.done(name, json.loads(marker.read_text()).get("seconds", 0.0), earlier=True)
            return
        self.progress.start(name, command)
        t0 = time.perf_counter()
        __import__(module).main([str(a) for a in argv])
        write_json(marker, {"command": command, "seconds": time.perf_counter() - t0})
        self.progress.done(name, time.perf_counter() - t0)

    def plan(self):
        """The names of the stages all() runs, in order: all() walked with nothing run (split skipped)."""
        commands, split, progress = self.commands, self.split, self.progress
        self.split, self.progress, self.planned, self.commands = (lambda: None), None, [], []
        try:
            self.all()
        finally:
            self.split, self.progress, self.commands = split, progress, commands
        return ["split"] + self.planned

    def common(self):
        return ["--device", self.device, "--dtype", self.dtype]

    @property
    def dpo_runs(self):
        """(seed, run name) of the English-only DPO runs, one per seed: dpo, dpo_seed1, ..."""
        return [(s, "dpo" if s == 0 else f"dpo_seed{s}") for s in self.p["seeds"]]

    @property
    def placebo_runs(self):
        """(seed, run name, pair-file prefix) of the placebo runs, one per placebo seed: dpo_placebo, then
        dpo_placebo_seed1, ..."""
        return [(s, "dpo_placebo" if s == 0 else f"dpo_placebo_seed{s}", "placebo_" if s == 0 else f"placebo_seed{s}_")
                for s in self.p["placebo_seeds"]]

    @property
    def runs(self):
        """The trained models: the DPO runs, the placebo runs, then the gentler recipe point (dpo_gentle)."""
        return [run for _, run in self.dpo_runs] + [run for _, run, _ in self.placebo_runs] + \
            (["dpo_gentle"] if self.p["gentle_lr_factor"] else [])

    # -- the stages ------------------------------------------------------------

    def split(self):
        data.fetch_missing()  # first use: a dataset missing under the data root is fetched, or one line says how
        marker = self.path("stages", "split.json")
        if marker.exists():
            return json.loads(marker.read_text())["sizes"]
        t0 = time.perf_counter()
        split = design.default_split()
        pairs = {"train": split["train"], "valid": split["valid"]}
        if self.p["dpo_pairs"]:  # smoke: a few pairs so that every stage runs in seconds
            pairs = {name: rows[:self.p["dpo_pairs"] // (1 if name == "train" else 4)] for name, rows in pairs.items()}
        for seed, _, prefix in self.placebo_runs:  # each placebo seed: its own derangement of the benign texts
            pairs[f"{prefix}train"] = design.placebo_pairs(pairs["train"], seed=seed)
            pairs[f"{prefix}valid"] = design.placebo_pairs(pairs["valid"], seed=seed + 1)
        for name, rows in pairs.items():
            data.write_toxicity_pairwise(rows, self.path("pairs", f"{name}.jsonl"), refs=True)
        confounds = self.confounds({name: pairs[name] for name in pairs if name.endswith("train")})
        write_json(self.path("pairs", "confounds.json"), confounds)
        items = design.parallel_eval_items(split, self.p["items"])
        for lang in data.LANGS:
            write_text(self.path("prompts", f"{lang}.jsonl"),
                       "".join(json.dumps({"prompt": data.text_ref(lang, r["index"], "prompt", r["prompt"]),
                                           "lang": lang, "index": r["index"]}) + "\n" for r in items[lang]))
        sizes = {"train_pairs": len(pairs["train"]), "valid_pairs": len(pairs["valid"]),
                 "response_tokens": self.recipe("response_tokens"),
                 "pairs_kept": {name: c["n_pairs"] for name, c in confounds.items()},
                 "items": len(items["en"]),
                 "replicate_items": min(self.p["replicate_items"] or len(items["en"]), len(items["en"])),
                 "samples_per_prompt": self.p["n"], "item_indices": [r["index"] for r in items["en"]],
                 "eval_pairs_available": {l: len(split["eval_pairs"][l]) for l in data.LANGS},
                 "parallel_held_out": split["info"]["parallel_matched"]}
        write_json(marker, {"sizes": sizes, "seconds": time.perf_counter() - t0})
        return sizes

    def recipe(self, field):
        """A TrainConfig field as the preset's DPO runs use it."""
        return self.p["dpo"].get(field, getattr(TrainConfig(), field))

    def confounds(self, pairs):
        """{name: design.pair_confounds} of the pair lists `pairs`: how well length, a cut side, a finished sentence
        and format alone tell rejected from chosen, on the token-cut texts the model trains on (the pairs the
        response budget drops are counted, n_dropped)."""
        tokenizer = design.load_tokenizer_of(DEFAULT_MODEL)
        cut = [self.recipe(k) for k in ("max_prompt_len", "max_len", "response_tokens")]
        return {name: design.pair_confounds(rows, tokenizer, *cut) for name, rows in pairs.items()}

    def generate(self, name, model, items=None):
        """Sample the evaluation prompts (the first `items` of each language, None: all) with `model`."""
        p = self.p
        limit = ["--limit", items] if items else []
        # one sampling batch holds gen_batch sequences: gen_batch / n prompts, each with its n samples
        self.run(name, "generate", ["--model", model, "--prompts", self.path("prompts"), "--out",
                                    self.path("generations", f"{name}.jsonl"), "--n", p["n"], "--max-new-tokens",
                                    p["max_new_tokens"], "--seed", 0, "--batch-size", max(1, p["gen_batch"] // p["n"]),
                                    *limit, *self.common()])

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
        # beta, lengths, the response budget and the reference model come from the run's own config.json; every
        # run starts from the same model, so its log-probs are computed once and shared
        self.run(f"margins_{run}", "evaluate", ["margins", "--policy", self.path(run, "best"), "--out",
                                                self.path("margins", run), *limit, "--reference-cache",
                                                self.path("margins", "reference_logps.pt"), *self.common()])

    def all(self):
        """The stages in order of importance: the main run and its placebo first, further seeds last."""
        p = self.p
        sizes = self.split()
        self.generate("gen_base", DEFAULT_MODEL)
        (main_seed, main), *other_seeds = self.dpo_runs
        (placebo_seed, placebo, prefix), *other_placebos = self.placebo_runs
        self.dpo(main, main_seed)
        self.dpo(placebo, placebo_seed, pairs=prefix)
        self.measure([main, placebo])
        self.against_placebo(main, placebo)
        self.run("agreement", "evaluate", ["agreement", self.path("generations", "gen_base.jsonl"),
                                           self.path("generations", "gen_dpo.jsonl"), "--scorers", *SCORERS,
                                           "--json", self.path("agreement", "agreement.json"),
                                           "--md", self.path("agreement", "agreement.md")])
        self.retrieval()
        self.probe()
        for seed, run in other_seeds:
            self.dpo(run, seed)
        for seed, run, prefix in other_placebos:
            self.dpo(run, seed, pairs=prefix)
        gentle = ["dpo_gentle"] if p["gentle_lr_factor"] else []
        for run in gentle:  # a second point of the trade-off: the main run at a fraction of its learning rate
            self.dpo(run, main_seed, overrides={"lr": p["gentle_lr_factor"] * self.recipe("lr")})
        self.measure([run for _, run in other_seeds] + [run for _, run, _ in other_placebos],
                     items=p["replicate_items"], margins=False)
        self.measure(gentle, margins=False)  # all items: the trade-off table sets it beside the main run
        for run in gentle:
            self.against_placebo(run, placebo)
        for _, run, _ in other_placebos:
            self.against_placebo(main, run)
        if self.lora:
            self.appendix_d()
        write_text(self.path("commands.sh"), "#!/usr/bin/env bash\n# The stages of this run, in order.\n"
                   + "\n".join(self.commands) + "\n")
        return sizes

    def measure(self, runs, items=None, margins=True):
        """Samples (on the first `items` evaluation items, None: all), toxicity under every instrument, clean-text
        perplexity and (margins=True) held-out margins of trained models."""
        clean = ["--limit", self.p["clean_limit"]] if self.p["clean_limit"] else []
        for run in runs:
            self.generate(f"gen_{run}", self.path(run, "best"), items)
            for scorer in SCORERS:
                self.evaluate(scorer, run)
            # the base model's per-sentence values are measured once and shared by every run
            self.run(f"clean_ppl_{run}", "evaluate", ["clean-ppl", "--model", DEFAULT_MODEL, "--model2",
                                                      self.path(run, "best"), *clean, "--model-cache",
                                                      self.path("clean_ppl", "base.json"), "--json",
                                                      self.path("clean_ppl", run, "clean_ppl.json"), *self.common()])
            if margins:
                self.margins(run)

    def against_placebo(self, run, placebo):
        """A trained run against a placebo run, prompt by prompt under every instrument and sentence by sentence
        on clean text: what the toxicity pairs did beyond any DPO update."""
        name = f"{run}_vs_{placebo.removeprefix('dpo_')}"  # dpo_vs_placebo, dpo_gentle_vs_placebo, ...
        for scorer in SCORERS:
            self.evaluate(scorer, run, before=placebo, name=f"{scorer}_{name}")
        self.run(f"clean_ppl_{name}", "evaluate", ["clean-ppl-compare",
                                                   self.path("clean_ppl", placebo, "clean_ppl.json"),
                                                   self.path("clean_ppl", run, "clean_ppl.json"), "--json",
                                                   self.path("clean_ppl", name, "clean_ppl.json")])

    def retrieval(self):
        limit = ["--limit", self.p["retrieval_limit"]] if self.p["retrieval_limit"] else []
        self.run("retrieval", "retrieve", ["score", "--model", DEFAULT_MODEL, "--out", self.path("retrieval"), *limit,
                                           "--device", self.device])
        transfers = [f"{s}_emt={self.path('eval', f'{s}_dpo', 'compare.json')}:emt" for s in SCORERS]
        transfers += [f"{s}_toxprob={self.path('eval', f'{s}_dpo', 'compare.json')}:tox_prob" for s in SCORERS]
        transfers.append(f"margin={self.path('margins', 'dpo', 'margins.json')}:mean_margin_per_token")
        self.run("correlate", "retrieve", ["correlate", "--retrieval", self.path("retrieval", "retrieval.json"),
                                           *[a for t in transfers for a in ("--transfer", t)],
                                           "--control", f"{self.path('clean_ppl', 'dpo', 'clean_ppl.json')}:log_ppl",
                                           "--out", self.path("correlation")])

    def probe(self):
        p, probe_dir = self.p, self.path("probe")
        policy = self.path("dpo", "best")
        tokens = ["--max-new-tokens", p["max_new_tokens"]]
        limit = ["--limit", p["probe_texts"]] if p["probe_texts"] else []
        # the sampling stages fill a batch as generate() does (prompts x samples ~ gen_batch sequences): at probe.py's
        # default of 8 prompts the 262k-row LM head is read for few rows, and each step costs nearly as much
        batch = ["--batch-size", max(1, p["gen_batch"] // p["intervene_n"])]
        # the shuffled-label probes are the directions the value-vector baseline is selected with, one per set
        self.run("probe_train", "probe", ["train", "--model", DEFAULT_MODEL, "--out", probe_dir, "--max-len", 64,
                                          "--shuffled-probes", p["random_sets"], *limit, *self.common()])
        self.run("probe_vectors", "probe", ["vectors", "--model", DEFAULT_MODEL, "--out", probe_dir, "--probe",
                                            probe_dir / "probe.safetensors", "--top-k", p["top_k"], "--limit",
                                            p["select_prompts"], "--random-sets", p["random_sets"], *tokens,
                                            *batch, *self.common()])
        vectors = probe_dir / "vectors.json"
        self.run("probe_project", "probe", ["project", "--model", DEFAULT_MODEL, "--out", probe_dir, "--vectors",
                                            vectors, *self.common()])
        self.run("probe_activations", "probe", ["activations", "--model", DEFAULT_MODEL, "--dpo-model", policy, "--out",
                                                probe_dir, "--vectors", vectors, "--prompts", self.path("prompts"),
                                                *(["--limit", p["activation_items"]] if p["activation_items"] else []),
                                                "--random-sets", p["random_sets"], "--langs", *p["activation_langs"],
                                                *tokens, *batch, *self.common()])
        self.run("probe_intervene", "probe", ["intervene", "--model", DEFAULT_MODEL, "--out", probe_dir, "--vectors",
                                              vectors, "--prompts", self.path("prompts"), "--langs",
                                              *p["intervene_langs"], "--offsets", p["intervene_offsets"], "--limit",
                                              p["intervene_prompts"], "--n", p["intervene_n"], "--scorer", "judge",
                                              "--random-sets", p["random_sets"], *tokens, *batch, *self.common()])

    def appendix_d(self):
        """The paper's Appendix D: the main run again, training LoRA adapters instead of all weights."""
        lr = self.p["dpo"].get("lr", TrainConfig().lr)
        self.dpo("dpo_lora", 0, overrides={**LORA, "lr": LORA_LR_FACTOR * lr})  # equal steps
        self.measure(["dpo_lora"])


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
    p.add_argument("--out", default=None, help="run directory (default: the newest unfinished results/<preset>-<date> "
                   "run, else results/<preset>-<today>, so a rerun after midnight resumes); rerunning with the same "
                   "--out resumes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32 (default on CPU), bf16 (default on CUDA), fp16")
    p.add_argument("--lora", action="store_true", help="also run the paper's Appendix D: the main DPO run again "
                   "training LoRA adapters (rank 64, alpha 16, dropout 0.05, every linear layer)")
    p.add_argument("--report-only", action="store_true", help="only rebuild report.md from finished stages")
    data.add_root_flag(p)  # every stage runs in this process, so they all read from it
    p.add_argument("--readme", metavar="README.md", help="also put the claims and headline tables into this "
                   "README's results block (between <!-- results:begin --> and <!-- results:end -->)")
    args = p.parse_args(argv)
    data.apply_root_flag(args)
    if args.dtype not in (None, "fp32", "bf16", "fp16"):  # checked before the split stage, not after it
        raise ValueError(f"--dtype {args.dtype!r}: use fp32, bf16 or fp16")
    dtype = resolve_dtype(args.device, args.dtype)  # refuses a --device this machine lacks
    out = Path(args.out) if args.out else default_out(args.preset)
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
        start_progress(pipe)
        pipe.all()
    text = write_report(out)
    if args.readme:
        write_readme_block(args.readme, out, collect(out))
    print(text)
    print(next_steps(out, args.preset))


def today():
    return datetime.date.today()


def default_out(preset, root=Path("results")):
    """The run directory when --out is not given: the newest unfinished run of this preset (run.json says the
    preset, no report.md yet), so rerunning after midnight resumes it; else results/<preset>-<today>."""
    unfinished = [d for d in sorted(Path(root).glob(f"{preset}-*")) if (d / "run.json").exists()
                  and read_json(d / "run.json").get("preset") == preset and not (d / "report.md").exists()]
    return unfinished[-1] if unfinished else Path(root) / f"{preset}-{today().isoformat()}"


def start_progress(pipe):
    """Print the plan (every stage, in order) and an estimate from measured stage times, then track progress."""
    names = pipe.plan()
    pipe.progress = Progress(names, measured_prior())
    print(f"Plan: {len(names)} stages, output in {pipe.out}/ (a killed run resumes where it stopped):")
    print("\n".join(f"  {i:>2}. {name}" for i, name in enumerate(names, 1)))
    done = [n for n in names if pipe.path("stages", f"{n}.json").exists()]
    for name in done:
        pipe.progress.seconds[name] = read_json(pipe.path("stages", f"{name}.json")).get("seconds", 0.0)
    left = pipe.progress.left_text()
    print(f"{len(done)} of {len(names)} done earlier{left}" + (", scaled from the stage times a committed cpu run "
                                                               "measured" if left else ""))
    if "split" not in done:
        print(f"\n#### {pipe.progress.position('split')} [split] the DPO pairs, placebo pairs and evaluation items")


def next_steps(out, preset):
    """What to open and what to run next, printed at the end of a run."""
    lines = [f"\nDone. Open {out / 'report.md'} (the claims table first, every figure linked beside its section)."]
    if preset == "smoke":
        lines.append("That was a plumbing check. Next: `python reproduce.py` runs the cpu preset, the one with "
                     "evidence (the plan above it prints its stages and an estimate).")
    else:
        lines.append(f"Next: `python reproduce.py --out {out} --readme README.md` puts its tables into the README; "
                     f"`python reproduce.py --out {out} --lora` adds the paper's Appendix D (LoRA).")
    return "\n".join(lines)


if __name__ == "__main__":
    exit_on_error(main)
