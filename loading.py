"""
Checkpoints in, checkpoints out: the one place that turns a name into a (model, tokenizer) pair.

    python loading.py info gemma-3-270m                          # architecture, parameters, forward tokens/s
    python loading.py convert model.gguf --out runs/hf           # GGUF / HF / hub id -> one HF checkpoint
    python loading.py convert runs/lora/best --out runs/merged   # base + LoRA adapters -> one HF checkpoint
    python loading.py peft old_run/best --out runs/peft          # older adapter dirs in PEFT's format

`load_model` takes a local HF directory, a .gguf file, a hub id, the embedded name gemma-3-270m, or a LoRA
adapter directory (lora.py), which gives its base model with the adapters merged in. Bytes are read by
checkpoint.py, tokenizers built by tokenizer.py, the architecture is model.py's, adapters are lora.py's; this
module sits above all four so none of them needs to know about the others' files.

`save_model` writes a checkpoint with what it came from: the source's generation_config.json and
tokenizer_config.json fields (chat template, model_max_length, ...), and a README.md model card recording the
base model, a GGUF source's quantization, the base's terms of use and the caller's notes (training data).

`add_device_args`, `resolve_device` and `resolve_dtype` give every script the same --device and --dtype.
"""

import argparse
import os
import re
import time
from pathlib import Path

import torch

import lora
from checkpoint import (DEFAULT_MODEL, cache_dir, gguf_quantization, load_json_object, read_config, read_gguf,
                        read_hf_weights, resolve_checkpoint, write_hf_weights)
from model import DTYPES, Transformer
from report import check_flags, check_outputs, exit_on_error, write_json, write_text
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# --device and --dtype, the same in every script


def add_device_args(parser, fp32_because=None):
    """Add --device and --dtype to an argparse parser; pass the parsed values through resolve_dtype, which
    refuses a device this machine does not have. fp32_because: --dtype defaults to fp32 on every device, for
    this reason (a measuring instrument calibrated in fp32)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--dtype", default="fp32" if fp32_because else None, choices=["fp32", "bf16", "fp16"],
                        help=f"the dtype the model computes in (default: fp32: {fp32_because})" if fp32_because else
                        "the dtype the model computes in (default: bf16 on CUDA, fp32 elsewhere); use fp32 on CPU: "
                        "bf16 matmuls are far slower on most CPUs")


def resolve_device(device):
    """`device` itself if this machine has it, else a ValueError naming --device: torch would otherwise fail
    with a traceback at the first tensor moved there (or, for an unknown name, at parsing)."""
    try:
        kind, index = torch.device(device).type, torch.device(device).index
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: not a device; use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}, "
                         f"built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'without CUDA'}); "
                         "use --device cpu")
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS (Apple GPU) is not available here; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: {kind} is not supported; use cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(device, dtype):
    """The dtype name ("fp32", "bf16", "fp16") a script runs in: `dtype` when given, else bf16 on CUDA and fp32
    anywhere else. A name, not a torch.dtype, so it can be recorded in run settings; DTYPES[name] converts.
    Refuses a --device this machine lacks (resolve_device), so every script checks it before loading anything."""
    resolve_device(device)
    if dtype is not None:
        return dtype
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


# -----------------------------------------------------------------------------
# Per-process caches: the pipeline loads the same base model once per stage

_GGUF_READS = {}


def _read_gguf_cached(path, dtype):
    """(hf_config, tensors, tokenizer fields, quantization name): read_gguf and gguf_quantization, remembered per
    process: dequantizing a GGUF file costs seconds, and the pipeline loads the same base model once per stage.
    Keyed by path, size, mtime and dtype, so a changed file is read again."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, dtype)
    if key not in _GGUF_READS:
        _GGUF_READS.clear()  # one model at a time: a second dequantized copy would double the memory held
        _GGUF_READS[key] = (*read_gguf(path, dtype=dtype), gguf_quantization(path))
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
    (lora.py) gives its base model with the adapters merged in. The model remembers where it came from
    (name_or_path, source, provenance), which save_model writes into the checkpoint's files and model card."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if lora.is_adapter_dir(name_or_path):
        return load_adapter_model(name_or_path, device=device, dtype=dtype)
    flush_denormals_on_cpu(device)
    path = Path(resolve_checkpoint(name_or_path))
    if path.suffix == ".gguf":
        hf_config, tensors, tok_fields, quantization = _read_gguf_cached(path, dtype)
        # Clones: the model takes ownership of its tensors (assign=True) and training updates them in place.
        tensors = {name: t.to(device, copy=True) for name, t in tensors.items()}
        tokenizer = _gguf_tokenizer(tok_fields)
        provenance = [f"Weights dequantized from the GGUF file {path.name} ({quantization}) to "
                      f"{str(dtype).removeprefix('torch.')}: the quantized weights, not the original release's "
                      "(bf16) ones"]
        generation, card = None, {}
    else:
        hf_config = read_config(path)
        tensors = read_hf_weights(path, device=device, dtype=dtype)
        tokenizer = Tokenizer.from_dir(path)
        provenance, card = read_provenance(path), read_card_metadata(path)
        generation = load_json_object(path / "generation_config.json") if \
            (path / "generation_config.json").is_file() else None
    model = Transformer.from_hf(hf_config, tensors, source=str(path),
                                config_source=str(path if path.suffix == ".gguf" else path / "config.json"))
    model.name_or_path, model.source, model.provenance = str(name_or_path), path, provenance
    model.card = {"base_model": card.get("base_model") or hub_id(name_or_path), "licenses": card.get("licenses", []),
                  "datasets": card.get("datasets", []), "tags": card.get("tags", [])}
    model.generation_config = generation  # held, not re-read: a run may replace its source directory (RUN/last)
    return model.eval(), tokenizer


