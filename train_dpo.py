"""
Direct Preference Optimization (Rafailov et al. 2023) of a causal LM on (prompt, chosen, rejected) pairs:
the training step of "Preference Tuning for Toxicity Mitigation Generalizes Across Languages" (Li, Yong,
Bach 2024). Like Lee et al. (2024), whose recipe the paper reuses, it trains on English pairs whose chosen
response is non-toxic and rejected response toxic, with RMSprop, lr 1e-5, 150 warm-up steps, batch 4,
5 epochs and early stopping on the validation loss.

    python train_dpo.py                                  # CPU preset: gemma-3-270m on English RTP-LX pairs
    python train_dpo.py --model path/to/hf_dir --data pairs.jsonl --out runs/x --device cuda --dtype bf16
    python train_dpo.py --out runs/x --resume            # continue a killed run exactly where it stopped
    torchrun --nproc_per_node=2 train_dpo.py --data pairs.jsonl --out runs/ddp   # DDP, same global batch

The run directory holds:
    config.json      the resolved configuration (read back by --resume)
    metrics.jsonl    one JSON object per log/eval point: step, split, loss, reward_accuracy, reward_margin, ...
    ref_logps.pt     reference-model log-probs, computed once before training (keyed by data+model+truncation)
    best/            the checkpoint with the lowest validation loss (HF format: load_model or transformers)
    last/            the latest checkpoint, plus last/state.pt (optimizer, step, RNG, early-stopping counters),
                     so weights and resume state are replaced together in one atomic directory swap
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import lora
from model import DTYPES, load_model, save_model
from report import write_json

DEFAULT_MODEL = "gemma-3-270m"

# -----------------------------------------------------------------------------
# Configuration: every default is the paper's value (Li et al. 2024, following Lee et al. 2024), except
# where the CPU preset below changes it.


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL
    data: str | None = None        # None: English RTP-LX pairs from data.default_split()
    out: str | None = None         # None: runs/dpo-<date>
    valid_data: str | None = None  # None: a valid_frac share of --data
    valid_frac: float = 0.05
    skip_bad: bool = False
    max_prompt_len: int = 64
    max_len: int = 256
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    ref_model: str = "cache"
    optimizer: str = "rmsprop"
    lr: float = 1e-5
    warmup_steps: int = 150
    grad_clip: float = 10.0
    batch_size: int = 4            # pairs per optimizer step, summed over grad-accum micro-batches and processes
    grad_accum: int = 1
    epochs: int = 5
    max_steps: int | None = None
    eval_every: int = 100          # Lee et al.'s config
    eval_batch_size: int = 8       # Lee et al.'s config
    patience: int = 10
    log_every: int = 10
    freeze_embeddings: bool = False
    activation_checkpointing: bool = False
    lora_rank: int = 0             # 0: full fine-tuning (the paper's mGPT/BLOOM-1.7B runs); 64 for its 7-8B models
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = ",".join(lora.TARGETS)
    seed: int = 42                 # Lee et al.'s config
    device: str = "cpu"
    dtype: str = "fp32"
    resume: bool = False


# Why: on 2 CPU cores one 4-pair step of the 268M-parameter default model takes seconds, so a paper-sized run
# (5 epochs, eval every 100 steps) would take days. The preset trains briefly and watches it closely; lr 1e-5
# for 50 steps on 200 pairs over-fitted (train loss ~0, held-out perplexity up), 1e-6 does not. Freezing the
# tied 168M-parameter embedding (= LM head) removes most of the gradient and optimizer-state memory/time. The
# paper's 150 warm-up steps would outlast the whole 60-step run.
CPU_PRESET = dict(lr=1e-6, warmup_steps=10, max_steps=60, max_len=96, freeze_embeddings=True, eval_every=10,
                  log_every=1)

# Flags that may change when a run is resumed; any other difference would make the run a different run.
RESUMABLE = {"max_steps", "epochs", "patience", "eval_every", "log_every", "grad_accum",
             "device", "dtype", "resume", "skip_bad", "activation_checkpointing"}

HELP = {
    "model": "local HF dir, .gguf file, hub id, or the embedded default gemma-3-270m",
    "data": "preference pairs: a .jsonl file or a directory of them, in Lee et al.'s toxicity_pairwise format "
            "(prompt_text, unpert_gen_text = chosen, pert_gen_text = rejected) or generic "
            "(prompt, chosen, rejected). Omitted: the English RTP-LX pairs of data.default_split() "
            "(benign completion = chosen, toxic = rejected) and its validation pairs",
    "out": "run directory (default runs/dpo-<date>)",
    "valid_data": "with --data, validation pairs from this file instead of a share of --data (same formats)",
    "valid_frac": "with --data and no --valid-data, the fraction of pairs held out (fixed seed) for "
                  "validation/early stopping",
    "skip_bad": "skip and count malformed pairs instead of stopping at the first (file:line:field error)",
    "max_prompt_len": "prompt tokens kept, from the END of the prompt (the BOS token is kept in front)",
    "max_len": "prompt + response tokens. Chosen and rejected are cut to one common length, min(their token "
               "lengths, max_len - prompt tokens), and get no EOS, so length and EOS carry no preference signal",
    "beta": "DPO temperature: strength of the implicit KL penalty to the reference model",
    "label_smoothing": "cDPO: assumed probability that a pair's preference label is wrong (0 = DPO)",
    "loss_type": "sigmoid = DPO (Rafailov et al. eq. 7); ipo = IPO (Azar et al.) on per-token log-ratios",
    "ref_model": "cache: reference log-probs computed once before training with the starting model and "
                 "cached in RUN/ref_logps.pt (one model in memory); frozen: keep a frozen copy in memory (with "
                 "LoRA: no copy, the policy with its adapters disabled)",
    "optimizer": "rmsprop (the paper: as good as Adam with half the state) or adamw (torch defaults)",
    "lr": "peak learning rate (constant after warm-up)",
    "warmup_steps": "linear learning-rate warm-up steps",
    "grad_clip": "clip the global gradient norm to this",
    "batch_size": "pairs per optimizer step: the GLOBAL batch, split over --grad-accum micro-batches and "
                  "torchrun processes (so the same flag gives the same run on any number of devices)",
    "grad_accum": "micro-batches accumulated per optimizer step (to fit memory)",
    "epochs": "passes over the training pairs",
    "max_steps": "stop after this many optimizer steps (None: run all epochs)",
    "eval_every": "evaluate on the validation pairs, save last/ and (if better) best/ every N steps",
    "eval_batch_size": "pairs per evaluation / reference-pass batch",
    "patience": "stop after this many evaluations without a lower validation loss",
    "log_every": "print and record training metrics every N steps",
    "freeze_embeddings": "do not train the token embedding (and LM head). The paper trained everything; on "
                         "the default model the tied 168M-parameter embedding dominates CPU step time and memory",
    "activation_checkpointing": "recompute each block's activations in the backward pass instead of keeping "
                                "them: on the default model at 8 pairs x 96 tokens, ~2 GB less peak memory for "
                                "~20%% more step time",
    "lora_rank": "train LoRA adapters of this rank instead of all weights (0: full fine-tuning). The base stays "
                 "frozen (stored in --dtype), the reference model is the policy with its adapters disabled, and "
                 "best/ and last/ hold the adapters alone (python lora.py merge RUN/best --out DIR for a full "
                 "checkpoint). The paper: rank 64 for its 7-8B models",
    "lora_alpha": "LoRA scale numerator: the update is (alpha / rank) * B @ A",
    "lora_dropout": "dropout on the input of each LoRA update",
    "lora_targets": f"comma-separated linear layers of each block to adapt, from {','.join(lora.TARGETS)} "
                    "(default: all, as the paper)",
    "seed": "seed of the training-pair order of every epoch, the LoRA initialisation and dropout (the validation "
            "split of --data and the RTP-LX split use fixed seeds of their own)",
    "device": "cpu, cuda, cuda:N or mps (torchrun: cuda means cuda:LOCAL_RANK)",
    "dtype": "autocast compute dtype (trained weights stay fp32; with LoRA the frozen base is stored in this "
             "dtype): fp32, bf16, or fp16 (with a gradient scaler). Use fp32 on CPU: bf16 matmuls are far slower "
             "on most CPUs",
    "resume": "continue the run in --out from last/ (flags given again override the saved config only "
              f"for: {', '.join(sorted(RESUMABLE - {'resume'}))})",
}
# The training hyperparameters the paper/Lee et al. fixed; the other defaults are this implementation's.
PAPER_VALUES = {"max_prompt_len", "max_len", "beta", "loss_type", "optimizer", "lr", "warmup_steps", "grad_clip",
                "batch_size", "epochs", "eval_every", "eval_batch_size", "patience", "seed", "label_smoothing",
                "lora_alpha", "lora_dropout", "lora_targets"}
CHOICES = {"loss_type": ["sigmoid", "ipo"], "ref_model": ["cache", "frozen"], "optimizer": ["rmsprop", "adamw"],
           "dtype": ["fp32", "bf16", "fp16"]}


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults are the paper's values. CPU PRESET: when --model is the default (gemma-3-270m) and "
               "--device is cpu, flags you do not set take CPU-sized values instead: "
               + ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in CPU_PRESET.items())
               + ". The printed config marks each value's source (paper, CPU preset, flag, resumed run).")
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
    return p


def resolve_config(argv=None):
    """(config, source of each value). Precedence: flags > saved run config (--resume) > CPU preset > paper."""
    explicit = vars(build_parser().parse_args(argv))
    values = dataclasses.asdict(TrainConfig())
    source = {k: "paper" if k in PAPER_VALUES else "default" for k in values}
    if explicit.get("resume"):
        if "out" not in explicit:
            raise ValueError("--resume needs --out RUN_DIR (the directory of the run to continue)")
        saved_path = Path(explicit["out"]) / "config.json"
        if not saved_path.exists():
            raise FileNotFoundError(f"{saved_path}: no run to resume (config.json missing)")
        try:
            saved = json.loads(saved_path.read_text())
        except ValueError as e:
            raise ValueError(f"{saved_path}: unreadable run config ({e})") from None
        values.update({k: v for k, v in saved.items() if k in values})
        source.update({k: "resumed run" for k in saved if k in values})
        for k, v in explicit.items():
            if k not in RESUMABLE and k != "out" and v != values[k]:
                raise ValueError(f"--{k.replace('_', '-')} {v} differs from the resumed run's {values[k]}; "
                                 f"only {', '.join(sorted(RESUMABLE - {'resume'}))} may change on --resume")
    elif explicit.get("model", DEFAULT_MODEL) == DEFAULT_MODEL and explicit.get("device", "cpu") == "cpu":
        for k, v in CPU_PRESET.items():
            values[k], source[k] = v, "CPU preset"
    values.update(explicit)
    source.update({k: "flag" for k in explicit})
    cfg = TrainConfig(**values)
    check_config(cfg)
    return cfg, source


def check_config(cfg):
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)
    need(cfg.max_prompt_len >= 1 and cfg.max_len > cfg.max_prompt_len,
         f"--max-len ({cfg.max_len}) must exceed --max-prompt-len ({cfg.max_prompt_len}) to leave room for a response")
    need(cfg.batch_size >= 1 and cfg.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1")
    need(0 < cfg.valid_frac < 1, f"--valid-frac must be in (0, 1), got {cfg.valid_frac}")
    need(cfg.valid_data is None or cfg.data is not None, "--valid-data needs --data (without --data the split's "
         "own validation pairs are used)")
    need(0 <= cfg.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    need(cfg.beta > 0, f"--beta must be > 0, got {cfg.beta}")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "--max-steps must be >= 1")
    need(min(cfg.eval_every, cfg.log_every, cfg.eval_batch_size, cfg.patience, cfg.epochs) >= 1,
         "--eval-every, --log-every, --eval-batch-size, --patience and --epochs must be >= 1")
    need(cfg.dtype in CHOICES["dtype"], f"--dtype must be one of {CHOICES['dtype']}, got {cfg.dtype!r}")
    need(cfg.lora_rank >= 0, f"--lora-rank must be >= 0 (0: full fine-tuning), got {cfg.lora_rank}")
    need(0 <= cfg.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    lora.parse_targets(cfg.lora_targets)


# -----------------------------------------------------------------------------
# Data: tokenized pairs in DPO-reference layout, right-padded concatenated batches


def _build_example(prompt_ids, chosen_ids, rejected_ids, bos_id, max_prompt_len, max_len):
    if len(prompt_ids) > max_prompt_len:
        # Keep the end of the prompt: it is what the response continues. Keep the BOS the model expects first.
        has_bos = bos_id is not None and prompt_ids[0] == bos_id
        prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - max_prompt_len + 1:] if has_bos \
            else prompt_ids[-max_prompt_len:]
    # Both responses are cut to ONE length and neither gets EOS. RTP-LX toxic completions are ~4x longer than
    # benign ones, so with EOS appended before a cut only the short (chosen) side kept its EOS and the pairs
    # were separable by length and by EOS alone (validation reward accuracy 1.0 at the first evaluation).
    n = min(len(chosen_ids), len(rejected_ids), max_len - len(prompt_ids))
    example = {"prompt_input_ids": prompt_ids}
    for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        example[f"{name}_input_ids"] = prompt_ids + ids[:n]
        example[f"{name}_labels"] = [-100] * len(prompt_ids) + ids[:n]  # loss only on response tokens
    return example


def tokenize_pair(tokenizer, prompt, chosen, rejected, max_prompt_len=64, max_len=256):
    """One pair -> {prompt_input_ids, chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels}
    (lists of ints). The prompt is encoded with the tokenizer's BOS (if it adds one) and each response
    without; the prompt keeps its last max_prompt_len tokens, and both responses are cut to the same number of
    tokens, min(len(chosen), len(rejected), max_len - prompt tokens), with no EOS; labels are -100 on the
    prompt. Encoding them separately keeps the prompt/response boundary exact (a joint encoding could merge
    tokens across it)."""
    return _build_example(tokenizer.encode(prompt, add_special=True), tokenizer.encode(chosen, add_special=False),
                          tokenizer.encode(rejected, add_special=False), tokenizer.bos_id if tokenizer.add_bos
                          else None, max_prompt_len, max_len)


def tokenize_pairs(tokenizer, pairs, max_prompt_len=64, max_len=256):
    """tokenize_pair over a list of {prompt, chosen, rejected} dicts, with the batched (multi-core) encoder. The
    one token-level pair builder: training, its reference pass, evaluate.py margins and data.pair_confounds."""
    prompts = tokenizer.encode_batch([p["prompt"] for p in pairs], add_special=True)
    chosen = tokenizer.encode_batch([p["chosen"] for p in pairs], add_special=False)
    rejected = tokenizer.encode_batch([p["rejected"] for p in pairs], add_special=False)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    return [_build_example(p, c, r, bos, max_prompt_len, max_len) for p, c, r in zip(prompts, chosen, rejected)]


def collate(examples, pad_id):
    """B tokenized pairs -> one right-padded batch of 2B rows (chosen rows first, then rejected), so both
    responses go through the model in a single forward pass:
        input_ids [2B, T] long, attention_mask [2B, T] long (0 on padding), labels [2B, T] long (-100 off-response)
    """
    rows = [ex["chosen_input_ids"] for ex in examples] + [ex["rejected_input_ids"] for ex in examples]
    labels = [ex["chosen_labels"] for ex in examples] + [ex["rejected_labels"] for ex in examples]
    T = max(len(r) for r in rows)
    batch = {"input_ids": torch.full((len(rows), T), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), T, dtype=torch.long),
             "labels": torch.full((len(rows), T), -100, dtype=torch.long)}
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, :len(ids)] = 1
        batch["labels"][i, :len(ids)] = torch.tensor(lab)
    return batch


def n_tokens(examples):
    """Real (non-pad) tokens the model reads for these pairs, for tok/s (host-side: no device sync)."""
    return sum(len(ex["chosen_input_ids"]) + len(ex["rejected_input_ids"]) for ex in examples)


def load_splits(cfg):
    """(train pairs, valid pairs, n_skipped)."""
    if cfg.data is None:
        split = data.default_split()
        return split["train"], split["valid"], 0
    pairs, n_skipped = data.load_pairs(cfg.data, skip_bad=cfg.skip_bad)
    if cfg.valid_data is not None:
        valid, n_skipped_valid = data.load_pairs(cfg.valid_data, skip_bad=cfg.skip_bad)
        if not pairs or not valid:
            empty = cfg.data if not pairs else cfg.valid_data
            raise ValueError(f"{empty}: no usable pairs")
        return pairs, valid, n_skipped + n_skipped_valid
    if len(pairs) < 2:
        raise ValueError(f"{cfg.data}: {len(pairs)} usable pair(s); need at least 2 (train + validation)")
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)  # fixed seed: the validation split does not move with --seed
    n_valid = min(len(pairs) - 1, max(1, round(cfg.valid_frac * len(pairs))))
    return [pairs[i] for i in order[n_valid:]], [pairs[i] for i in order[:n_valid]], n_skipped


# -----------------------------------------------------------------------------
# The DPO loss and sequence log-probs


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta, label_smoothing=0.0, loss_type="sigmoid"):
    """The DPO loss of a batch of pairs.

    Args:
        policy_chosen_logps:   [B] log pi(y_w | x), summed over response tokens (per-token mean for IPO)
        policy_rejected_logps: [B] log pi(y_l | x)
        ref_chosen_logps:      [B] log pi_ref(y_w | x)
        ref_rejected_logps:    [B] log pi_ref(y_l | x)
        beta: temperature; larger keeps the policy closer to the reference
        label_smoothing: cDPO's probability that a preference label is flipped (0 = plain DPO)
        loss_type: "sigmoid" (DPO) or "ipo"
    Returns:
        losses [B], chosen_rewards [B], rejected_rewards [B]; rewards are beta * (policy - ref) log-probs,
        detached (they are for logging).
    """
    # h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l): how much more the policy prefers y_w than the ref.
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # [B]
    if loss_type == "sigmoid":
        # DPO eq. 7: -log sigmoid(beta h). cDPO: with probability eps the label is wrong, so the target is
        # the mixture (1 - eps) * (y_w > y_l) + eps * (y_l > y_w).
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        # IPO (Azar et al. 2023, eq. 17): regress h onto 1/(2 beta) instead of pushing it to infinity.
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (sigmoid, ipo)")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


class ResponseLogProbs(torch.autograd.Function):
    """log p(target) = h . w_target - logsumexp(h W^T) at M response positions, in chunks of rows, so that the
    [M, V] logits never exist at once (V = 262k: 1 GB of fp32 per 1000 tokens, and autograd would keep three
    such tensors). Gradients, with P = softmax(h W^T):
        d logp / d h = w_target - P W            computed chunk by chunk in the forward pass ([M, D], small)
        d logp / d W = (onehot_target - P)^T h   needs the upstream gradient, so the backward pass recomputes
                                                 each chunk's logits (only when W is trained)
    hidden [M, D], weight [V, D], targets [M] long -> logps [M] (fp32, or fp64 for fp64 inputs). Under autocast
    the matmuls run in the autocast dtype and the softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        acc = torch.promote_types(dtype, torch.float32)  # softmax precision
        w = weight.to(dtype)
        logps = torch.empty(len(hidden), dtype=acc, device=hidden.device)  # [M]
        lse = torch.empty_like(logps)                                       # [M]
        dlogp_dh = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if ctx.needs_input_grad[0] else None
        for rows in torch.arange(len(hidden), device=hidden.device).split(chunk_size):
            logits = (hidden[rows].to(dtype) @ w.T).to(acc)  # [c, V]
            lse[rows] = logits.logsumexp(-1)
            logps[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
            if dlogp_dh is not None:
                probs = logits.sub_(lse[rows, None]).exp_()  # softmax, in place
                dlogp_dh[rows] = weight[targets[rows]].to(acc) - (probs.to(dtype) @ w).to(acc)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        ctx.save_for_backward(hidden, weight, targets, lse, dlogp_dh)
        return logps

    @staticmethod
    def backward(ctx, grad):  # grad [M]: dL/dlogp
        hidden, weight, targets, lse, dlogp_dh = ctx.saved_tensors
        grad_hidden = (grad[:, None] * dlogp_dh).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            w = weight.to(ctx.dtype)
            grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)  # [V, D]
            for rows in torch.arange(len(hidden), device=hidden.device).split(ctx.chunk_size):
                h = hidden[rows].to(ctx.dtype)
                g = (h @ w.T).to(lse.dtype).sub_(lse[rows, None]).exp_().mul_(-grad[rows, None])  # -g P [c, V]
                g[torch.arange(len(rows), device=g.device), targets[rows]] += grad[rows]         # + g onehot
                if ctx.dtype == lse.dtype:
                    grad_weight.addmm_(g.T, h)  # accumulate in place: no [V, D] temporary
                else:
                    grad_weight += (g.T.to(ctx.dtype) @ h).to(lse.dtype)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def batch_logps(model, input_ids, attention_mask, labels, chunk_size=256):
    """Sum of log p(token) over each row's response tokens, and the number of those tokens.

    input_ids, attention_mask, labels: [N, T] (labels -100 on prompt and padding). Returns
    (logps [N] float32, n_tokens [N] long). The LM head runs only on the positions that predict a response
    token, chunk_size rows at a time (see ResponseLogProbs): with a 262k vocabulary, full [N, T, V] logits
    would dominate the step's time and memory. `model` may be wrapped in DistributedDataParallel.
    """
    assert input_ids.shape == labels.shape == attention_mask.shape, "input_ids, attention_mask, labels differ"
    hidden = model(input_ids, attention_mask, return_hidden=True)  # [N, T, D]
    targets = labels[:, 1:]     # [N, T-1]: position t predicts token t+1
    selected = targets != -100  # [N, T-1]
    weight, scale = getattr(model, "module", model).unembed_params()  # DistributedDataParallel wraps the model
    token_logps = ResponseLogProbs.apply(hidden[:, :-1][selected] * scale, weight, targets[selected],
                                         chunk_size)  # [M], M response tokens
    logps = torch.zeros(selected.shape, dtype=torch.float32, device=hidden.device).masked_scatter(
        selected, token_logps).sum(-1)  # [N]
    return logps, selected.sum(-1)


