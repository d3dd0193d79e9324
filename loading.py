"""
Checkpoints in, checkpoints out: the one place that turns a name into a (model, tokenizer) pair.

    python loading.py info gemma-3-270m                          # architecture, parameters, forward tokens/s
    python loading.py convert model.gguf --out runs/hf           # GGUF / HF / hub id -> one HF checkpoint
    python loading.py convert runs/lora/best --out runs/merged   # base + LoRA adapters -> one HF checkpoint
    python loading.py peft runs/lora/best --out runs/peft        # our adapters in PEFT's format

`load_model` takes a local HF directory, a .gguf file, a hub id, the embedded name gemma-3-270m, or a LoRA
adapter directory (lora.py), which gives its base model with the adapters merged in. Bytes are read by
checkpoint.py, tokenizers built by tokenizer.py, the architecture is model.py's, adapters are lora.py's; this
module sits above all four so none of them needs to know about the others' files.

`add_device_args` and `resolve_dtype` give every script the same --device and --dtype.
"""

import argparse
import time
from pathlib import Path

import torch

import lora
from checkpoint import (DEFAULT_MODEL, cache_dir, read_config, read_gguf, read_hf_weights, resolve_checkpoint,
                        write_hf_weights)
from model import DTYPES, Transformer
from report import exit_on_error, write_json
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# --device and --dtype, the same in every script


def add_device_args(parser):
    """Add --device and --dtype to an argparse parser; pass the parsed values through resolve_dtype."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="the dtype the model computes in (default: bf16 on CUDA, fp32 elsewhere); use fp32 "
                        "on CPU: bf16 matmuls are far slower on most CPUs")


def resolve_dtype(device, dtype):
    """The dtype name ("fp32", "bf16", "fp16") a script runs in: `dtype` when given, else bf16 on CUDA and fp32
    anywhere else. A name, not a torch.dtype, so it can be recorded in run settings; DTYPES[name] converts."""
    if dtype is not None:
        return dtype
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


# -----------------------------------------------------------------------------
# Per-process caches: the pipeline loads the same base model once per stage

_GGUF_READS = {}


def _read_gguf_cached(path, dtype):
    """read_gguf, remembered per process: dequantizing a GGUF file costs seconds. Keyed by path, size, mtime and
    dtype, so a changed file is read again."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, dtype)
    if key not in _GGUF_READS:
        _GGUF_READS.clear()  # one model at a time: a second dequantized copy would double the memory held
        _GGUF_READS[key] = read_gguf(path, dtype=dtype)
    return _GGUF_READS[key]


_GGUF_TOKENIZERS = {}


def _gguf_tokenizer(tok_fields):
    """The Tokenizer of a GGUF read, built once per read (parsing a 262k-entry vocabulary takes seconds);
    a Tokenizer is never modified after construction, so sharing one is safe."""
    if id(tok_fields) not in _GGUF_TOKENIZERS:
        _GGUF_TOKENIZERS.clear()
        tokenizer = Tokenizer.from_gguf_fields(tok_fields, cache_dir=cache_dir() / "tokenizers")
        _GGUF_TOKENIZERS[id(tok_fields)] = (tok_fields, tokenizer)  # holding tok_fields keeps its id unique
    return _GGUF_TOKENIZERS[id(tok_fields)][1]


def flush_denormals_on_cpu(device):
    """Subnormal floats (|x| < 1.2e-38) send x86 arithmetic down a slow microcode path, and Gemma's activations
    produce them, so on CPU they are flushed to zero (see bench/README.md for the speed-up). Values that small
    never matter to a language model's output."""
    if torch.device(device).type == "cpu":
        torch.set_flush_denormal(True)


# -----------------------------------------------------------------------------
# Loading and saving


def load_model(name_or_path, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from a local HF directory, a .gguf file, a hub id (through huggingface_hub when it
    is installed and online), or the embedded name "gemma-3-270m" (the default). A LoRA adapter directory
    (lora.py) gives its base model with the adapters merged in."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if lora.is_adapter_dir(name_or_path):
        return load_adapter_model(name_or_path, device=device, dtype=dtype)
    flush_denormals_on_cpu(device)
    path = Path(resolve_checkpoint(name_or_path))
    if path.suffix == ".gguf":
        hf_config, tensors, tok_fields = _read_gguf_cached(path, dtype)
        # Clones: the model takes ownership of its tensors (assign=True) and training updates them in place.
        tensors = {name: t.to(device, copy=True) for name, t in tensors.items()}
        tokenizer = _gguf_tokenizer(tok_fields)
    else:
        hf_config = read_config(path)
        tensors = read_hf_weights(path, device=device, dtype=dtype)
        tokenizer = Tokenizer.from_dir(path)
    model = Transformer.from_hf(hf_config, tensors, source=str(path),
                                config_source=str(path if path.suffix == ".gguf" else path / "config.json"))
    model.name_or_path = str(name_or_path)
    return model.eval(), tokenizer


def load_adapter_model(adapter_dir, device="cpu", dtype=torch.float32, base=None, merged=True):
    """(model, tokenizer): the base model named in adapter_dir (or `base`) with the adapters added, merged into
    the weights unless merged=False (then they stay separate and trainable)."""
    cfg = lora.read_adapter_config(adapter_dir)
    base = base or cfg["base_model"]
    if not base:
        raise ValueError(f"{Path(adapter_dir) / lora.CONFIG_NAME}: names no base model; pass it explicitly")
    try:
        model, tokenizer = load_model(base, device=device, dtype=dtype)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{Path(adapter_dir) / lora.CONFIG_NAME}: base model {base!r} not found ({e}); "
                                "pass the base model's path explicitly") from None
    lora.load_adapters(model, adapter_dir)
    if merged:  # an ordinary checkpoint, trainable like any other load_model result
        lora.merge(model).requires_grad_(True)
    return model, tokenizer


