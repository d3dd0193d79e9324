"""
LoRA (Hu et al. 2021), by hand: a frozen linear layer W plus a trainable low-rank update,

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A [r, in], B [out, r], B = 0 at the start

so training starts from the base model exactly and only r * (in + out) numbers per layer learn. The paper
detoxifies its 7-8B models (BLOOM-7.1B, Llama 2/3, Aya-23-8B) this way, as QLoRA with rank 64, alpha 16,
dropout 0.05 on every linear layer, and finds LoRA transfers across languages less than full fine-tuning
(its Appendix D). QLoRA's 4-bit base needs bitsandbytes; here the frozen base is kept in bf16/fp16 instead
(train_dpo.py --lora-rank 64 --dtype bf16), with the adapters in fp32.

    python train_dpo.py --lora-rank 64 --out runs/lora       # adapters alone in runs/lora/best, last
    python lora.py info runs/lora/best                        # what an adapter directory holds
    python loading.py convert runs/lora/best --out runs/merged  # base + adapters -> one HF checkpoint
    python loading.py peft old_run/best --out runs/peft         # an older adapter dir in PEFT's format

An adapter directory (`save_adapters`) is in PEFT's LoRA format, adapter_config.json and
adapter_model.safetensors, so peft's PeftModel.from_pretrained reads it as it is. The families whose
checkpoints fuse q, k and v into one layer (GPT-2, BLOOM) cannot be written that way (see save_peft_adapters):
theirs is lora_config.json (rank, alpha, dropout, targets, the base model's name) and lora_model.safetensors
(this repo's parameter names: blocks.{i}.attn.q.lora_A, ...), names peft does not claim. Directories of
either kind, older ones with this repo's schema under PEFT's file names, and those peft's save_pretrained wrote
(LoRA, including rsLoRA and adapters on GPT-2's and BLOOM's fused q/k/v layers) all load: `loading.load_model`
reads one as the base model with the adapters merged in, so generate.py, evaluate.py and probe.py take it like
any checkpoint.
"""

import argparse
import contextlib
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import check_finite, read_safetensors, write_safetensors
from model import qkv_split, check_tensors
from report import exit_on_error, write_json

# The linear layers of a block, by their attribute names in model.py. The paper says "all linear layers"; its
# official code also adapts the token embedding and LM head, which are never targets here (as in PEFT's
# "all-linear").
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"  # PEFT's
OWN_CONFIG_NAME, OWN_WEIGHTS_NAME = "lora_config.json", "lora_model.safetensors"  # fused-q/k/v families


class LoRAUpdate(torch.autograd.Function):
    """scale * dropout(x) @ A^T @ B^T in fp32, keeping for the backward pass only x itself (one tensor that the
    layers reading the same input, e.g. q, k and v, share), a one-byte dropout mask and the rank-r product.
    Written as nn.Dropout + two F.linear calls, autograd would keep a dropped copy of x per layer and, on the
    CPU, dropout's 4-byte noise tensor too: 8 bytes per input value per layer (bench/README.md has the memory
    this saves on gemma-3-270m)."""

    @staticmethod
    def forward(ctx, x, A, B, keep, keep_prob, scale):
        # x [..., in]; A [r, in], B [out, r] fp32; keep: bool mask like x, or None (no dropout)
        with torch.autocast(x.device.type, enabled=False):  # the adapters compute in fp32 under any autocast
            h = F.linear(LoRAUpdate.dropped(x, A.dtype, keep, keep_prob), A)  # [..., r]
            out = F.linear(h, B) * scale                                       # [..., out]
        ctx.save_for_backward(x, A, B, h, keep)
        ctx.keep_prob, ctx.scale = keep_prob, scale
        return out

    @staticmethod
    def dropped(x, dtype, keep, keep_prob):
        x = x.to(dtype)
        return x if keep is None else x * keep / keep_prob

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, h, keep = ctx.saved_tensors
        g = (grad_out.to(B.dtype) * ctx.scale).flatten(0, -2)  # [N, out]
        grad_h = g @ B                                          # [N, r]
        grad_B = g.T @ h.flatten(0, -2)                         # [out, r]
        grad_A = grad_h.T @ LoRAUpdate.dropped(x, A.dtype, keep, ctx.keep_prob).flatten(0, -2)  # [r, in]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ A).view(*x.shape[:-1], A.shape[1])
            grad_x = (grad_x if keep is None else grad_x * keep / ctx.keep_prob).to(x.dtype)
        return grad_x, grad_A, grad_B, None, None, None


