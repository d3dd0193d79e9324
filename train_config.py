"""
The configuration of a DPO run (train_dpo.py): one dataclass whose defaults are the paper's values (Li et al.
2024, following Lee et al. 2024), the CPU preset that sizes a run for a few CPU cores, the --help text of every
field, and how flags, a resumed run's saved config and the preset combine:

    flags given  >  the resumed run's config.json (--resume)  >  CPU preset (default model on CPU)  >  defaults

    python train_config.py --lr 1e-6        # print the resolved config and where each value came from
"""

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import lora
from checkpoint import DEFAULT_MODEL
from dpo import MAX_LEN, MAX_PROMPT_LEN, check_lengths
from loading import resolve_dtype
from report import exit_on_error
from runstate import read_run_config


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL
    data: str | None = None        # None: English RTP-LX pairs from design.default_split()
    out: str | None = None         # None: runs/dpo-<date>
    valid_data: str | None = None  # None: a valid_frac share of --data
    valid_frac: float = 0.05
    skip_bad: bool = False
    max_prompt_len: int = MAX_PROMPT_LEN
    max_len: int = MAX_LEN
    response_tokens: int | None = None  # None: both responses cut to the shorter one's length (see HELP)
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    logps: str = "plain"           # the DPO reference's log-probs; "chunked" for large vocabularies
    ref_model: str = "cache"
    optimizer: str = "rmsprop"
    lr: float = 1e-5
    warmup_steps: int = 150
    grad_clip: float = 10.0
    batch_size: int = 4            # pairs per optimizer step, summed over grad-accum micro-batches and processes
    grad_accum: int = 1
    epochs: int = 5
    max_steps: int | None = None
    eval_every: int = 25           # Lee et al. evaluate every 100 examples = 25 steps of 4 (their eval_steps=25)
    eval_batch_size: int = 8       # Lee et al.'s config
    patience: int = 10
    log_every: int = 10
    freeze_embeddings: bool = False
    activation_checkpointing: bool = False
    lora_rank: int = 0             # 0: full fine-tuning (the paper's mGPT/BLOOM-1.7B runs); 64 for its 7-8B models
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = ",".join(lora.TARGETS)
    seed: int = 42                 # Lee et al.'s config; this paper's official code uses 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str | None = None       # None: bf16 on CUDA, fp32 elsewhere (loading.resolve_dtype)
    resume: bool = False


# What `python train_dpo.py` runs on a CPU, and why (printed by --help).
CPU_PRESET_WHY = (
    "A paper-sized run (5 epochs, eval every 25 steps) of the 268M-parameter default model is far too slow on a "
    "2-core CPU (even the preset's short steps take ~4 s each: bench/README.md), so the preset trains briefly and "
    "watches it closely; these are the values of the committed run results/cpu-2026-12-03/dpo. The lr is below the "
    "paper's 1e-5, which over-fitted a short run on a few hundred pairs. Freezing the tied 168M-parameter embedding"
    " (= LM head) removes most of the gradient and optimizer-state memory and time. The paper's 150 warm-up steps "
    "would outlast the whole run. The chunked log-probs never build the full logits over the 262k-token vocabulary."
    " 20 response tokens: nearly all English benign completions are longer (median ~31 gemma tokens), so few pairs "
    "are dropped and both sides are cut; at 24 more are dropped and the toxic side's fewer characters per token "
    "start to show (chars AUC < 0.35).")
CPU_PRESET = dict(lr=3e-6, warmup_steps=10, max_steps=60, max_len=96, response_tokens=20, eval_every=15,
                  log_every=1, freeze_embeddings=True, logps="chunked")

# Flags that may change when a run is resumed; any other difference would make the run a different run.
RESUMABLE = {"max_steps", "epochs", "patience", "eval_every", "log_every", "grad_accum",
             "device", "dtype", "resume", "skip_bad", "activation_checkpointing"}

