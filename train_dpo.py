"""
Direct Preference Optimization (Rafailov et al. 2023) of a causal LM on (prompt, chosen, rejected) pairs:
the training step of "Preference Tuning for Toxicity Mitigation Generalizes Across Languages" (Li, Yong,
Bach 2024). Like Lee et al. (2024), whose recipe the paper reuses, it trains on English pairs whose chosen
response is non-toxic and rejected response toxic, with RMSprop, lr 1e-5, 150 warm-up steps, batch 4,
5 epochs and early stopping on the validation loss. The DPO computation itself (tokenization, batches,
log-probs, loss) is dpo.py; the resume state and the reference cache are runstate.py.

    python train_dpo.py                                  # CPU preset: gemma-3-270m on English RTP-LX pairs
    python train_dpo.py --model path/to/hf_dir --data pairs.jsonl --out runs/x --device cuda --dtype bf16
    python train_dpo.py --out runs/x --resume            # continue a killed run exactly where it stopped
    torchrun --nproc_per_node=2 train_dpo.py --data pairs.jsonl --out runs/ddp   # DDP, same global batch

The run directory holds:
    config.json      the resolved configuration (read back by --resume)
    data.json        source, count and sha256 of the training and validation pairs (--resume refuses others)
    metrics.jsonl    one JSON object per log/eval point: step, split, loss, reward_accuracy, reward_margin, ...
    ref_logps.pt     reference-model log-probs, computed once before training (keyed by data+model+truncation)
    best/            the checkpoint with the lowest validation loss (HF format: load_model or transformers;
                     with --lora-rank, adapters that peft reads), with a README.md naming the base model and
                     the training data's license (RTP-LX: CC BY-NC 4.0, so non-commercial use only)
    last/            the latest checkpoint, plus last/state.pt (optimizer, step, RNG, early-stopping counters),
                     so weights and resume state are replaced together in one atomic directory swap
"""

import contextlib
import copy
import dataclasses
import datetime
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import design
import lora
from dpo import STATS, autocast, batch_logps, collate, dpo_forward, summarize, tokenize_pairs
from loading import load_model
from model import DTYPES
from report import check_outputs, exclusive, exit_on_error, write_json
from runstate import (MetricsLog, by_length, check_run_data, data_records, find_checkpoint, fixed_batches,
                      load_resume_state, peak_memory_mb, reference_key, rng_state, save_checkpoint, set_rng_state,
                      training_card, update_reference_cache, write_run_data)
from train_config import TrainConfig, resolve_config

# -----------------------------------------------------------------------------
# Data, learning rate, pair order


def n_tokens(examples):
    """Real (non-pad) tokens the model reads for these pairs, for tok/s (host-side: no device sync)."""
    return sum(len(ex["chosen_input_ids"]) + len(ex["rejected_input_ids"]) for ex in examples)


def get_lr(step, cfg):
    """Linear warm-up over warmup_steps, then constant (Lee et al.; DPO reference implementation)."""
    return cfg.lr * min(1.0, (step + 1) / (cfg.warmup_steps + 1))


def epoch_order(n, seed, epoch):
    """The permutation of training pairs for an epoch: a function of (seed, epoch), so resume needs no sampler
    state beyond the step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


# -----------------------------------------------------------------------------
# Setup: processes, run directory, models, optimizer


def setup_distributed(cfg):
    """(ddp, rank, world). Under torchrun every process trains a disjoint share of each global batch."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False, 0, 1
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if cfg.device == "cuda":
        cfg.device = f"cuda:{local_rank}"
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(cfg.device)
    dist.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
    return True, rank, world


def prepare_run_dir(cfg, source, ddp, master, world, micro, records):
    """The run directory; the master writes config.json and data.json (the pairs' `records`) into it and prints
    the config with each value's source. A resumed run must have the pairs it started with."""
    run_dir = Path(cfg.out)
    if not cfg.resume and find_checkpoint(run_dir / "last") is not None:
        raise ValueError(f"{run_dir} already holds a run (last/); pass --resume to continue it or choose "
                         "another --out")
    if cfg.resume:
        check_run_data(run_dir, records)  # before anything in the run directory is rewritten
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", dataclasses.asdict(cfg))
        write_run_data(run_dir, records)
        print(f"config ({world} process{'es' if world > 1 else ''}, {micro} pairs per forward pass):")
        for k, v in dataclasses.asdict(cfg).items():
            note = f"CPU preset; paper: {getattr(TrainConfig(), k)}" if source[k] == "CPU preset" else source[k]
            print(f"  {k:18s} {v!s:22s} [{note}]")
    return run_dir


