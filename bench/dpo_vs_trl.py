"""
Benchmark: one DPO training step of train_dpo.py vs TRL's DPOTrainer, same model, data and settings.

Both sides load the same HF-format directory (gemma-3-270m written by our save_model, which transformers
reads), train on the same English RTP-LX pairs with RMSprop, batch 8 pairs, sequences cut to 96 tokens,
fp32 on the CPU, reference log-probs precomputed before training (ours: ref_logps.pt; TRL:
precompute_ref_log_probs=True), so only one model is in memory on either side. Each side runs in its own
process and reports, per optimizer step, the wall-clock time and the CPU time of its process (the first step
is a warm-up and not timed), and its peak RSS; the driver prints the medians and the ratios. CPU time is the
figure that stays put when other jobs share the machine; wall time is what a user waits.

TRL and transformers are NOT dependencies of the project: they live in a separate virtual environment,
    python3 -m venv /tmp/fixenv && /tmp/fixenv/bin/pip install torch==2.13.0 transformers trl
and the driver runs the TRL side with that interpreter:

    python3 bench/dpo_vs_trl.py --steps 4 --trl-python /tmp/fixenv/bin/python
    python3 bench/dpo_vs_trl.py --steps 4 --trl-python /tmp/fixenv/bin/python --freeze-embeddings
    python3 bench/dpo_vs_trl.py --steps 4 --trl-python /tmp/fixenv/bin/python --checkpointing ours

--logps picks our log-prob path (train_dpo.py --logps): chunked, the CPU preset's, by default; plain builds the
full logits as TRL does.

--lora trains LoRA adapters instead (the paper's rank 64, alpha 16, dropout 0.05, every linear layer of the
blocks): ours with --lora-rank 64, TRL with a peft LoraConfig (target_modules="all-linear"; pip install peft
in the same venv). Run it next to the full fine-tuning run to compare the two ways of training.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LORA = dict(r=64, lora_alpha=16, lora_dropout=0.05)  # the paper's values


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def clocks():
    """(wall seconds, CPU seconds of this process): CPU time barely moves when other jobs share the cores."""
    return time.perf_counter(), time.process_time()


def durations(marks):
    """(wall, cpu) durations between consecutive step-start marks, without the first step (warm-up). A run of
    steps + 2 optimizer steps thus times `steps` of them (the last one has no closing mark)."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])][1:]


def run_ours(args):
    sys.path.insert(0, str(ROOT))
    import train_dpo

    # get_lr is called once at the start of every optimizer step: mark the clocks there
    marks, get_lr = [], train_dpo.get_lr
    train_dpo.get_lr = lambda step, cfg: marks.append(clocks()) or get_lr(step, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        train_dpo.main([
            "--model", args.hf_dir, "--data", args.pairs, "--out", f"{tmp}/run", "--batch-size", "8",
            "--max-steps", str(args.steps + 2), "--max-len", "96", "--max-prompt-len", "64", "--lr", "1e-6",
            "--warmup-steps", "0", "--eval-every", "100000", "--log-every", "1", "--valid-frac", "0.05",
            "--eval-batch-size", "8", "--logps", args.logps,
            "--freeze-embeddings" if args.freeze_embeddings else "--no-freeze-embeddings",
            "--activation-checkpointing" if args.checkpointing in ("ours", "both")
            else "--no-activation-checkpointing",
            *(["--lora-rank", str(LORA["r"]), "--lora-alpha", str(LORA["lora_alpha"]), "--lora-dropout",
               str(LORA["lora_dropout"])] if args.lora else [])])
    return {"steps": durations(marks), "peak_rss_mb": peak_rss_mb()}


def run_trl(args):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines()]
    rows = rows[:(args.steps + 2) * 8]  # exactly the pairs the steps use (the precompute covers the whole set)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    if args.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)  # tied: the LM head too

    class StepClock(TrainerCallback):
        marks = []

        def on_step_begin(self, *a, **k):
            self.marks.append(clocks())

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=8, max_steps=args.steps + 2,
                           learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, optim="rmsprop",
                           max_grad_norm=10.0, beta=0.1, max_length=96, precompute_ref_log_probs=True, use_cpu=True,
                           report_to=[], save_strategy="no", eval_strategy="no", logging_steps=1,
                           dataloader_num_workers=0, seed=42, gradient_checkpointing=args.checkpointing == "both")
        peft_config = None
        if args.lora:
            from peft import LoraConfig
            peft_config = LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[StepClock()], peft_config=peft_config)
        trainer.train()
    return {"steps": durations(StepClock.marks), "peak_rss_mb": peak_rss_mb()}