def autocast(device, dtype):
    """Mixed precision for matmuls while the weights stay fp32; a no-op for fp32."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def compute_logps(model, batches, device, dtype=torch.float32, desc=None):
    """Per-pair summed log-probs and response token counts over collated batches (chosen rows first):
    {chosen_logps, rejected_logps: [N] float32, chosen_tokens, rejected_tokens: [N] long}, on the CPU, in
    batch order. For the reference pass here, and for margins in evaluate.py / reproduce.py."""
    out = {"chosen_logps": [], "rejected_logps": [], "chosen_tokens": [], "rejected_tokens": []}
    for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        with autocast(device, dtype):
            logps, counts = batch_logps(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask",
                                                                               "labels")))
        for name, value in (("logps", logps), ("tokens", counts)):
            chosen, rejected = value.cpu().chunk(2)
            out[f"chosen_{name}"].append(chosen)
            out[f"rejected_{name}"].append(rejected)
    return {k: torch.cat(v) for k, v in out.items()}


STATS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "logps_chosen",
         "logps_rejected")


def dpo_forward(model, batch, ref_chosen, ref_rejected, cfg, ref_model=None):
    """Losses [B] for one collated batch and its metric sums [len(STATS) + 1] (last entry: the pair count).
    Reference log-probs come from ref_chosen/ref_rejected [B], or from ref_model when one is kept."""
    logps, counts = batch_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])  # [2B]
    if ref_model is not None:  # a frozen copy, or (LoRA) the policy itself with its adapters off
        with torch.no_grad(), lora.disabled(ref_model):
            ref_chosen, ref_rejected = batch_logps(ref_model, batch["input_ids"], batch["attention_mask"],
                                                   batch["labels"])[0].chunk(2)
    policy_chosen, policy_rejected = logps.chunk(2)
    inputs = policy_chosen, policy_rejected, ref_chosen, ref_rejected
    if cfg.loss_type == "ipo":  # IPO compares per-token log-ratios, so long responses do not dominate
        chosen_n, rejected_n = counts.chunk(2)
        inputs = tuple(x / n.clamp(min=1) for x, n in zip(inputs, (chosen_n, rejected_n) * 2))
    losses, chosen_rewards, rejected_rewards = preference_loss(*inputs, beta=cfg.beta,
                                                               label_smoothing=cfg.label_smoothing,
                                                               loss_type=cfg.loss_type)
    stats = torch.stack([losses.detach().sum(), (chosen_rewards > rejected_rewards).float().sum(),
                         (chosen_rewards - rejected_rewards).sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                         policy_chosen.detach().sum(), policy_rejected.detach().sum(),
                         torch.tensor(float(len(losses)), device=losses.device)])
    return losses, stats


def summarize(stats):
    """Metric sums [len(STATS) + 1] (a host list) -> {name: mean over pairs}."""
    return {name: stats[i] / max(stats[-1], 1.0) for i, name in enumerate(STATS)}


# -----------------------------------------------------------------------------
# Reference log-probs: one pass with the starting model, cached next to the run


def reference_key(cfg, train, valid):
    """Hash of everything the reference log-probs depend on: model, compute dtype, truncation, token ids."""
    # LoRA stores the base in --dtype rather than fp32, which changes the last bits of the log-probs
    h = hashlib.sha256(json.dumps([cfg.model, cfg.dtype, cfg.lora_rank > 0, cfg.max_prompt_len,
                                   cfg.max_len]).encode())
    for ex in train + valid:
        h.update(json.dumps([len(ex["prompt_input_ids"]), ex["chosen_input_ids"],
                             ex["rejected_input_ids"]]).encode())
    return h.hexdigest()


def fixed_batches(order, size):
    """Consecutive batches of pair ids over a fixed order of ALL pairs. The reference pass runs on these, so a
    pair's reference log-prob depends only on its fixed batch (padding changes the last bits), never on which
    pairs a run happened to need: a run extended on resume gets the values of one planned that long. Training
    pairs follow the first epoch's order, so a short run touches few batches; validation pairs are sorted by
    length (less padding)."""
    return [order[i:i + size] for i in range(0, len(order), size)]


def by_length(examples):
    return sorted(range(len(examples)), key=lambda i: len(examples[i]["chosen_input_ids"]) +
                  len(examples[i]["rejected_input_ids"]))


def update_reference_cache(path, key, splits, batches, needed, load_start_model, pad_id, cfg, device):
    """Fill in the reference log-probs of the `needed` pair ids of each split, computing only the fixed
    batches that miss some, and rewrite the cache atomically. splits: {name: examples}, batches: {name:
    fixed_batches(...)}, needed: {name: set of ids}; load_start_model() -> (model, tokenizer) is called only
    if something must be computed."""
    cache = None
    if path.exists():
        try:
            cache = torch.load(path, weights_only=True)
        except Exception as e:  # a cache: recompute rather than fail
            print(f"warning: {path} unreadable ({type(e).__name__}); recomputing reference log-probs")
    if cache is None or cache.get("key") != key:
        cache = {"key": key, **{name: {side: torch.full((len(ex),), float("nan")) for side in ("chosen", "rejected")}
                                for name, ex in splits.items()}}
    todo = {name: [chunk for chunk in batches[name]
                   if any(i in needed[name] and math.isnan(cache[name]["chosen"][i]) for i in chunk)]
            for name in splits}
    n_todo = sum(len(chunk) for chunks in todo.values() for chunk in chunks)
    if n_todo == 0:
        print(f"reference log-probs: reusing {path}")
        return cache
    model, _ = load_start_model()
    model.eval()
    for name, chunks in todo.items():
        if not chunks:
            continue
        batches = [collate([splits[name][i] for i in chunk], pad_id) for chunk in chunks]
        out = compute_logps(model, batches, device, cfg.dtype, desc=f"reference log-probs ({name})")
        index = torch.tensor([i for chunk in chunks for i in chunk])
        cache[name]["chosen"][index] = out["chosen_logps"]
        cache[name]["rejected"][index] = out["rejected_logps"]
    tmp = path.with_name(path.name + ".tmp")
    torch.save(cache, tmp)
    os.replace(tmp, path)
    print(f"reference log-probs: computed {n_todo} pairs with the starting model -> {path}")
    return cache


# -----------------------------------------------------------------------------
# Checkpoints: HF-format directories, swapped in atomically


def save_checkpoint(model, tokenizer, path, state=None):
    """Write model (its LoRA adapters alone, if it has any) and resume state to a temp dir, then rename it into
    place. A crash leaves either the old or the new directory: a directory cannot be os.replace'd over a
    non-empty one, so the old one is first moved aside to .NAME.old, which `find_checkpoint` falls back to if
    the crash hit between the renames."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora.lora_layers(model):
        lora.save_adapters(model, tmp, model.name_or_path)
    else:
        save_model(model, tokenizer, tmp)
    if state is not None:
        torch.save(state, tmp / "state.pt")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path):
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    return path if path.exists() else old if old.exists() else None