def base_dtype(cfg):
    # Trained weights stay fp32 (autocast computes in --dtype); a frozen LoRA base need not, so it is stored in it.
    return DTYPES[cfg.dtype] if cfg.lora_rank else torch.float32


def load_start_model(cfg):
    """(model, tokenizer) the run starts from; the model is also DPO's reference model."""
    return load_model(cfg.model, device=cfg.device, dtype=base_dtype(cfg))


def load_policy(cfg, run_dir):
    """(policy, tokenizer, resume state): the starting model (with fresh LoRA adapters), or RUN/last on --resume."""
    if cfg.resume:
        policy, tokenizer, state = load_resume_state(run_dir, cfg.device, base_dtype(cfg))
        policy.name_or_path = cfg.model  # what its checkpoints' cards and adapter configs name, not RUN/last
        return policy, tokenizer, state
    policy, tokenizer = load_start_model(cfg)
    if cfg.lora_rank:
        lora.add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    return policy, tokenizer, None


def build_optimizer(cfg, policy):
    """(trained parameters, optimizer, gradient scaler)."""
    if cfg.freeze_embeddings:
        for emb in (policy.embed, policy.lm_head, policy.pos_embed):
            if emb is not None:
                emb.weight.requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.RMSprop(params, lr=cfg.lr) if cfg.optimizer == "rmsprop" else \
        torch.optim.AdamW(params, lr=cfg.lr)
    # fp16 gradients underflow without loss scaling; for fp32 and bf16 the scaler does nothing
    scaler = torch.amp.GradScaler(torch.device(cfg.device).type, enabled=cfg.dtype == "fp16")
    return params, optimizer, scaler


# -----------------------------------------------------------------------------
# Training