class LoRALinear(nn.Linear):
    """An nn.Linear whose weight and bias are the frozen base layer's own parameters (so the base keeps its
    checkpoint names) plus fp32 adapters lora_A [r, in] and lora_B [out, r], and dropout on the update's input."""

    def __init__(self, base, rank, alpha, dropout):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weights exist already
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as in the LoRA paper's code
        self.scale, self.dropout = alpha / rank, dropout
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        keep = None
        if self.training and self.dropout > 0:
            keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - self.dropout)
        # In fp32: the update is small next to x W^T, and bf16 would round much of it away.
        return y + LoRAUpdate.apply(x, self.lora_A, self.lora_B, keep, 1 - self.dropout, self.scale).to(y.dtype)

    def delta(self):
        """The update as a weight: scale * B @ A, [out, in], fp32."""
        return self.scale * (self.lora_B @ self.lora_A)


def lora_layers(model):
    """{module name: LoRALinear} of a model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def parse_targets(targets):
    """'q,v' or ['q', 'v'] -> ('q', 'v'), refusing names that are not linear layers of a block."""
    names = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"--lora-targets: unknown layer(s) {unknown or '(none given)'}; choose from "
                         f"{','.join(TARGETS)}")
    return names


def add_lora(model, rank, alpha=16.0, dropout=0.05, targets=TARGETS):
    """Freeze every parameter of `model` and wrap the target linear layers of each block in LoRALinear, in place.
    Returns the model; model.lora_config records the settings (what save_adapters writes)."""
    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {rank}")
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters")
    targets = parse_targets(targets)
    model.requires_grad_(False)
    for block in model.blocks:
        for part in (block.attn, block.mlp):
            for name in targets:
                layer = getattr(part, name, None)
                if layer is not None:  # e.g. no `gate` in an ungated MLP
                    setattr(part, name, LoRALinear(layer, rank, alpha, dropout).train(model.training))
    model.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets)}
    return model


def adapter_state_dict(model):
    """{name: tensor} of the adapter parameters alone, e.g. 'blocks.0.attn.q.lora_A'."""
    return {name: p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


@contextlib.contextmanager
def disabled(model):
    """Run the base model: inside the with-block every adapter is off. This is DPO's reference model when
    training LoRA, at no extra memory. A no-op for a model without adapters."""
    layers = lora_layers(model).values()
    states = [layer.enabled for layer in layers]
    try:
        for layer in layers:
            layer.enabled = False
        yield model
    finally:
        for layer, state in zip(layers, states):
            layer.enabled = state


@torch.no_grad()
def merge(model):
    """Fold every adapter into its base weight, W <- W + scale * B @ A (in fp32, then the weight's dtype), and
    put plain nn.Linear layers back, in place: the model is then an ordinary checkpoint with the same outputs."""
    for name, layer in lora_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        merged = (layer.weight.float() + layer.delta()).to(layer.weight.dtype)
        plain.weight = nn.Parameter(merged, requires_grad=False)
        plain.bias = layer.bias
        setattr(model.get_submodule(parent_name), attr, plain)
    model.__dict__.pop("lora_config", None)
    return model


# -----------------------------------------------------------------------------
# Adapter directories


def write_adapter_dir(out_dir, config, tensors, names=(CONFIG_NAME, WEIGHTS_NAME)):
    """The config and weights files of an adapter directory, each written atomically."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / names[0], config)
    write_safetensors(Path(out_dir) / names[1], tensors, metadata={"format": "pt"})


def base_name(base_model):
    """The base model as the adapter config names it: an absolute path for a local one, else the name given."""
    base = Path(base_model)
    return str(base.resolve()) if base.exists() else str(base_model)


def save_adapters(model, out_dir, base_model):
    """Write the adapters alone (a few MB instead of the whole model) and what is needed to rebuild the model:
    the base model (as given to load_model) and the LoRA settings. In PEFT's format where the family allows,
    else in this repo's under lora_*.json/.safetensors (see the module docstring)."""
    if not model.config.fused_qkv:
        return save_peft_adapters(model, out_dir, base_model)
    adapters = adapter_state_dict(model)
    write_adapter_dir(out_dir, {"base_model": base_name(base_model), **model.lora_config,
                                "parameters": sum(p.numel() for p in adapters.values())}, adapters,
                      names=(OWN_CONFIG_NAME, OWN_WEIGHTS_NAME))


def adapter_files(path):
    """(config, weights) paths of an adapter directory: PEFT's names when its config is there, else ours."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path / CONFIG_NAME, path / WEIGHTS_NAME
    return path / OWN_CONFIG_NAME, path / OWN_WEIGHTS_NAME


def read_adapter_config(path):
    """The config of an adapter directory, ours or PEFT's, checked field by field."""
    path = adapter_files(path)[0]
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable adapter config ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    if "peft_type" in cfg:
        return _from_peft_config(cfg, path)
    for field, kind in (("base_model", str), ("rank", int), ("alpha", (int, float)), ("dropout", (int, float)),
                        ("targets", list), ("parameters", int)):
        if not isinstance(cfg.get(field), kind):
            raise ValueError(f"{path}: field {field!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    return cfg


def _from_peft_config(cfg, path):
    """A PEFT LoRA config in our terms; the targets come from the tensor names (see peft_tensors). Refuses the
    PEFT options that change what the adapters compute."""
    if cfg["peft_type"] != "LORA":
        raise ValueError(f"{path}: peft_type {cfg['peft_type']!r} is not LORA")
    for field, plain in (("use_dora", False), ("bias", "none"), ("rank_pattern", {}), ("alpha_pattern", {}),
                         ("layers_to_transform", None), ("modules_to_save", None), ("lora_bias", False)):
        if cfg.get(field, plain) not in (plain, None):
            raise ValueError(f"{path}: field {field!r} = {cfg[field]!r} is unsupported (needs {plain!r})")
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)):
            raise ValueError(f"{path}: field {field!r} is missing or not a number")
    # rsLoRA scales by alpha / sqrt(r); ours by alpha / r: the same scale with alpha * sqrt(r)
    alpha = cfg["lora_alpha"] * (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else 1)
    if not isinstance(cfg.get("base_model_name_or_path") or "", str):
        raise ValueError(f"{path}: field 'base_model_name_or_path' is not a string")
    return {"base_model": cfg.get("base_model_name_or_path") or "", "rank": cfg["r"], "alpha": alpha,
            "dropout": cfg.get("lora_dropout", 0.0), "targets": None, "format": "peft"}