def save_model(model, tokenizer, out_dir, max_shard_bytes=None):
    """Write an HF-format directory (config.json, safetensors weights, tokenizer) that both `load_model`
    and transformers' `AutoModelForCausalLM.from_pretrained` read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.hf_state_dict().items()}
    write_hf_weights(out_dir, tensors, max_shard_bytes=max_shard_bytes)
    dtype = next(model.parameters()).dtype
    hf = {**model.config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch."),
          "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    write_json(out_dir / "config.json", hf)
    tokenizer.save(out_dir)


# -----------------------------------------------------------------------------
# CLI: inspect a checkpoint, convert it, export adapters


def info(args):
    """Print the architecture and parameter count, then time one forward pass of random tokens."""
    dtype = resolve_dtype(args.device, args.dtype)
    t0 = time.perf_counter()
    model, _ = load_model(args.model, device=args.device, dtype=dtype)
    load_s = time.perf_counter() - t0
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {cfg.family}, {n_params / 1e6:.1f}M parameters, {cfg.n_layers} layers, d_model "
          f"{cfg.d_model}, vocab {cfg.vocab_size}, {dtype}; loaded in {load_s:.1f}s")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    with torch.inference_mode():
        model(ids[:1, :8])  # warm-up: the first call pays for kernel selection and allocation
        t0 = time.perf_counter()
        model(ids)
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously; stop the clock when they are done
        dt = time.perf_counter() - t0
    print(f"forward {args.batch}x{args.seq}: {dt:.2f}s, {args.batch * args.seq / dt:.0f} tokens/s")


def convert(args):
    """Load anything load_model reads and write it as one HF-format checkpoint, in the dtype it was loaded in."""
    dtype = resolve_dtype(args.device, args.dtype)
    if lora.is_adapter_dir(args.model):
        model, tokenizer = load_adapter_model(args.model, device=args.device, dtype=dtype, base=args.base)
    else:
        model, tokenizer = load_model(args.model, device=args.device, dtype=dtype)
    save_model(model, tokenizer, args.out)
    print(f"wrote {args.model} ({dtype}) as an HF checkpoint to {args.out}")


def peft(args):
    """Rewrite an adapter directory of ours in PEFT's LoRA format."""
    model, _ = load_adapter_model(args.adapters, base=args.base, merged=False)
    lora.save_peft_adapters(model, args.out, model.name_or_path)
    print(f"wrote {args.adapters} in PEFT's format to {args.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    inf = sub.add_parser("info", help="print a checkpoint's architecture and time a forward pass")
    inf.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="local HF dir, .gguf file, hub id, adapter "
                     f"dir, or {DEFAULT_MODEL} (default)")
    add_device_args(inf)
    inf.add_argument("--batch", type=int, default=8, help="batch size of the timed forward pass")
    inf.add_argument("--seq", type=int, default=128, help="sequence length of the timed forward pass")
    cv = sub.add_parser("convert", help="write a GGUF file, HF dir, hub id or LoRA adapter dir (merged into its "
                        "base) as one HF-format checkpoint, which load_model and transformers read")
    cv.add_argument("model", help="what load_model reads: HF dir, .gguf file, hub id, adapter dir, or "
                    f"{DEFAULT_MODEL}")
    cv.add_argument("--out", required=True, help="output HF directory")
    cv.add_argument("--base", default=None, help="for an adapter dir: the base model, if not where "
                    "adapter_config.json says")
    add_device_args(cv)
    ex = sub.add_parser("peft", help="write LoRA adapters in PEFT's format (Llama, Gemma 3, Cohere families)")
    ex.add_argument("adapters", help="adapter directory (train_dpo.py --lora-rank N writes RUN/best, RUN/last)")
    ex.add_argument("--out", required=True, help="output directory (adapter_config.json, adapter_model.safetensors)")
    ex.add_argument("--base", default=None, help="base model, if not where adapter_config.json says")
    args = p.parse_args(argv)
    {"info": info, "convert": convert, "peft": peft}[args.command](args)


if __name__ == "__main__":
    exit_on_error(main)
