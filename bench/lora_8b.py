"""
Peak memory and step time of one DPO training step of an 8B-shaped model, LoRA vs full fine-tuning, for a GPU.

The model is one of bench/lora_memory.py's (Llama-3-8B, Aya-23-8B, BLOOM-7.1B shapes) with random weights,
built directly on the device, so no checkpoint or download is needed. One step is what train_dpo.py does: a
concatenated chosen+rejected forward (`dpo_forward`, LM head on response tokens only, reference log-probs
given as a precomputed cache would give them), backward, gradient clipping, RMSprop. Timing waits for the
device; memory is torch.cuda.max_memory_allocated (on the CPU: the process's peak RSS).

    python3 bench/lora_8b.py --device cuda --model llama-3-8b --mode lora --dtype bf16 --seq 256 --batch 1
    python3 bench/lora_8b.py --device cuda --model llama-3-8b --mode full      # fp32 weights: expect OOM at 80 GB
    python3 bench/lora_8b.py --device cpu --layers 1 --vocab 1000 --seq 32 --dtype fp32   # a smoke run of the script

--mode lora stores the frozen base in --dtype with fp32 adapters (rank 64, alpha 16, dropout 0.05, every
linear layer); --mode full keeps fp32 weights and autocasts matmuls to --dtype, as train_dpo.py does.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo  # noqa: E402
import lora  # noqa: E402
import runstate  # noqa: E402
import train_config  # noqa: E402
from loading import add_device_args, resolve_dtype  # noqa: E402
from lora_memory import MODELS  # noqa: E402
from model import DTYPES, Transformer, config_from_hf  # noqa: E402


def random_batch(pairs, seq, vocab, device):
    """`pairs` chosen/rejected pairs of `seq` tokens, the second half of each the response (collate's layout)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2 * pairs, seq), generator=g)
    labels = ids.clone()
    labels[:, :seq // 2] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="llama-3-8b", help="which shape")
    p.add_argument("--layers", type=int, default=None, help="keep only this many blocks (smoke runs)")
    p.add_argument("--vocab", type=int, default=None, help="shrink the vocabulary to this size (smoke runs)")
    p.add_argument("--mode", choices=["lora", "full"], default="lora")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (the paper: 64)")
    add_device_args(p)  # LoRA: --dtype is the frozen base's dtype; full: the autocast dtype (weights stay fp32)
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (the paper's max length: 256)")
    p.add_argument("--batch", type=int, default=1, help="pairs per forward pass (the paper: 1, grad-accum 4)")
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps, after one warm-up step")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    args.dtype = resolve_dtype(args.device, args.dtype)

    hf = dict(MODELS[args.model])
    if args.layers:
        hf["num_hidden_layers" if "num_hidden_layers" in hf else "n_layer"] = args.layers
    if args.vocab:
        hf["vocab_size"] = args.vocab
    cfg = config_from_hf(hf)
    torch.manual_seed(0)
    weights_dtype = DTYPES[args.dtype] if args.mode == "lora" else torch.float32
    torch.set_default_dtype(weights_dtype)  # built in its final dtype: no fp32 copy of 8B weights first
    try:
        with torch.device(args.device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02) if param.dim() >= 2 else param.fill_(1.0)  # norm weights 1
    if args.mode == "lora":
        lora.add_lora(model, args.rank, 16, 0.05)
    model.gradient_checkpointing = args.activation_checkpointing
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.RMSprop(params, lr=1e-6)
    train_cfg = train_config.TrainConfig(dtype=args.dtype)
    batch = random_batch(args.batch, args.seq, cfg.vocab_size, args.device)
    ref = torch.zeros(args.batch, device=args.device)  # what the reference cache would supply
    autocast = dpo.autocast(args.device, args.dtype if args.mode == "full" else "fp32")

    def step():
        for _ in range(args.grad_accum):
            with autocast:
                losses, _ = dpo.dpo_forward(model, batch, ref, ref, train_cfg)
            (losses.sum() / (args.batch * args.grad_accum)).backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    n_params = sum(q.numel() for q in model.parameters())
    result = {"model": args.model, "layers": cfg.n_layers, "mode": args.mode, "dtype": args.dtype,
              "parameters": n_params, "trained": sum(q.numel() for q in params), "seq": args.seq,
              "batch": args.batch, "grad_accum": args.grad_accum, "device": args.device,
              "activation_checkpointing": args.activation_checkpointing}
    try:
        step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        result["s_per_step"] = (time.perf_counter() - t0) / args.steps
        result["tokens_per_s"] = 2 * args.batch * args.grad_accum * args.seq / result["s_per_step"]
    except torch.OutOfMemoryError as e:
        result["out_of_memory"] = str(e).splitlines()[0]
    result["peak_memory_mb"] = runstate.peak_memory_mb(args.device)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