HELP = {
    "model": f"local HF dir, .gguf file, hub id, or the embedded default {DEFAULT_MODEL}",
    "data": "preference pairs: a .jsonl file or a directory of them, in Lee et al.'s toxicity_pairwise format "
            "(prompt_text, unpert_gen_text = chosen, pert_gen_text = rejected) or generic "
            "(prompt, chosen, rejected). Omitted: the English RTP-LX pairs of design.default_split() "
            "(benign completion = chosen, toxic = rejected) and its validation pairs",
    "out": "run directory (default runs/dpo-<date>)",
    "valid_data": "with --data, validation pairs from this file instead of a share of --data (same formats)",
    "valid_frac": "with --data and no --valid-data, the fraction of pairs held out (fixed seed) for "
                  "validation/early stopping",
    "skip_bad": "skip and count malformed pairs instead of stopping at the first (file:line:field error)",
    "max_prompt_len": "prompt tokens kept, from the END of the prompt (the BOS token is kept in front)",
    "max_len": "prompt + response tokens. Chosen and rejected are cut to one common length, min(their token "
               "lengths, max_len - prompt tokens), and get no EOS, so length and EOS carry no preference signal",
    "response_tokens": "cut BOTH responses to exactly this many tokens and drop (and count) the pairs where a "
                       "response has no more: neither side is ever whole, so neither ends where its text ends. "
                       "Unset, the longer side is cut to the shorter one's length and the shorter side is kept "
                       "whole, which on RTP-LX is a cue of its own (the whole benign side ends a sentence, the cut "
                       "toxic side does not). train_dpo.py prints how many pairs the budget keeps",
    "beta": "DPO temperature: strength of the implicit KL penalty to the reference model",
    "label_smoothing": "cDPO: assumed probability that a pair's preference label is wrong (0 = DPO)",
    "loss_type": "sigmoid = DPO (Rafailov et al. eq. 7); ipo = IPO (Azar et al.) on per-token log-ratios",
    "logps": "how sequence log-probs are computed (dpo.py). plain: as the DPO reference does, full logits "
             "[2 x pairs, tokens, vocabulary], log_softmax, gather the response tokens, sum. chunked: the LM head "
             "runs on response positions only, a chunk of rows at a time, with a hand-written gradient "
             "(ResponseLogProbs), so the full logits never exist; the CPU preset's choice, because with "
             f"{DEFAULT_MODEL}'s 262k-token vocabulary the full logits are the largest tensors of a step. Both "
             "give the same log-probs up to rounding (the reference cache is keyed by the choice)",
    "ref_model": "frozen: the DPO paper's reference, a frozen copy of the starting model run under no_grad on "
                 "every batch (with LoRA: no copy, the policy with its adapters disabled). cache (the default): "
                 "the same log-probs computed once before training with the starting model and stored in "
                 "RUN/ref_logps.pt, chosen for a 2-core CPU: one model in memory (a second fp32 copy of "
                 f"{DEFAULT_MODEL} is ~1.1 GB more) and the validation pairs' reference pass runs once, not at "
                 "every evaluation. Both give the same log-probs up to rounding",
    "optimizer": "rmsprop (the paper: as good as Adam with half the state) or adamw (torch defaults)",
    "lr": "peak learning rate (constant after warm-up)",
    "warmup_steps": "linear learning-rate warm-up steps",
    "grad_clip": "clip the global gradient norm to this",
    "batch_size": "pairs per optimizer step: the GLOBAL batch, split over --grad-accum micro-batches and "
                  "torchrun processes (so the same flag gives the same run on any number of devices)",
    "grad_accum": "micro-batches accumulated per optimizer step (to fit memory)",
    "epochs": "passes over the training pairs",
    "max_steps": "stop after this many optimizer steps (None: run all epochs)",
    "eval_every": "evaluate on the validation pairs, save last/ and (if better) best/ every N optimizer steps. "
                  "Lee et al. count examples: every 100 examples is 25 steps of --batch-size 4, their code's "
                  "eval_steps=25",
    "eval_batch_size": "pairs per evaluation / reference-pass batch",
    "patience": "stop after this many evaluations without a lower validation loss",
    "log_every": "print and record training metrics every N steps",
    "freeze_embeddings": "do not train the token embedding (and LM head). The paper trained everything; on "
                         "the default model the tied 168M-parameter embedding dominates CPU step time and memory",
    "activation_checkpointing": "recompute each block's activations in the backward pass instead of keeping "
                                "them: less peak memory for more step time (measured: bench/README.md)",
    "lora_rank": "train LoRA adapters of this rank instead of all weights (0: full fine-tuning). The base stays "
                 "frozen (stored in --dtype), the reference model is the policy with its adapters disabled, and "
                 "best/ and last/ hold the adapters alone (python loading.py convert RUN/best --out DIR for a "
                 "full checkpoint). The paper: rank 64 for its 7-8B models",
    "lora_alpha": "LoRA scale numerator: the update is (alpha / rank) * B @ A",
    "lora_dropout": "dropout on the input of each LoRA update",
    "lora_targets": f"comma-separated linear layers of each block to adapt, from {','.join(lora.TARGETS)}. The "
                    "paper says all linear layers; its official code also adapts the token embedding and LM head, "
                    "which this implementation never does",
    "seed": "seed of the training-pair order of every epoch, the LoRA initialisation and dropout (the validation "
            "split of --data and the RTP-LX split use fixed seeds of their own). 42 is Lee et al.'s; this "
            "paper's official code uses 0. Either is a choice, not a result: keep 42 to compare with Lee et al.",
    "device": "cpu, cuda, cuda:N or mps, one this machine has; default cuda when available (torchrun: cuda "
              "means cuda:LOCAL_RANK)",
    "dtype": "the dtype the model computes in: fp32, bf16, or fp16 (with a gradient scaler); default bf16 on "
             "CUDA, fp32 elsewhere. Training autocasts to it and keeps fp32 master weights (with LoRA the frozen "
             "base is stored in it). Use fp32 on CPU: bf16 matmuls are far slower on most CPUs",
    "resume": "continue the run in --out from last/ (flags given again override the saved config only "
              f"for: {', '.join(sorted(RESUMABLE - {'resume'}))})",
}
# The training hyperparameters the paper/Lee et al. fixed; the other defaults are this implementation's.
# Not among them: the seed (Lee et al.'s 42; the paper's code uses 0) and the LoRA targets (the paper's code
# adapts the embedding and LM head too), whose help says so.
PAPER_VALUES = {"max_prompt_len", "max_len", "beta", "loss_type", "optimizer", "lr", "warmup_steps", "grad_clip",
                "batch_size", "epochs", "eval_every", "eval_batch_size", "patience", "label_smoothing",
                "lora_alpha", "lora_dropout"}