def adapter_base(adapter_dir, base=None):
    """The base model of an adapter directory (`base` when given), after following base models that are adapter
    directories themselves (stacked LoRA runs) to the model at the bottom: a directory naming itself, or a
    cycle of them, names no model and would recurse forever."""
    config_file = lora.adapter_files(adapter_dir)[0]
    first = base or lora.read_adapter_config(adapter_dir)["base_model"]
    seen, name = {Path(adapter_dir).resolve()}, first
    while name and lora.is_adapter_dir(name):
        if Path(name).resolve() in seen:
            raise ValueError(f"{config_file}: base model {name!r} is an adapter directory already on the way from "
                             f"{adapter_dir} (a cycle); point base_model at the model the adapters were trained on")
        seen.add(Path(name).resolve())
        config_file = lora.adapter_files(name)[0]
        name = lora.read_adapter_config(name)["base_model"]
    if not name:
        raise ValueError(f"{config_file}: names no base model; pass it explicitly")
    return first


def load_adapter_model(adapter_dir, device="cpu", dtype=torch.float32, base=None, merged=True):
    """(model, tokenizer): the base model named in adapter_dir (or `base`) with the adapters added, merged into
    the weights unless merged=False (then they stay separate and trainable)."""
    base = adapter_base(adapter_dir, base)
    try:
        model, tokenizer = load_model(base, device=device, dtype=dtype)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{lora.adapter_files(adapter_dir)[0]}: base model {base!r} not found ({e}); "
                                "pass the base model's path explicitly") from None
    lora.load_adapters(model, adapter_dir)
    # The adapters' card says what they were trained on, under which license: the merged model keeps that.
    trained = read_card_metadata(adapter_dir)
    model.card = {**model.card, **{key: list(dict.fromkeys(model.card[key] + trained.get(key, [])))
                                   for key in ("licenses", "datasets", "tags")}}
    model.provenance = list(dict.fromkeys([*model.provenance, *(line for line in read_provenance(adapter_dir)
                                                                 if not line.startswith("Base model:"))]))
    if merged:  # an ordinary checkpoint, trainable like any other load_model result
        lora.merge(model).requires_grad_(True)
        model.provenance = [*model.provenance, f"LoRA adapters {shown(adapter_dir)} merged into the weights"]
    return model, tokenizer