def hf_modules(cfg):
    """{HF module name: [our module names]} of the linear layers LoRA can target: one each, except a fused q/k/v
    projection (GPT-2's c_attn, BLOOM's query_key_value), which is our q, k and v."""
    modules = {theirs.removesuffix(".weight"): [ours.removesuffix(".weight")] for ours, theirs in cfg.hf_names()
               if ours.startswith("blocks.") and ours.split(".")[-2] in TARGETS and ours.endswith(".weight")}
    if cfg.fused_qkv:
        modules.update({cfg.fused_qkv.format(i=i): [f"blocks.{i}.attn.{x}" for x in "qkv"]
                        for i in range(cfg.n_layers)})
    return modules


def peft_tensors(model, tensors, source):
    """PEFT's adapter tensors ('base_model.model.<HF module>.lora_A.weight') under our names, and the targets
    they cover. A fused q/k/v projection has one adapter, B @ A with B [3 * out, r]: q, k and v each get A and
    their rows of B, which computes the same update."""
    cfg = model.config
    modules = hf_modules(cfg)
    out = {}
    for key, t in tensors.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if match is None or match[1] not in modules:
            raise ValueError(f"{source}: tensor {key} is not a LoRA weight of a linear layer of this "
                             f"{cfg.family} model's blocks")
        ours = modules[match[1]]
        parts = [t] * len(ours) if match[2] == "A" or len(ours) == 1 else [qkv_split(cfg, t, x) for x in "qkv"]
        out.update({f"{name}.lora_{match[2]}": part.contiguous() for name, part in zip(ours, parts)})
    targets = [t for t in TARGETS if any(name.split(".")[-2] == t for name in out)]
    return out, targets