def prepare(args):
    """Write the HF directory of the default model and the shared pairs file (once)."""
    sys.path.insert(0, str(ROOT))
    import design
    from checkpoint import DEFAULT_MODEL
    from loading import load_model, save_model

    if not (Path(args.hf_dir) / "config.json").exists():
        model, tokenizer = load_model(DEFAULT_MODEL)
        save_model(model, tokenizer, args.hf_dir)
        del model
    n = (args.steps + 2) * 8 + 2  # + 2 validation pairs for our run (--valid-frac 0.05)
    pairs = design.default_split()["train"][:n]
    Path(args.pairs).write_text("".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                                        for p in pairs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per side (after a warm-up step)")
    p.add_argument("--trl-python", default="/tmp/fixenv/bin/python",
                   help="interpreter of the virtual environment that has transformers and trl")
    p.add_argument("--work-dir", default="/tmp/bench", help="the HF copy of the model, the pairs file and each "
                   "side's results go here; a side whose results are there is not run again (delete to rerun)")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="freeze the tied 168M-parameter embedding on both sides (train_dpo's CPU preset)")
    p.add_argument("--checkpointing", choices=["none", "ours", "both"], default="none",
                   help="activation checkpointing on neither side, only ours (--activation-checkpointing), or both "
                        "(TRL: gradient_checkpointing=True)")
    p.add_argument("--logps", choices=["plain", "chunked"], default="chunked",
                   help="our log-prob path (train_dpo.py --logps; TRL always builds the full logits)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (rank 64, alpha 16, dropout 0.05, "
                   "all linear layers) on both sides instead of the weights")
    p.add_argument("--side", choices=["both", "ours", "trl"], default="both",
                   help="both: prepare, run each side in its own process and compare (the others are internal)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.hf_dir, args.pairs = f"{args.work_dir}/gemma-3-270m-hf", f"{args.work_dir}/pairs.jsonl"

    if args.side != "both":
        result = run_ours(args) if args.side == "ours" else run_trl(args)
        print("RESULT " + json.dumps(result))
        return result

    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    prepare(args)
    results = {}
    common = ["--steps", str(args.steps), "--work-dir", args.work_dir,
              "--checkpointing", args.checkpointing, "--logps", args.logps] + \
        (["--freeze-embeddings"] if args.freeze_embeddings else []) + (["--lora"] if args.lora else [])
    config = f"{'frozen' if args.freeze_embeddings else 'trained'}-ckpt_{args.checkpointing}-steps{args.steps}" + \
        f"-logps_{args.logps}" + ("-lora" if args.lora else "")
    for side, python in (("ours", sys.executable), ("trl", args.trl_python)):
        done = Path(args.work_dir) / f"{side}-{config}.json"  # a finished side is not rerun
        if not done.exists():
            proc = subprocess.run([python, __file__, "--side", side, *common], cwd=ROOT, capture_output=True,
                                  text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{side} side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            done.write_text(lines[-1][len("RESULT "):])
        results[side] = json.loads(done.read_text())
    for r in results.values():
        r["wall_s"] = statistics.median(w for w, _ in r["steps"])
        r["cpu_s"] = statistics.median(c for _, c in r["steps"])
    ours, trl = results["ours"], results["trl"]
    print(f"batch 8 pairs x <=96 tokens, {'LoRA rank 64' if args.lora else 'full fine-tuning'}, "
          f"{'frozen' if args.freeze_embeddings else 'trained'} embeddings, "
          f"activation checkpointing: {args.checkpointing}, our log-probs: {args.logps}; median of {args.steps} "
          f"steps after a warm-up step; load average {os.getloadavg()[0]:.1f}")
    print(f"{'':6s} {'wall s/step':>12s} {'CPU s/step':>11s} {'peak RSS':>10s}")
    for side, r in results.items():
        print(f"{side:6s} {r['wall_s']:12.2f} {r['cpu_s']:11.2f} {r['peak_rss_mb'] / 1024:7.2f} GB")
    ratios = {"steps_per_s_wall": trl["wall_s"] / ours["wall_s"], "steps_per_s_cpu": trl["cpu_s"] / ours["cpu_s"],
              "peak_rss": ours["peak_rss_mb"] / trl["peak_rss_mb"]}
    print(f"ours / TRL: {ratios['steps_per_s_cpu']:.2f}x steps per CPU-second, {ratios['steps_per_s_wall']:.2f}x "
          f"steps/s wall clock, {ratios['peak_rss']:.2f}x peak RSS")
    results["ratios"] = ratios
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