def save_model(model, tokenizer, out_dir, max_shard_bytes=None, **card):
    """Write an HF-format directory (config.json, safetensors weights, tokenizer, the source's
    generation_config.json, a README.md model card with `card`'s notes, datasets and tags added) that both
    `load_model` and transformers' `AutoModelForCausalLM.from_pretrained` read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.hf_state_dict().items()}
    write_hf_weights(out_dir, tensors, max_shard_bytes=max_shard_bytes)
    for name in (lora.CONFIG_NAME, lora.WEIGHTS_NAME, lora.OWN_CONFIG_NAME, lora.OWN_WEIGHTS_NAME):
        (out_dir / name).unlink(missing_ok=True)  # adapters left in the folder would load instead of these weights
    dtype = next(model.parameters()).dtype
    hf = {**model.config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch."),
          "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    write_json(out_dir / "config.json", hf)
    tokenizer.save(out_dir)
    if getattr(model, "generation_config", None) is not None:
        # sampling defaults and stop tokens of instruction models live here, not in config.json
        write_json(out_dir / "generation_config.json", model.generation_config)
    write_model_card(model, out_dir, **card)


# -----------------------------------------------------------------------------
# Model cards: README.md in every checkpoint saved, recording what the weights came from

PROVENANCE_HEADING = "## Provenance"
GEMMA_TERMS = ("Gemma is provided under and subject to the Gemma Terms of Use found at "
               "https://ai.google.dev/gemma/terms. This checkpoint is a Model Derivative of Gemma: its use must "
               "follow those terms, including the Gemma Prohibited Use Policy (https://ai.google.dev/gemma/"
               "prohibited_use_policy).")
# The hub repository of the release the embedded base model was quantized from, for the card's base_model.
HUB_IDS = {DEFAULT_MODEL: "google/gemma-3-270m"}
# What the hub's `license` field holds for a card naming several licenses (the hub takes one id or "other").
LICENSE_JOIN = "-and-"


def hub_id(name_or_path):
    """The hub id a card's base_model names: the embedded model's release, a hub id as given, else None (a local
    path is no id)."""
    name = str(name_or_path)
    if name in HUB_IDS:
        return HUB_IDS[name]
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists() else None


def shown(path):
    """A path as a model card prints it: relative to the working folder when inside it, else its last two parts;
    never a machine's absolute path (a card travels with the weights)."""
    path = str(path)
    if not os.path.isabs(path):
        return path
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else os.path.join(*Path(path).parts[-2:])


def read_provenance(model_dir):
    """The provenance lines of a checkpoint that save_model wrote (its README.md), so they carry over to the
    checkpoints saved from it; [] for any other directory."""
    card = Path(model_dir) / "README.md"
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    if PROVENANCE_HEADING not in text:
        return []
    section = text.split(PROVENANCE_HEADING, 1)[1].split("\n## ", 1)[0]
    return [line[2:].strip() for line in section.splitlines() if line.startswith("- ")]


def read_card_metadata(model_dir):
    """{base_model, licenses, datasets, tags} from the YAML block that write_model_card puts at the top of
    README.md; {} when there is none. Only the flat keys and lists that block holds are read."""
    card = Path(model_dir) / "README.md"
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    if not text.startswith("---\n") or "\n---\n" not in text[3:]:
        return {}
    fields, key = {}, None
    for line in text[4:text.index("\n---\n", 3)].splitlines():
        if line.startswith("- ") and key:
            fields.setdefault(key, []).append(line[2:].strip())
        elif ":" in line:
            key, value = (part.strip() for part in line.split(":", 1))
            if value:
                fields[key] = value
    named = fields.get("license_name") if fields.get("license") == "other" else fields.get("license")
    return {"base_model": fields.get("base_model"), "licenses": named.split(LICENSE_JOIN) if named else [],
            "datasets": fields.get("datasets", []), "tags": fields.get("tags", [])}


def card_metadata(model, datasets, tags):
    """The YAML block model hubs read (license, base_model, datasets, tags): the base model's license and that of
    every dataset the weights were trained on, those of the source checkpoint carried over."""
    card = getattr(model, "card", {})
    family = model.config.family
    licenses = list(dict.fromkeys([*card.get("licenses", []), *(["gemma"] if family.startswith("gemma") else []),
                                   *datasets.values()]))
    lines = ["---", *([f"license: {licenses[0]}"] if len(licenses) == 1 else
                      ["license: other", f"license_name: {LICENSE_JOIN.join(licenses)}"] if licenses else [])]
    if "gemma" in licenses:
        lines.append("license_link: https://ai.google.dev/gemma/terms")
    if card.get("base_model"):
        lines.append(f"base_model: {card['base_model']}")
    for key, values in (("datasets", [*card.get("datasets", []), *datasets]),
                        ("tags", [*card.get("tags", []), family, *(["lora"] if lora.lora_layers(model) else []),
                                  *tags])):
        if values:
            lines += [f"{key}:", *(f"- {value}" for value in dict.fromkeys(values))]
    return lines + ["---"]