def save_peft_adapters(model, out_dir, base_model):
    """Write the adapters in PEFT's LoRA format (peft's PeftModel.from_pretrained, vLLM, ... read it). Families
    whose checkpoints fuse q, k and v are refused: PEFT has one adapter of a single rank on the fused layer,
    while ours has one per projection."""
    cfg = model.config
    if cfg.fused_qkv:
        raise ValueError(f"{cfg.family}: PEFT puts one adapter on the fused q/k/v layer; ours has one per "
                         "projection, which PEFT's format cannot hold at a single rank (use loading.py convert)")
    theirs = {ours[0]: hf for hf, ours in hf_modules(cfg).items()}
    tensors = {f"base_model.model.{theirs[name.rsplit('.', 1)[0]]}.{name.rsplit('.', 1)[1]}.weight": p
               for name, p in adapter_state_dict(model).items()}
    c = model.lora_config
    write_adapter_dir(out_dir, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name(base_model),
        "r": c["rank"], "lora_alpha": c["alpha"], "lora_dropout": c["dropout"], "bias": "none",
        "target_modules": sorted({theirs[name].rsplit(".", 1)[1] for name in lora_layers(model)}),
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True}, tensors)


def is_adapter_dir(path):
    return adapter_files(path)[0].is_file()


def load_adapters(model, adapter_dir):
    """Add the adapters of `adapter_dir` (ours, or PEFT's LoRA format) to a base model (unmerged, trainable),
    checking every tensor's name and shape against the model. Returns the model."""
    cfg = read_adapter_config(adapter_dir)
    path = adapter_files(adapter_dir)[1]
    device = next(model.parameters()).device
    tensors = {name: check_finite(path, name, t)
               for name, t in read_safetensors(path, device=device, dtype=torch.float32).items()}
    targets = cfg["targets"]
    if cfg.get("format") == "peft":
        tensors, targets = peft_tensors(model, tensors, path)
    add_lora(model, cfg["rank"], cfg["alpha"], cfg["dropout"], targets)
    expected = {name: p.shape for name, p in adapter_state_dict(model).items()}
    check_tensors(expected, tensors, f"{path} (on base model {getattr(model, 'name_or_path', cfg['base_model'])})")
    model.load_state_dict(tensors, strict=False)  # the adapters add_lora made are trainable; the base is frozen
    return model


# -----------------------------------------------------------------------------
# CLI


def info(args):
    cfg = read_adapter_config(args.adapters)
    n = sum(t.numel() for t in read_safetensors(adapter_files(args.adapters)[1]).values())
    targets = ",".join(cfg["targets"]) if cfg["targets"] else "as the tensors name them"
    print(f"{args.adapters}: {'PEFT ' if cfg.get('format') == 'peft' else ''}LoRA rank {cfg['rank']}, alpha "
          f"{cfg['alpha']:g} (scale {cfg['alpha'] / cfg['rank']:g}), dropout {cfg['dropout']}, targets {targets}; "
          f"{n / 1e6:.2f}M adapter parameters; base model {cfg['base_model'] or '(not named)'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    inf = sub.add_parser("info", help="print an adapter directory's settings and parameter count")
    inf.add_argument("adapters", help="adapter directory (train_dpo.py --lora-rank N writes RUN/best, RUN/last)")
    inf.set_defaults(run=info)
    args = p.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    exit_on_error(main)