def load_resume_state(run_dir, device, dtype):
    """(model, tokenizer, state) from RUN/last, or a one-line error saying what is wrong. LoRA adapters are
    put back on their base model (stored in `dtype`) unmerged, to train on."""
    last = find_checkpoint(Path(run_dir) / "last")
    if last is None or not (last / "state.pt").exists():
        raise FileNotFoundError(f"{Path(run_dir) / 'last' / 'state.pt'}: nothing to resume (no checkpoint "
                                "was saved yet; start the run again without --resume)")
    try:
        state = torch.load(last / "state.pt", map_location="cpu", weights_only=True)
        missing = {"step", "optimizer", "rng", "best_val_loss", "bad_evals", "window"} - set(state)
        if missing:
            raise KeyError(f"missing {sorted(missing)}")
    except Exception as e:
        raise ValueError(f"{last / 'state.pt'}: corrupted resume state ({first_line(e)}); delete {run_dir} "
                         "to restart") from None
    try:
        if lora.is_adapter_dir(last):
            model, tokenizer = lora.load_adapter_model(last, device, dtype, merged=False)
        else:
            model, tokenizer = load_model(last, device=device)
    except Exception as e:
        raise ValueError(f"{last}: corrupted checkpoint ({first_line(e)})") from None
    return model, tokenizer, state