def write_model_card(model, out_dir, notes=(), datasets=None, tags=()):
    """README.md: the metadata block hubs read (card_metadata), the base model, what happened to its weights
    (lines carried over from the source's card, then the caller's `notes`, e.g. the training data and its
    license), and the base model's terms of use. datasets: {dataset id: license id} the weights were trained
    on; tags: hub tags to add."""
    base = getattr(model, "name_or_path", None) or "unknown (not loaded through loading.load_model)"
    lines = dict.fromkeys([f"Base model: {shown(base)}", *getattr(model, "provenance", []), *notes])  # ordered, unique
    bullets = ["- " + re.sub(r"\s+", " ", line) for line in lines]  # one line each, so read_provenance reads them
    family = model.config.family
    if lora.lora_layers(model):
        what = (f"LoRA adapters (rank {model.lora_config['rank']}) for a {family} model; loading.load_model "
                "reads them merged into the base model" + ("" if model.config.fused_qkv else
                                                           ", peft's PeftModel.from_pretrained as they are"))
    else:
        what = (f"A {family} checkpoint ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters); "
                "transformers' AutoModelForCausalLM and loading.load_model read it")
    terms = GEMMA_TERMS if family.startswith("gemma") else "The base model's license and terms of use apply."
    write_text(Path(out_dir) / "README.md", "\n".join([
        *card_metadata(model, datasets or {}, tags), "", "# Model card", "",
        f"{what}. Written by this repository's loading.py.", "",
        PROVENANCE_HEADING, "", *bullets, "", "## Terms of use", "", terms, ""]))


# -----------------------------------------------------------------------------
# CLI: inspect a checkpoint, convert it, export adapters


def model_inputs(model, base=None):
    """(what, path) of every folder or file a model name reads, for report.check_outputs: the model, an adapter
    directory's base models down to the bottom one, and --base."""
    inputs = [("the model", model), ("--base", base)]
    while model and lora.is_adapter_dir(model):  # adapter_base refuses a cycle, so this ends
        model, base = base or adapter_base(model), None
        inputs.append(("the adapters' base model", model))
    return inputs


def info(args):
    """Print the architecture and parameter count, then time one forward pass of random tokens."""
    check_flags(args, {"batch": 1, "seq": 1})
    dtype = resolve_dtype(args.device, args.dtype)
    t0 = time.perf_counter()
    model, _ = load_model(args.model, device=args.device, dtype=dtype)
    load_s = time.perf_counter() - t0
    cfg = model.config
    if args.seq > cfg.max_seq_len:
        raise ValueError(f"--seq {args.seq} is longer than the context of {args.model} ({cfg.max_seq_len} tokens)")
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
    check_outputs([], model_inputs(args.model, args.base), folders=[("--out", args.out)])
    if lora.is_adapter_dir(args.model):
        model, tokenizer = load_adapter_model(args.model, device=args.device, dtype=dtype, base=args.base)
    else:
        model, tokenizer = load_model(args.model, device=args.device, dtype=dtype)
    save_model(model, tokenizer, args.out)
    print(f"wrote {args.model} ({dtype}) as an HF checkpoint to {args.out}")


def peft(args):
    """Rewrite an adapter directory of ours in PEFT's LoRA format."""
    check_outputs([], model_inputs(args.adapters, args.base), folders=[("--out", args.out)])
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
    inf.set_defaults(run=info)
    cv = sub.add_parser("convert", help="write a GGUF file, HF dir, hub id or LoRA adapter dir (merged into its "
                        "base) as one HF-format checkpoint, which load_model and transformers read")
    cv.add_argument("model", help="what load_model reads: HF dir, .gguf file, hub id, adapter dir, or "
                    f"{DEFAULT_MODEL}")
    cv.add_argument("--out", required=True, help="output HF directory")
    cv.add_argument("--base", default=None, help="for an adapter dir: the base model, if not where "
                    "adapter_config.json says")
    add_device_args(cv)
    cv.set_defaults(run=convert)
    ex = sub.add_parser("peft", help="write LoRA adapters in PEFT's format (Llama, Gemma 3, Cohere families)")
    ex.add_argument("adapters", help="adapter directory (train_dpo.py --lora-rank N writes RUN/best, RUN/last)")
    ex.add_argument("--out", required=True, help="output directory (adapter_config.json, adapter_model.safetensors)")
    ex.add_argument("--base", default=None, help="base model, if not where adapter_config.json says")
    ex.set_defaults(run=peft)
    args = p.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    exit_on_error(main)