class Trainer:
    """One DPO run. __init__ sets it up; `run` loops over optimizer steps (`train_step`), logging (`log`) and
    evaluating with checkpoints (`evaluate_and_save`). Everything an exact resume needs is an attribute, and
    `save_last` writes it all to RUN/last."""

    def __init__(self, cfg, source, ddp, rank, world):
        self.cfg, self.device, self.ddp, self.rank, self.world = cfg, cfg.device, ddp, rank, world
        self.master = rank == 0
        if cfg.batch_size % (cfg.grad_accum * world):
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by --grad-accum {cfg.grad_accum} x "
                             f"{world} process(es)")
        self.micro = cfg.batch_size // (cfg.grad_accum * world)  # pairs per forward pass on this process
        # data: read before the model loads and the run directory is written, so that bad input fails fast
        train_pairs, valid_pairs, n_skipped = design.train_valid_pairs(cfg.data, cfg.valid_data, cfg.valid_frac,
                                                                          cfg.skip_bad)
        self.run_dir = prepare_run_dir(cfg, source, ddp, self.master, world, self.micro,
                                       data_records(cfg, train_pairs, valid_pairs))
        self.card = training_card(cfg)
        torch.manual_seed(cfg.seed)
        if n_skipped and self.master:
            print(f"skipped {n_skipped} bad row(s) in {cfg.data} (--skip-bad)")
        self.policy, self.tokenizer, state = load_policy(cfg, self.run_dir)
        cut = (cfg.max_prompt_len, cfg.max_len, cfg.response_tokens)
        self.train_ex = tokenize_pairs(self.tokenizer, train_pairs, *cut)
        self.valid_ex = tokenize_pairs(self.tokenizer, valid_pairs, *cut)
        self.pairs_kept = {"train": [len(self.train_ex), len(train_pairs)],  # [kept, given]
                           "valid": [len(self.valid_ex), len(valid_pairs)]}
        if cfg.response_tokens is not None and self.master:
            print(f"--response-tokens {cfg.response_tokens}: kept {len(self.train_ex)} of {len(train_pairs)} train "
                  f"and {len(self.valid_ex)} of {len(valid_pairs)} valid pairs (dropped: a response of "
                  f"<= {cfg.response_tokens} tokens)")
        if not self.valid_ex:
            raise ValueError(f"no validation pair has both responses longer than --response-tokens "
                             f"{cfg.response_tokens}")
        self.steps_per_epoch = len(self.train_ex) // cfg.batch_size  # the last partial batch of an epoch is dropped
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_ex)} training pairs is fewer than --batch-size {cfg.batch_size}")
        self.total_steps = cfg.epochs * self.steps_per_epoch if cfg.max_steps is None else \
            min(cfg.max_steps, cfg.epochs * self.steps_per_epoch)
        self.orders = [epoch_order(len(self.train_ex), cfg.seed, e) for e in range(cfg.epochs)]
        self.valid_batches = fixed_batches(by_length(self.valid_ex), cfg.eval_batch_size)  # eval + its reference
        if self.master:
            print(f"data: {len(self.train_ex)} train / {len(self.valid_ex)} valid pairs; {self.steps_per_epoch} "
                  f"steps per epoch, {self.total_steps} steps planned")

        self.ref_model, self.ref = self.setup_reference(state)
        self.params, self.optimizer, self.scaler = build_optimizer(cfg, self.policy)
        self.restore(state)
        if self.master:
            print(f"model: {cfg.model}, {sum(p.numel() for p in self.policy.parameters()) / 1e6:.1f}M parameters, "
                  f"{sum(p.numel() for p in self.params) / 1e6:.1f}M trained; optimizer {cfg.optimizer}")
        self.policy.gradient_checkpointing = cfg.activation_checkpointing
        self.policy.train()
        self.model = torch.nn.parallel.DistributedDataParallel(
            self.policy, device_ids=[self.device] if self.device.startswith("cuda") else None) if ddp else self.policy
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.master,
                                  resume_step=self.step if state else None)
        self.bad_step = torch.tensor(-1, device=self.device)  # first step with a non-finite loss (on device: no sync)
        self.window_time, self.window_steps, self.window_tokens = 0.0, 0, 0  # since the last log point
        self.train_time, self.timed_steps = 0.0, 0                           # totals of this process

    def setup_reference(self, state):
        """(reference model, None): the DPO paper's reference, a frozen copy of the starting model (with LoRA,
        the policy itself with its adapters disabled: no second copy). --ref-model cache: (None, its log-probs
        on every pair the run needs, computed once before training; see cached_reference)."""
        cfg = self.cfg
        if cfg.ref_model == "frozen" and cfg.lora_rank:
            return self.policy, None
        if cfg.ref_model == "frozen":
            ref_model = copy.deepcopy(self.policy) if state is None else load_start_model(cfg)[0]
            return ref_model.requires_grad_(False).eval(), None
        return None, self.cached_reference(state)

    def cached_reference(self, state):
        """--ref-model cache: {split: {chosen, rejected: [N]}} reference log-probs of the pairs the remaining steps
        and evaluations use, from RUN/ref_logps.pt, computed with the starting model for those it lacks. The
        same numbers as the frozen copy's (up to batching), with one model in memory."""
        cfg = self.cfg
        start_step = state["step"] if state else 0
        evaluates = self.total_steps // cfg.eval_every > start_step // cfg.eval_every
        needed = {"train": {i for s in range(start_step, self.total_steps) for i in self.global_batch(s).tolist()},
                  "valid": set(range(len(self.valid_ex))) if evaluates else set()}
        batches = {"train": fixed_batches(self.orders[0].tolist(), cfg.eval_batch_size), "valid": self.valid_batches}
        cache_path = self.run_dir / "ref_logps.pt"
        if self.master:
            # Before training the policy IS the starting model; on resume the starting model is loaded again
            # (only if the cache lacks pairs the extended run needs).
            start = (lambda: self.policy) if state is None else (lambda: load_start_model(cfg)[0])
            update_reference_cache(cache_path, reference_key(cfg, self.train_ex, self.valid_ex),
                                   {"train": self.train_ex, "valid": self.valid_ex}, batches, needed, start,
                                   self.tokenizer.pad_id, cfg, self.device)
        if self.ddp:
            dist.barrier()
        return torch.load(cache_path, weights_only=True)

    def restore(self, state):
        """Counters, optimizer and RNG: fresh, or as a resumed run left them."""
        self.step, self.best_val_loss, self.best_step, self.bad_evals = 0, float("inf"), None, 0
        self.window = torch.zeros(len(STATS) + 1, device=self.device)  # metric sums since the last log point
        self.last_saved = None
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.step, self.best_val_loss, self.best_step, self.bad_evals = (
                state["step"], state["best_val_loss"], state["best_step"], state["bad_evals"])
            self.window, self.last_saved = state["window"].to(self.device), state["step"]
            set_rng_state(state["rng"])
            if self.master:
                print(f"resumed {self.run_dir} at step {self.step} (epoch {state['epoch']}, pair {state['pos']} "
                      f"of its order); best validation loss {self.best_val_loss:.4f}")

    # -- one batch --------------------------------------------------------------

    def global_batch(self, step):
        """The pair ids of an optimizer step, [batch_size]."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self.orders[epoch][pos * self.cfg.batch_size:(pos + 1) * self.cfg.batch_size]

    def collate(self, examples, ids):
        return {k: v.to(self.device, non_blocking=True)
                for k, v in collate([examples[i] for i in ids], self.tokenizer.pad_id).items()}

    def reference_logps(self, split, ids, batch):
        """Reference log-probs of a batch, [B] chosen and [B] rejected: a no-grad forward of the frozen reference
        model (a copy, or with LoRA the policy itself with its adapters off), or with --ref-model cache the
        stored ones."""
        if self.ref_model is not None:
            with torch.no_grad(), lora.disabled(self.ref_model):
                logps, _ = batch_logps(self.ref_model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                       chunked=self.cfg.logps == "chunked")
            return logps.chunk(2)
        return self.ref[split]["chosen"][ids].to(self.device), self.ref[split]["rejected"][ids].to(self.device)

    # -- the loop ---------------------------------------------------------------

    def train_step(self):
        """One optimizer step on the global batch: grad_accum micro-batches on each process. Returns its lr."""
        cfg, t0 = self.cfg, time.perf_counter()
        batch_ids = self.global_batch(self.step)
        lr = get_lr(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for k in range(cfg.grad_accum):
            # micro-batch k of this process: a disjoint slice of the global batch (the sharded sampler)
            start = (k * self.world + self.rank) * self.micro
            ids = batch_ids[start:start + self.micro].tolist()
            batch = self.collate(self.train_ex, ids)
            # DDP all-reduces the gradients in the backward pass of the last micro-batch only
            sync = self.model.no_sync() if self.ddp and k < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast(self.device, cfg.dtype):
                    losses, stats = dpo_forward(self.model, batch, *self.reference_logps("train", ids, batch), cfg)
                # the mean over the global batch: DDP then averages the processes' gradients over `world`
                self.scaler.scale(losses.sum() / (cfg.batch_size // self.world)).backward()
            self.window += stats
            self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(stats[0]), self.step + 1,
                                        self.bad_step)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.window_steps += 1
        self.window_tokens += n_tokens([self.train_ex[i] for i in batch_ids.tolist()])
        self.window_time += time.perf_counter() - t0
        return lr

    def run(self):
        """Train until --max-steps, the end of the epochs, or early stopping; save last/ and report."""
        cfg = self.cfg
        #### BEGIN TRAINING ####
        bar = tqdm(total=self.total_steps, initial=self.step, desc="dpo", disable=not self.master,
                   dynamic_ncols=True)
        while self.step < self.total_steps and self.bad_evals < cfg.patience:
            lr = self.train_step()
            bar.update(1)
            if self.step % cfg.log_every == 0:
                self.log(lr, bar)
            if self.step % cfg.eval_every == 0:
                self.evaluate_and_save(bar)
        bar.close()
        #### END TRAINING ####
        if self.step % cfg.eval_every != 0:  # evaluation points already saved last/
            self.check_finite()
            self.check_weights()
            if self.master:
                self.save_last()
        return self.summary()

    # -- log points, evaluation, checkpoints ------------------------------------

    def reduce(self, stats):
        """Sum over processes, then to the host: the one sync of a log point."""
        if self.ddp:
            dist.all_reduce(stats)
        return stats.tolist()

    def check_finite(self):
        """Stop before non-finite parameters can be saved (a NaN loss makes NaN gradients and weights)."""
        if self.ddp:
            dist.all_reduce(self.bad_step, op=dist.ReduceOp.MAX)
        if self.bad_step.item() >= 0:
            raise FloatingPointError(f"loss is nan/inf at step {self.bad_step.item()}: stopping. The last good "
                                     f"checkpoint is {self.last_good()}; try a lower --lr or --dtype fp32")

    def check_weights(self):
        """Refuse to save non-finite trained weights (a loss can stay finite while an update overflows)."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.params]).all()
        if not finite.item():
            raise FloatingPointError(f"non-finite weights after step {self.step}: not saving them. The last good "
                                     f"checkpoint is {self.last_good()}; try a lower --lr or --grad-clip")

    def last_good(self):
        if self.last_saved is None:
            return "none (none was saved yet)"
        return f"{self.run_dir / 'last'} (step {self.last_saved})"

    def log(self, lr, bar):
        """Record and print the training metrics of the steps since the last log point."""
        t0 = time.perf_counter()
        self.check_finite()
        train_metrics = summarize(self.reduce(self.window))
        self.window_time += time.perf_counter() - t0  # on GPU: the queued work this sync waited for
        record = {"step": self.step, "split": "train", "epoch": (self.step - 1) // self.steps_per_epoch,
                  **train_metrics, "lr": lr, "ms_per_step": 1000 * self.window_time / self.window_steps,
                  "tok_per_s": self.window_tokens / self.window_time}
        self.metrics.write(record)
        if self.master:
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['reward_accuracy']:.2f}")
            bar.write(f"step {self.step:5d}/{self.total_steps} | loss {record['loss']:.4f} | acc "
                      f"{record['reward_accuracy']:.3f} | margin {record['reward_margin']:+.4f} | lr {lr:.2e} | "
                      f"{record['ms_per_step']:.0f} ms/step | {record['tok_per_s']:.0f} tok/s")
        self.train_time, self.timed_steps = self.train_time + self.window_time, self.timed_steps + self.window_steps
        self.window.zero_()
        self.window_time, self.window_steps, self.window_tokens = 0.0, 0, 0

    def evaluate(self):
        """Validation metrics of the current policy; the fixed batches are sharded over processes."""
        self.policy.eval()  # the bare model, not the DDP wrapper: processes run different numbers of batches
        stats = torch.zeros(len(STATS) + 1, device=self.device)
        with torch.no_grad():
            for ids in self.valid_batches[self.rank::self.world]:
                batch = self.collate(self.valid_ex, ids)
                with autocast(self.device, self.cfg.dtype):
                    stats += dpo_forward(self.policy, batch, *self.reference_logps("valid", ids, batch), self.cfg)[1]
        self.policy.train()
        return summarize(self.reduce(stats))

    def evaluate_and_save(self, bar):
        """Evaluate; a lower validation loss saves best/, another evaluation without one counts towards early
        stopping; last/ is saved either way."""
        self.check_finite()
        t0 = time.perf_counter()
        val = self.evaluate()
        if not math.isfinite(val["loss"]):
            raise FloatingPointError(f"validation loss is {val['loss']} at step {self.step}: stopping. The last "
                                     f"good checkpoint is {self.last_good()}")
        improved = val["loss"] < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step = val["loss"], self.step
        self.bad_evals = 0 if improved else self.bad_evals + 1
        self.metrics.write({"step": self.step, "split": "valid", "epoch": (self.step - 1) // self.steps_per_epoch,
                            **val, "best_val_loss": self.best_val_loss})
        self.check_weights()
        if self.master:
            if improved:
                save_checkpoint(self.policy, self.tokenizer, self.run_dir / "best", card=self.card)
            self.save_last()
            verdict = "new best -> best/" if improved else f"no improvement ({self.bad_evals}/{self.cfg.patience})"
            bar.write(f"eval {self.step:5d} | val loss {val['loss']:.4f} | acc {val['reward_accuracy']:.3f} | "
                      f"margin {val['reward_margin']:+.4f} | {verdict} | {time.perf_counter() - t0:.1f} s")

    def save_last(self):
        """last/: the weights and everything an exact resume needs (the master's job)."""
        self.last_saved = self.step
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        save_checkpoint(self.policy, self.tokenizer, self.run_dir / "last", {
            "step": self.step, "epoch": epoch, "pos": pos * self.cfg.batch_size,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "best_val_loss": self.best_val_loss, "best_step": self.best_step, "bad_evals": self.bad_evals,
            "window": self.window.cpu()}, card=self.card)

    def next_steps(self):
        """The run's folder and what to run on it next: the last thing a person sees of a run."""
        run_dir, best = self.run_dir, self.run_dir / ("best" if self.best_step is not None else "last")
        gens = run_dir / "generations.jsonl"
        print(f"output folder: {run_dir}\nnext:\n"
              f"  python generate.py --model {best} --prompts PROMPTS.txt --out {gens}   # sample continuations\n"
              f"  python evaluate.py {gens}   # score their toxicity\n"
              f"  python train_dpo.py --out {run_dir} --resume --max-steps N   # train further")

    def summary(self):
        """Print why the run stopped, where its checkpoints are, mean step time and peak memory; return them."""
        cfg, run_dir = self.cfg, self.run_dir
        self.train_time, self.timed_steps = self.train_time + self.window_time, self.timed_steps + self.window_steps
        if self.bad_evals >= cfg.patience:
            stop_reason = f"early stopping: no lower validation loss in {cfg.patience} evaluations"
        elif cfg.max_steps is not None and self.step >= cfg.max_steps:
            stop_reason = f"--max-steps {cfg.max_steps}"
        else:
            stop_reason = f"{cfg.epochs} epochs done"
        mean_ms = 1000 * self.train_time / self.timed_steps if self.timed_steps else float("nan")
        peak = peak_memory_mb(self.device)
        if self.master:
            best = f"best validation loss {self.best_val_loss:.4f} at step {self.best_step} in {run_dir / 'best'}" \
                if self.best_step is not None else "no evaluation yet (evaluations run every --eval-every steps)"
            print(f"stopped at step {self.step} ({stop_reason}); {best}; {run_dir / 'last'} is step {self.step}")
            if cfg.lora_rank:
                print(f"best/ and last/ hold LoRA adapters; load_model reads them merged into {cfg.model}, or "
                      f"write a full checkpoint with: python loading.py convert {run_dir / 'best'} --out "
                      f"{run_dir / 'merged'}")
            print(f"mean step time {mean_ms:.0f} ms over {self.timed_steps} steps, peak memory {peak:.0f} MB "
                  f"({'torch.cuda.max_memory_allocated' if self.device.startswith('cuda') else 'max RSS'})")
            self.next_steps()
        return {"step": self.step, "best_val_loss": self.best_val_loss, "best_step": self.best_step,
                "mean_step_ms": mean_ms, "peak_memory_mb": peak, "stop_reason": stop_reason, "run_dir": str(run_dir),
                "pairs_kept": self.pairs_kept}


def main(argv=None):
    cfg, source = resolve_config(argv, description=__doc__)  # --help: this script's docstring
    ddp, rank, world = setup_distributed(cfg)
    if cfg.out is None:
        out = [f"runs/dpo-{datetime.datetime.now():%Y%m%d-%H%M%S}"]
        if ddp:
            dist.broadcast_object_list(out)  # every process must agree on the directory
        cfg.out = out[0]
    run_dir = Path(cfg.out)
    check_outputs([("--out", run_dir / name) for name in ("config.json", "data.json", "metrics.jsonl")],
                  [("--model", cfg.model), ("--data", cfg.data), ("--valid-data", cfg.valid_data)],
                  folders=[("--out", run_dir), *(("--out", run_dir / name) for name in ("best", "last"))])
    try:
        # one writer per run directory: a second train_dpo.py on the same --out is refused, not interleaved
        with exclusive(Path(cfg.out) / "metrics.jsonl") if rank == 0 else contextlib.nullcontext():
            return Trainer(cfg, source, ddp, rank, world).run()
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    exit_on_error(main)