def first_line(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """metrics.jsonl: one JSON object per log/eval point, appended and flushed as they happen."""

    def __init__(self, path, enabled, resume_step=None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        lines = []
        if resume_step is not None and self.path.exists():
            # a killed run may have logged past its last checkpoint: those steps will be redone
            lines = [line for line in self.path.read_text().splitlines()
                     if line.strip() and json.loads(line)["step"] <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, self.path)

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def peak_memory_mb(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


# -----------------------------------------------------------------------------
# Training


def get_lr(step, cfg):
    """Linear warm-up over warmup_steps, then constant (Lee et al.; DPO reference implementation)."""
    return cfg.lr * min(1.0, (step + 1) / (cfg.warmup_steps + 1))


def epoch_order(n, seed, epoch):
    """The permutation of training pairs for an epoch: a function of (seed, epoch), so resume needs no sampler
    state beyond the step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def main(argv=None):
    cfg, source = resolve_config(argv)

    #### BEGIN SETUP ####
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if ddp:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if cfg.device == "cuda":
            cfg.device = f"cuda:{local_rank}"
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(cfg.device)
        dist.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
    else:
        rank, world = 0, 1
    master = rank == 0
    try:
        return train(cfg, source, ddp, rank, world, master)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(cfg, source, ddp, rank, world, master):
    device = cfg.device
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by --grad-accum {cfg.grad_accum} x "
                         f"{world} process(es)")
    micro = cfg.batch_size // (cfg.grad_accum * world)  # pairs per forward pass on this process
    if cfg.out is None:
        out = [f"runs/dpo-{datetime.datetime.now():%Y%m%d-%H%M%S}"]
        if ddp:
            dist.broadcast_object_list(out)  # every process must agree on the directory
        cfg.out = out[0]
    run_dir = Path(cfg.out)
    if not cfg.resume and find_checkpoint(run_dir / "last") is not None:
        raise ValueError(f"{run_dir} already holds a run (last/); pass --resume to continue it or choose "
                         "another --out")
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", dataclasses.asdict(cfg))
        print(f"config ({world} process{'es' if world > 1 else ''}, {micro} pairs per forward pass):")
        for k, v in dataclasses.asdict(cfg).items():
            note = f"CPU preset; paper: {getattr(TrainConfig(), k)}" if source[k] == "CPU preset" else source[k]
            print(f"  {k:18s} {v!s:22s} [{note}]")
    torch.manual_seed(cfg.seed)

    base_dtype = DTYPES[cfg.dtype] if cfg.lora_rank else torch.float32  # a frozen base need not be fp32

    def load_start_model():
        return load_model(cfg.model, device=device, dtype=base_dtype)

    # -- data (read before the model loads, so that bad input fails fast) -------
    train_pairs, valid_pairs, n_skipped = load_splits(cfg)
    if n_skipped and master:
        print(f"skipped {n_skipped} bad row(s) in {cfg.data} (--skip-bad)")
    if cfg.resume:
        policy, tokenizer, state = load_resume_state(run_dir, device, base_dtype)
    else:
        (policy, tokenizer), state = load_start_model(), None
        if cfg.lora_rank:
            lora.add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    train_ex = tokenize_pairs(tokenizer, train_pairs, cfg.max_prompt_len, cfg.max_len)
    valid_ex = tokenize_pairs(tokenizer, valid_pairs, cfg.max_prompt_len, cfg.max_len)
    steps_per_epoch = len(train_ex) // cfg.batch_size  # the last partial batch of an epoch is dropped
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_ex)} training pairs is fewer than --batch-size {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else \
        min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    orders = [epoch_order(len(train_ex), cfg.seed, e) for e in range(cfg.epochs)]
    valid_batches = fixed_batches(by_length(valid_ex), cfg.eval_batch_size)  # evaluation and its reference pass

    def global_batch(step):
        """The pair ids of an optimizer step, [batch_size]."""
        epoch, pos = divmod(step, steps_per_epoch)
        return orders[epoch][pos * cfg.batch_size:(pos + 1) * cfg.batch_size]

    if master:
        print(f"data: {len(train_ex)} train / {len(valid_ex)} valid pairs; {steps_per_epoch} steps per epoch, "
              f"{total_steps} steps planned")

    # -- reference log-probs ---------------------------------------------------
    ref_model, ref = None, None
    if cfg.ref_model == "frozen" and cfg.lora_rank:
        ref_model = policy  # the reference is the policy with its adapters disabled: no second copy
    elif cfg.ref_model == "frozen":
        ref_model = copy.deepcopy(policy) if state is None else load_start_model()[0]
        ref_model.requires_grad_(False).eval()
    else:
        start_step = state["step"] if state else 0
        evaluates = total_steps // cfg.eval_every > start_step // cfg.eval_every
        needed = {"train": {i for s in range(start_step, total_steps) for i in global_batch(s).tolist()},
                  "valid": set(range(len(valid_ex))) if evaluates else set()}
        batches = {"train": fixed_batches(orders[0].tolist(), cfg.eval_batch_size), "valid": valid_batches}
        cache_path = run_dir / "ref_logps.pt"
        if master:
            # Before training the policy IS the starting model; on resume the starting model is loaded again
            # (only if the cache lacks pairs the extended run needs).
            start = (lambda: (policy, tokenizer)) if state is None else load_start_model
            update_reference_cache(cache_path, reference_key(cfg, train_ex, valid_ex),
                                   {"train": train_ex, "valid": valid_ex}, batches, needed, start,
                                   tokenizer.pad_id, cfg, device)
        if ddp:
            dist.barrier()
        ref = torch.load(cache_path, weights_only=True)

    # -- optimizer and resume state --------------------------------------------
    if cfg.freeze_embeddings:
        for emb in (policy.embed, policy.lm_head, policy.pos_embed):
            if emb is not None:
                emb.weight.requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.RMSprop(params, lr=cfg.lr) if cfg.optimizer == "rmsprop" else \
        torch.optim.AdamW(params, lr=cfg.lr)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=cfg.dtype == "fp16")
    step, best_val_loss, best_step, bad_evals = 0, float("inf"), None, 0
    window = torch.zeros(len(STATS) + 1, device=device)  # metric sums since the last log point
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, best_val_loss, best_step, bad_evals = (state["step"], state["best_val_loss"], state["best_step"],
                                                     state["bad_evals"])
        window = state["window"].to(device)
        set_rng_state(state["rng"])
        if master:
            print(f"resumed {run_dir} at step {step} (epoch {state['epoch']}, pair {state['pos']} of its order); "
                  f"best validation loss {best_val_loss:.4f}")
    if master:
        print(f"model: {cfg.model}, {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters, "
              f"{sum(p.numel() for p in params) / 1e6:.1f}M trained; optimizer {cfg.optimizer}")
    policy.gradient_checkpointing = cfg.activation_checkpointing
    policy.train()
    model = torch.nn.parallel.DistributedDataParallel(
        policy, device_ids=[device] if device.startswith("cuda") else None) if ddp else policy
    metrics = MetricsLog(run_dir / "metrics.jsonl", master, resume_step=step if state else None)

    def reduce(stats):
        """Sum over processes, then to the host: the one sync of a log point."""
        if ddp:
            dist.all_reduce(stats)
        return stats.tolist()

    def evaluate():
        """Validation metrics of the current policy; the fixed batches are sharded over processes."""
        policy.eval()  # the bare model, not the DDP wrapper: processes run different numbers of batches
        stats = torch.zeros(len(STATS) + 1, device=device)
        with torch.no_grad():
            for chunk in valid_batches[rank::world]:
                batch = {k: v.to(device) for k, v in collate([valid_ex[i] for i in chunk], tokenizer.pad_id).items()}
                rc, rr = (None, None) if ref is None else (ref["valid"]["chosen"][chunk].to(device),
                                                           ref["valid"]["rejected"][chunk].to(device))
                with autocast(device, cfg.dtype):
                    stats += dpo_forward(policy, batch, rc, rr, cfg, ref_model)[1]
        policy.train()
        return summarize(reduce(stats))

    bad_step = torch.tensor(-1, device=device)  # first step with a non-finite loss (kept on device: no sync)

    def check_finite():
        """Stop before non-finite parameters can be saved (a NaN loss makes NaN gradients and weights)."""
        if ddp:
            dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
        if bad_step.item() >= 0:
            raise FloatingPointError(f"loss is nan/inf at step {bad_step.item()}: stopping. The last good "
                                     f"checkpoint is {last_good()}; try a lower --lr or --dtype fp32")

    last_saved = state["step"] if state else None

    def last_good():
        return "none (none was saved yet)" if last_saved is None else f"{run_dir / 'last'} (step {last_saved})"

    def save_last():
        nonlocal last_saved
        last_saved = step
        epoch, pos = divmod(step, steps_per_epoch)
        save_checkpoint(policy, tokenizer, run_dir / "last", {
            "step": step, "epoch": epoch, "pos": pos * cfg.batch_size, "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_state(), "best_val_loss": best_val_loss,
            "best_step": best_step, "bad_evals": bad_evals, "window": window.cpu()})

    #### BEGIN TRAINING ####
    train_time, timed_steps = 0.0, 0                 # totals of this process, for the final summary
    window_time, window_steps, window_tokens = 0.0, 0, 0
    bar = tqdm(total=total_steps, initial=step, desc="dpo", disable=not master, dynamic_ncols=True)
    while step < total_steps and bad_evals < cfg.patience:
        t0 = time.perf_counter()
        batch_ids = global_batch(step)
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for k in range(cfg.grad_accum):
            # micro-batch k of this process: a disjoint slice of the global batch (the sharded sampler)
            idx = batch_ids[(k * world + rank) * micro:(k * world + rank + 1) * micro]
            batch = {key: v.to(device, non_blocking=True)
                     for key, v in collate([train_ex[i] for i in idx.tolist()], tokenizer.pad_id).items()}
            rc, rr = (None, None) if ref is None else (ref["train"]["chosen"][idx].to(device),
                                                       ref["train"]["rejected"][idx].to(device))
            sync = model.no_sync() if ddp and k < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast(device, cfg.dtype):
                    losses, stats = dpo_forward(model, batch, rc, rr, cfg, ref_model)
                # the mean over the global batch: DDP then averages the processes' gradients over `world`
                scaler.scale(losses.sum() / (cfg.batch_size // world)).backward()
            window += stats
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(stats[0]), step + 1, bad_step)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        window_steps += 1
        window_tokens += n_tokens([train_ex[i] for i in batch_ids.tolist()])
        t_end = time.perf_counter()
        window_time += t_end - t0

        if step % cfg.log_every == 0:
            check_finite()
            train_metrics = summarize(reduce(window))
            window_time += time.perf_counter() - t_end  # on GPU: the queued work this sync waited for
            record = {"step": step, "split": "train", "epoch": (step - 1) // steps_per_epoch, **train_metrics,
                      "lr": lr, "ms_per_step": 1000 * window_time / window_steps,
                      "tok_per_s": window_tokens / window_time}
            metrics.write(record)
            if master:
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['reward_accuracy']:.2f}")
                bar.write(f"step {step:5d}/{total_steps} | loss {record['loss']:.4f} | acc "
                          f"{record['reward_accuracy']:.3f} | margin {record['reward_margin']:+.4f} | lr {lr:.2e} | "
                          f"{record['ms_per_step']:.0f} ms/step | {record['tok_per_s']:.0f} tok/s")
            train_time, timed_steps = train_time + window_time, timed_steps + window_steps
            window.zero_()
            window_time, window_steps, window_tokens = 0.0, 0, 0

        if step % cfg.eval_every == 0:
            check_finite()
            t_eval = time.perf_counter()
            val = evaluate()
            if not math.isfinite(val["loss"]):
                raise FloatingPointError(f"validation loss is {val['loss']} at step {step}: stopping. The last "
                                         f"good checkpoint is {last_good()}")
            improved = val["loss"] < best_val_loss
            if improved:
                best_val_loss, best_step = val["loss"], step
            bad_evals = 0 if improved else bad_evals + 1
            metrics.write({"step": step, "split": "valid", "epoch": (step - 1) // steps_per_epoch, **val,
                           "best_val_loss": best_val_loss})
            if master:
                if improved:
                    save_checkpoint(policy, tokenizer, run_dir / "best")
                save_last()
                verdict = "new best -> best/" if improved else f"no improvement ({bad_evals}/{cfg.patience})"
                bar.write(f"eval {step:5d} | val loss {val['loss']:.4f} | acc {val['reward_accuracy']:.3f} | "
                          f"margin {val['reward_margin']:+.4f} | {verdict} | {time.perf_counter() - t_eval:.1f} s")
    bar.close()

    #### END TRAINING ####
    if step % cfg.eval_every != 0:  # evaluation points already saved last/
        check_finite()
        if master:
            save_last()
    train_time, timed_steps = train_time + window_time, timed_steps + window_steps
    if bad_evals >= cfg.patience:
        stop_reason = f"early stopping: no lower validation loss in {cfg.patience} evaluations"
    elif cfg.max_steps is not None and step >= cfg.max_steps:
        stop_reason = f"--max-steps {cfg.max_steps}"
    else:
        stop_reason = f"{cfg.epochs} epochs done"
    mean_ms = 1000 * train_time / timed_steps if timed_steps else float("nan")
    peak = peak_memory_mb(device)
    if master:
        best = f"best validation loss {best_val_loss:.4f} at step {best_step} in {run_dir / 'best'}" \
            if best_step is not None else "no evaluation yet (evaluations run every --eval-every steps)"
        print(f"stopped at step {step} ({stop_reason}); {best}; {run_dir / 'last'} is step {step}")
        if cfg.lora_rank:
            print(f"best/ and last/ hold LoRA adapters; load_model reads them merged into {cfg.model}, or write a "
                  f"full checkpoint with: python lora.py merge {run_dir / 'best'} --out {run_dir / 'merged'}")
        print(f"mean step time {mean_ms:.0f} ms over {timed_steps} steps, peak memory {peak:.0f} MB "
              f"({'torch.cuda.max_memory_allocated' if device.startswith('cuda') else 'max RSS'})")
    return {"step": step, "best_val_loss": best_val_loss, "best_step": best_step, "mean_step_ms": mean_ms,
            "peak_memory_mb": peak, "stop_reason": stop_reason, "run_dir": str(run_dir)}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"train_dpo.py: error: {e}")