CHOICES = {"loss_type": ["sigmoid", "ipo"], "logps": ["plain", "chunked"], "ref_model": ["frozen", "cache"],
           "optimizer": ["rmsprop", "adamw"], "dtype": ["fp32", "bf16", "fp16"]}


def build_parser(description=__doc__):
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Defaults are the paper's values. CPU PRESET: when --model is the default ({DEFAULT_MODEL}) and "
               "--device is cpu, flags you do not set take CPU-sized values instead: "
               + ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in CPU_PRESET.items())
               + ". Why: " + CPU_PRESET_WHY
               + " The printed config marks each value's source (paper, CPU preset, flag, resumed run).")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        where = f"{'paper' if f.name in PAPER_VALUES else 'default'}: {default}"
        if f.name in CPU_PRESET:
            where += f"; CPU preset: {CPU_PRESET[f.name]}"
        help_text = f"{HELP[f.name]} ({where})"
        # SUPPRESS: a flag the user did not type is absent from the namespace, so we know what was set.
        if f.name in ("freeze_embeddings", "activation_checkpointing"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            kind = int if f.type in (int, int | None) else float if f.type is float else str
            p.add_argument(flag, type=kind, choices=CHOICES.get(f.name), default=argparse.SUPPRESS,
                           help=help_text)
    data.add_root_flag(p)  # without --data the English RTP-LX pairs are read from the data root
    return p


def resolve_config(argv=None, description=__doc__):
    """(config, source of each value). Precedence: flags > saved run config (--resume) > CPU preset > paper."""
    explicit = vars(build_parser(description).parse_args(argv))
    # where the datasets are is not part of the run: two machines with the data in different places train the same
    data.apply_root_flag(argparse.Namespace(data_root=explicit.pop("data_root")))
    values = dataclasses.asdict(TrainConfig())
    source = {k: "paper" if k in PAPER_VALUES else "default" for k in values}
    if explicit.get("resume"):
        if "out" not in explicit:
            raise ValueError("--resume needs --out RUN_DIR (the directory of the run to continue)")
        saved = {k: v for k, v in read_run_config(explicit["out"]).items() if k in values}
        values.update(saved)
        source.update({k: "resumed run" for k in saved})
        for k, v in explicit.items():
            if k not in RESUMABLE and k != "out" and v != values[k]:
                raise ValueError(f"--{k.replace('_', '-')} {v} differs from the resumed run's {values[k]}; "
                                 f"only {', '.join(sorted(RESUMABLE - {'resume'}))} may change on --resume")
    elif explicit.get("model", DEFAULT_MODEL) == DEFAULT_MODEL and explicit.get("device", values["device"]) == "cpu":
        for k, v in CPU_PRESET.items():
            values[k], source[k] = v, "CPU preset"
    values.update(explicit)
    source.update({k: "flag" for k in explicit})
    values["dtype"] = resolve_dtype(values["device"], values["dtype"])
    cfg = TrainConfig(**values)
    check_config(cfg)
    return cfg, source


def check_config(cfg):
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)
    check_lengths(cfg.max_prompt_len, cfg.max_len, cfg.response_tokens)
    need(cfg.batch_size >= 1 and cfg.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1")
    need(0 < cfg.valid_frac < 1, f"--valid-frac must be in (0, 1), got {cfg.valid_frac}")
    need(cfg.valid_data is None or cfg.data is not None, "--valid-data needs --data (without --data the split's "
         "own validation pairs are used)")
    need(0 <= cfg.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    need(cfg.beta > 0, f"--beta must be > 0, got {cfg.beta}")
    # a non-finite or negative lr, clip or warm-up trains "successfully" into NaN weights or gradient ascent
    need(math.isfinite(cfg.lr) and cfg.lr >= 0, f"--lr must be a finite number >= 0, got {cfg.lr}")
    need(math.isfinite(cfg.grad_clip) and cfg.grad_clip > 0, f"--grad-clip must be a finite number > 0, "
         f"got {cfg.grad_clip}")
    need(cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    need(cfg.out is None or not Path(cfg.model).exists() or Path(cfg.out).resolve() != Path(cfg.model).resolve(),
         f"--out {cfg.out} is the --model directory: the run's config.json would overwrite the model's")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "--max-steps must be >= 1")
    need(min(cfg.eval_every, cfg.log_every, cfg.eval_batch_size, cfg.patience, cfg.epochs) >= 1,
         "--eval-every, --log-every, --eval-batch-size, --patience and --epochs must be >= 1")
    for name in ("dtype", "logps"):
        need(getattr(cfg, name) in CHOICES[name], f"--{name} must be one of {CHOICES[name]}, "
             f"got {getattr(cfg, name)!r}")
    need(cfg.lora_rank >= 0, f"--lora-rank must be >= 0 (0: full fine-tuning), got {cfg.lora_rank}")
    need(0 <= cfg.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    lora.parse_targets(cfg.lora_targets)


def main(argv=None):
    cfg, source = resolve_config(argv)
    for k, v in dataclasses.asdict(cfg).items():
        print(f"{k:24s} {v!s:24s} [{source[k]}]")


if __name__ == "__main__":
    exit_on_error(main)
