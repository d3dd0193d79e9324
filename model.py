"""
One readable decoder-only transformer that loads five families of real checkpoints:

    GPT-2   (mGPT-1.3B)                learned positions, LayerNorm, GELU MLP, fused Conv1D QKV
    BLOOM   (bloom-560m .. 7b1)        ALiBi biases, embedding LayerNorm, fused per-head QKV
    Llama   (Llama 2/3)                RoPE (+ Llama-3 scaling), RMSNorm, SwiGLU, grouped-query attention
    Gemma 3 (gemma-3-270m, default)    RMSNorm (1 + w), GeGLU, QK-norm, sandwich norms, sliding-window layers
    Cohere  (Aya-23)                   parallel attention + MLP, bias-free LayerNorm, interleaved RoPE

The families differ in a handful of switches (which norm, which positions, which MLP, serial or parallel
block), so they share one module tree; each has a config dataclass that reads and writes its Hugging Face
`config.json` and knows its tensor names. Checkpoint bytes are read by checkpoint.py (safetensors, .bin,
GGUF), tokenizers by tokenizer.py, and loading.py's `load_model` ties them together; this module knows
only the architectures.

Hook points follow TransformerLens: identity modules named by their place in the tree
(`blocks.3.mlp.hook_post`) that cost nothing until a hook is attached with `model.hooks(...)`.
"""

import contextlib
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


# -----------------------------------------------------------------------------
# Configs: one dataclass per family, each mapping to and from its HF config.json


@dataclass
class ModelConfig:
    """Fields every family has. Subclasses fix the architecture switches as class attributes."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    norm_eps: float
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, kept so saving loses nothing

    family = ""          # HF model_type
    norm = "layernorm"   # layernorm | rmsnorm
    norm_offset = 0.0    # RMSNorm scales by (offset + w); Gemma stores w around 0 and uses 1 + w
    norm_bias = True
    positions = "rope"   # learned | alibi | rope
    mlp_gated = True     # gate/up/down (SwiGLU, GeGLU) vs up/down
    activation = "silu"
    parallel_block = False
    sandwich_norm = False  # Gemma normalises each sublayer's output before the residual add
    qk_norm = False
    attn_bias = False
    mlp_bias = False
    rope_interleaved = False  # RoPE pairs channel i with i + hd/2 ("rotate half"); Cohere pairs 2i with 2i+1
    embed_norm = False        # BLOOM normalises the token embeddings before the first block
    embed_scale = False       # Gemma multiplies the token embeddings by sqrt(d_model)

    def attn_scale(self):
        return self.head_dim ** -0.5

    def logit_scale(self):
        """The factor on the LM head's logits (Cohere's are scaled down; the others are not)."""
        return 1.0

    def rope(self, layer_type=None, default_theta=10000.0):
        """(theta, scaling or None), from hub-style `rope_theta`/`rope_scaling` or from the
        `rope_parameters` block transformers 5 writes (nested by layer type for Gemma 3)."""
        params = self.hf.get("rope_parameters")
        if params:
            params = params.get(layer_type, params) if layer_type else params
            scaling = None if params.get("rope_type", "default") == "default" else params
            return params.get("rope_theta", default_theta), scaling
        return self.hf.get("rope_theta", default_theta), self.hf.get("rope_scaling")

    def rope_theta(self, layer):
        return self.rope()[0]

    def rope_scaling(self, layer):
        return self.rope()[1]

    def sliding_window(self, layer):
        return None

    def to_hf(self):
        """The config.json that transformers needs to rebuild this model."""
        return {**self.hf, "model_type": self.family, "vocab_size": self.vocab_size,
                "tie_word_embeddings": self.tie_embeddings}

    def hf_names(self):
        """(our_name, hf_name) for every tensor that is a plain rename; fused/transposed ones are listed
        by the family's `fused_qkv` and `transposed` attributes."""
        raise NotImplementedError


@dataclass
class GPT2Config(ModelConfig):
    family = "gpt2"
    positions = "learned"
    mlp_gated = False
    activation = "gelu_tanh"  # HF "gelu_new"
    attn_bias = True
    mlp_bias = True
    fused_qkv = "transformer.h.{i}.attn.c_attn"
    qkv_layout = "qkv"  # [3, heads, head_dim] along the output dim
    # GPT-2 stores its linear layers as Conv1D, weight [in, out]: transposed w.r.t. nn.Linear.
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_hf(cls, hf):
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ValueError(f"gpt2 config sets {flag}=true, which this implementation does not support")
        act = hf.get("activation_function", "gelu_new")
        d = hf["n_embd"]
        cfg = cls(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                  n_kv_heads=hf["n_head"], head_dim=d // hf["n_head"], d_mlp=hf.get("n_inner") or 4 * d,
                  norm_eps=hf.get("layer_norm_epsilon", 1e-5), max_seq_len=hf.get("n_positions", 1024),
                  tie_embeddings=hf.get("tie_word_embeddings", True), hf=hf)
        cfg.activation = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                          "relu": "relu"}[act]
        return cfg

    def to_hf(self):
        return {**super().to_hf(), "architectures": ["GPT2LMHeadModel"], "n_embd": self.d_model,
                "n_layer": self.n_layers, "n_head": self.n_heads, "n_inner": self.d_mlp,
                "n_positions": self.max_seq_len, "layer_norm_epsilon": self.norm_eps}

    def hf_names(self):
        names = [("embed.weight", "transformer.wte.weight"), ("pos_embed.weight", "transformer.wpe.weight"),
                 ("final_norm.weight", "transformer.ln_f.weight"), ("final_norm.bias", "transformer.ln_f.bias")]
        for i in range(self.n_layers):
            h = f"transformer.h.{i}."
            for ours, theirs in [("attn_norm", "ln_1"), ("mlp_norm", "ln_2"), ("attn.o", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")]:
                names += [(f"blocks.{i}.{ours}.{p}", f"{h}{theirs}.{p}") for p in ("weight", "bias")]
        return names + ([] if self.tie_embeddings else [("lm_head.weight", "lm_head.weight")])


@dataclass
class BloomConfig(ModelConfig):
    family = "bloom"
    positions = "alibi"
    embed_norm = True
    mlp_gated = False
    activation = "gelu_tanh"
    attn_bias = True
    mlp_bias = True
    fused_qkv = "transformer.h.{i}.self_attention.query_key_value"
    qkv_layout = "per_head"  # [heads, 3, head_dim]: BLOOM interleaves q, k, v head by head
    transposed = ()

    @classmethod
    def from_hf(cls, hf):
        if hf.get("apply_residual_connection_post_layernorm"):
            raise ValueError("bloom config sets apply_residual_connection_post_layernorm=true, which is unsupported")
        d = hf.get("hidden_size", hf.get("n_embed"))
        n_heads = hf.get("n_head", hf.get("num_attention_heads"))
        return cls(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf.get("n_layer", hf.get("num_hidden_layers")),
                   n_heads=n_heads, n_kv_heads=n_heads, head_dim=d // n_heads, d_mlp=4 * d,
                   norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
                   hf=hf)

    def to_hf(self):
        return {**super().to_hf(), "architectures": ["BloomForCausalLM"], "hidden_size": self.d_model,
                "n_layer": self.n_layers, "n_head": self.n_heads, "layer_norm_epsilon": self.norm_eps}

    def hf_names(self):
        names = [("embed.weight", "transformer.word_embeddings.weight")]
        names += [(f"{o}.{p}", f"transformer.{t}.{p}") for o, t in
                  [("embed_norm", "word_embeddings_layernorm"), ("final_norm", "ln_f")] for p in ("weight", "bias")]
        for i in range(self.n_layers):
            h = f"transformer.h.{i}."
            for ours, theirs in [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"),
                                 ("attn.o", "self_attention.dense"), ("mlp.up", "mlp.dense_h_to_4h"),
                                 ("mlp.down", "mlp.dense_4h_to_h")]:
                names += [(f"blocks.{i}.{ours}.{p}", f"{h}{theirs}.{p}") for p in ("weight", "bias")]
        return names + ([] if self.tie_embeddings else [("lm_head.weight", "lm_head.weight")])


def _rope_family_names(cfg, layer_norms):
    """Tensor names shared by the Llama-style families (Llama, Gemma 3, Cohere)."""
    names = [("embed.weight", "model.embed_tokens.weight"), ("final_norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.n_layers):
        h = f"model.layers.{i}."
        pairs = [(f"attn.{x}", f"self_attn.{x}_proj") for x in "qkvo"]
        pairs += [(f"mlp.{x}", f"mlp.{x}_proj") for x in ("gate", "up", "down")] + layer_norms
        if cfg.qk_norm:
            pairs += [("attn.q_norm", "self_attn.q_norm"), ("attn.k_norm", "self_attn.k_norm")]
        for ours, theirs in pairs:
            names.append((f"blocks.{i}.{ours}.weight", f"{h}{theirs}.weight"))
            has_bias = (cfg.attn_bias and ours.startswith("attn.") and "norm" not in ours) or \
                       (cfg.mlp_bias and ours.startswith("mlp."))
            if has_bias:
                names.append((f"blocks.{i}.{ours}.bias", f"{h}{theirs}.bias"))
    return names


def _gqa_dims(hf):
    n_heads = hf["num_attention_heads"]
    return dict(n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads)


@dataclass
class LlamaConfig(ModelConfig):
    family = "llama"
    norm = "rmsnorm"
    norm_bias = False
    fused_qkv = None
    transposed = ()

    @classmethod
    def from_hf(cls, hf):
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"llama config hidden_act={hf['hidden_act']!r} is unsupported (expected 'silu')")
        cfg = cls(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                  d_mlp=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                  max_seq_len=hf.get("max_position_embeddings", 2048),
                  tie_embeddings=hf.get("tie_word_embeddings", False), hf=hf, **_gqa_dims(hf))
        cfg.attn_bias, cfg.mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        return cfg

    def to_hf(self):
        return {**super().to_hf(), "architectures": ["LlamaForCausalLM"], "hidden_size": self.d_model,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.d_mlp, "rms_norm_eps": self.norm_eps, "hidden_act": "silu"}

    def hf_names(self):
        return _rope_family_names(self, [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")])


@dataclass
class Gemma3Config(ModelConfig):
    family = "gemma3_text"
    norm = "rmsnorm"
    norm_offset = 1.0
    norm_bias = False
    activation = "gelu_tanh"
    sandwich_norm = True
    qk_norm = True
    embed_scale = True
    fused_qkv = None
    transposed = ()

    @classmethod
    def from_hf(cls, hf):
        for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
            if hf.get(cap) is not None:
                raise ValueError(f"gemma3 config sets {cap}={hf[cap]}; Gemma 3 does not use soft-capping and "
                                 "neither does this implementation")
        return cls(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                   d_mlp=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                   max_seq_len=hf.get("max_position_embeddings", 32768),
                   tie_embeddings=hf.get("tie_word_embeddings", True), hf=hf, **_gqa_dims(hf))

    def layer_types(self):
        if "layer_types" in self.hf:
            return self.hf["layer_types"]
        pattern = self.hf.get("sliding_window_pattern", 6)  # older configs: every 6th layer is global
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(self.n_layers)]

    def attn_scale(self):
        return self.hf.get("query_pre_attn_scalar", self.head_dim) ** -0.5

    def _is_sliding(self, layer):
        return self.layer_types()[layer] == "sliding_attention"

    def rope_theta(self, layer):
        # Local (sliding) layers use a short-range RoPE base, global layers a long-range one.
        if self._is_sliding(layer):
            return self.hf.get("rope_local_base_freq") or self.rope("sliding_attention", 10000.0)[0]
        return self.rope("full_attention", 1_000_000.0)[0]

    def rope_scaling(self, layer):
        return None if self._is_sliding(layer) else self.rope("full_attention")[1]

    def sliding_window(self, layer):
        return self.hf.get("sliding_window") if self._is_sliding(layer) else None

    def to_hf(self):
        return {**super().to_hf(), "architectures": ["Gemma3ForCausalLM"], "hidden_size": self.d_model,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.d_mlp, "rms_norm_eps": self.norm_eps,
                "hidden_activation": "gelu_pytorch_tanh", "layer_types": self.layer_types()}

    def hf_names(self):
        return _rope_family_names(self, [
            ("attn_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
            ("mlp_norm", "pre_feedforward_layernorm"), ("post_mlp_norm", "post_feedforward_layernorm")])


@dataclass
class CohereConfig(ModelConfig):
    family = "cohere"
    norm_bias = False
    parallel_block = True
    rope_interleaved = True
    fused_qkv = None
    transposed = ()

    @classmethod
    def from_hf(cls, hf):
        if hf.get("use_qk_norm"):
            raise ValueError("cohere config sets use_qk_norm=true (Command R+), which is unsupported; "
                             "Aya-23 and Command R do not use it")
        cfg = cls(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                  d_mlp=hf["intermediate_size"], norm_eps=hf.get("layer_norm_eps", 1e-5),
                  max_seq_len=hf.get("max_position_embeddings", 8192),
                  tie_embeddings=hf.get("tie_word_embeddings", True), hf=hf, **_gqa_dims(hf))
        cfg.attn_bias = hf.get("attention_bias", False)
        return cfg

    def logit_scale(self):
        return self.hf.get("logit_scale", 0.0625)

    def to_hf(self):
        return {**super().to_hf(), "architectures": ["CohereForCausalLM"], "hidden_size": self.d_model,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "intermediate_size": self.d_mlp,
                "layer_norm_eps": self.norm_eps, "logit_scale": self.logit_scale()}

    def hf_names(self):
        return _rope_family_names(self, [("attn_norm", "input_layernorm")])


CONFIGS = {c.family: c for c in (GPT2Config, BloomConfig, LlamaConfig, Gemma3Config, CohereConfig)}
CONFIGS["gemma3"] = Gemma3Config  # multimodal Gemma 3 configs nest the text model under "text_config"


# The HF config fields that size the model (any family's spelling): a whole number >= 1 each, when present.
HF_SIZE_FIELDS = ("vocab_size", "hidden_size", "n_embd", "n_embed", "num_hidden_layers", "n_layer",
                  "num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "intermediate_size", "n_inner",
                  "max_position_embeddings", "n_positions", "sliding_window", "query_pre_attn_scalar")
HF_POSITIVE_FIELDS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "rope_theta", "logit_scale")


def check_hf_fields(hf, source):
    """Refuse a config.json whose sizes are not whole numbers (e.g. "num_hidden_layers": "2") or whose epsilons
    and RoPE base are not positive numbers, naming the field: otherwise the first use deep in the model fails
    with a TypeError."""
    for name in HF_SIZE_FIELDS:
        value = hf.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{source}: field {name!r} = {value!r} must be a whole number >= 1")
    for name in HF_POSITIVE_FIELDS:
        value = hf.get(name)
        if value is not None and (type(value) not in (int, float) or not value > 0 or not math.isfinite(value)):
            raise ValueError(f"{source}: field {name!r} = {value!r} must be a positive number")


def config_from_hf(hf, source="config.json"):
    model_type = hf.get("model_type")
    if model_type == "gemma3" and isinstance(hf.get("text_config"), dict):
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
    if model_type not in CONFIGS:
        raise ValueError(f"{source}: unknown model_type {model_type!r}; supported: {', '.join(sorted(CONFIGS))}")
    check_hf_fields(hf, source)
    try:
        cfg = CONFIGS[model_type].from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{source}: {model_type} config is missing field {e.args[0]!r}") from None
    if cfg.n_heads % cfg.n_kv_heads:  # grouped-query attention shares each k/v head among n_heads / n_kv_heads
        raise ValueError(f"{source}: {cfg.n_heads} attention heads are not a multiple of {cfg.n_kv_heads} "
                         "key/value heads")
    return cfg


# -----------------------------------------------------------------------------
# Hook points


class HookPoint(nn.Module):
    """Identity on the forward pass; a named place where `model.hooks` can read or replace an activation."""

    def forward(self, x):
        return x


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (offset + w), computed in fp32 (as HF does) and cast back."""

    def __init__(self, d, eps, offset=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d) if offset else torch.ones(d))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (self.offset + self.weight.float())).type_as(x)


def make_norm(cfg, d=None):
    d = d or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(d, cfg.norm_eps, cfg.norm_offset)
    return nn.LayerNorm(d, eps=cfg.norm_eps, bias=cfg.norm_bias)


ACTIVATIONS = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu, "relu": F.relu}


def rope_inv_freq(head_dim, theta, scaling, device):
    """Inverse frequencies theta^(-2i/d) of rotary embeddings, with the scalings real checkpoints use."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":  # positions divided by `factor`
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is unsupported (supported: default, linear, llama3)")


def apply_rope(x, cos, sin, interleaved):
    """Rotate pairs of channels of x [B, H, T, hd] by position-dependent angles.
    HF Llama/Gemma pair channel i with i + hd/2 ("rotate half"); Cohere pairs 2i with 2i+1."""
    if interleaved:
        x1, x2 = x[..., ::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        d, hd = cfg.d_model, cfg.head_dim
        self.q = nn.Linear(d, cfg.n_heads * hd, bias=cfg.attn_bias)
        self.k = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.attn_bias)
        self.v = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.attn_bias)
        self.o = nn.Linear(cfg.n_heads * hd, d, bias=cfg.attn_bias)
        if cfg.qk_norm:  # Gemma 3 normalises each query and key head before RoPE
            self.q_norm, self.k_norm = make_norm(cfg, hd), make_norm(cfg, hd)
        self.sliding_window = cfg.sliding_window(layer)
        if cfg.positions == "rope":
            # Fixed per layer (Gemma's local and global layers differ). Layers with equal settings share one
            # cos/sin table per forward, found by rope_key: the scaling is a dict, so it is keyed by its JSON.
            self.rope_theta, self.rope_scaling = cfg.rope_theta(layer), cfg.rope_scaling(layer)
            self.rope_key = (self.rope_theta, json.dumps(self.rope_scaling, sort_keys=True))
        self.hook_attn_out = HookPoint()  # [B, T, d_model]

    def forward(self, x, ctx, kv_cache=None):
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)     # [B, H, T, hd]
        k = self.k(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.positions == "rope":
            cos, sin = ctx.rope(self.rope_key, self.rope_theta, self.rope_scaling, x.dtype)  # [B, 1, T, hd]
            q, k = apply_rope(q, cos, sin, cfg.rope_interleaved), apply_rope(k, cos, sin, cfg.rope_interleaved)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # [B, Hkv, Tk, hd], past + new
        if cfg.n_kv_heads != cfg.n_heads:  # grouped-query attention: each K/V head serves a group of Q heads
            k = k.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
            v = v.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
        mask = ctx.sliding_mask if self.sliding_window else ctx.mask  # additive, [B, 1 or H, T, Tk]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=cfg.attn_scale())
        y = y.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim)
        return self.hook_attn_out(self.o(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias) if cfg.mlp_gated else None
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.activation]
        # The coefficients of the value vectors (rows of `down`): what the paper's probe analysis reads.
        self.hook_post = HookPoint()  # [B, T, d_mlp]

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(self.hook_post(h))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.parallel = cfg.parallel_block
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.mlp_norm = nn.Identity() if cfg.parallel_block else make_norm(cfg)
        self.post_attn_norm = make_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.post_mlp_norm = make_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.hook_resid_pre = HookPoint()   # [B, T, d_model]
        self.hook_resid_post = HookPoint()  # [B, T, d_model]

    def forward(self, x, ctx, kv_cache=None):
        x = self.hook_resid_pre(x)
        h = self.attn_norm(x)
        if self.parallel:  # Cohere: attention and MLP both read the same normed input
            x = x + self.attn(h, ctx, kv_cache) + self.mlp(h)
        else:
            x = x + self.post_attn_norm(self.attn(h, ctx, kv_cache))
            x = x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        return self.hook_resid_post(x)


class KVCache:
    """Keys and values of every layer for the tokens seen so far; `update` appends and returns the full set."""

    def __init__(self, n_layers):
        self.kv = [None] * n_layers

    def update(self, layer, k, v):
        if self.kv[layer] is not None:
            k = torch.cat([self.kv[layer][0], k], dim=2)
            v = torch.cat([self.kv[layer][1], v], dim=2)
        self.kv[layer] = (k, v)
        return k, v

    def __len__(self):
        return 0 if self.kv[0] is None else self.kv[0][0].shape[2]

    def reorder(self, index):
        """Keep/duplicate batch rows (e.g. drop finished sequences)."""
        self.kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.kv]


def alibi_slopes(n_heads):
    """ALiBi head slopes: a geometric sequence starting at 2^(-8/n) (Press et al. 2022), with the
    interleaved extension BLOOM uses when n_heads is not a power of two."""
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    if closest != n_heads:
        extra = [2 ** (-4 * (i + 1) / closest) for i in range(0, 2 * (n_heads - closest), 2)]
        slopes += extra
    return torch.tensor(slopes)


class _Context:
    """Per-forward tensors shared by all layers: positions, attention masks, RoPE tables."""

    def __init__(self, cfg, attention_mask, n_new, device):
        B, Tk = attention_mask.shape
        self.cfg = cfg
        # Position of each token among the real (non-pad) tokens of its row: left padding shifts nothing.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, Tk]
        self.positions = positions[:, Tk - n_new:]                 # [B, T] positions of the new tokens
        q_idx = torch.arange(Tk - n_new, Tk, device=device)[:, None]
        k_idx = torch.arange(Tk, device=device)[None, :]
        allowed = (k_idx <= q_idx) & attention_mask[:, None, :].bool()  # [B, T, Tk]
        # A pad query would see no key at all (softmax of all -inf = NaN); let it see itself.
        allowed = allowed | (k_idx == q_idx)
        self.mask = self._additive(allowed[:, None])  # [B, 1, T, Tk]
        windows = {cfg.sliding_window(i) for i in range(cfg.n_layers)} - {None}
        assert len(windows) <= 1, "one sliding-window size per model"
        if windows:
            allowed_local = allowed & (q_idx - k_idx < windows.pop())
            self.sliding_mask = self._additive(allowed_local[:, None])
        if cfg.positions == "alibi":
            # softmax is shift-invariant per row, so slope * (key position) equals slope * -(distance).
            slopes = alibi_slopes(cfg.n_heads).to(device)
            alibi = slopes[None, :, None, None] * (positions * attention_mask)[:, None, None, :].float()
            self.mask = self.mask + alibi  # [B, H, T, Tk]
        self._rope = {}

    @staticmethod
    def _additive(allowed):
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))

    def rope(self, key, theta, scaling, dtype):
        """(cos, sin) [B, 1, T, hd] for the new tokens' positions, computed once per forward for each key."""
        if key not in self._rope:
            inv_freq = rope_inv_freq(self.cfg.head_dim, theta, scaling, self.positions.device)
            angles = self.positions[..., None].float() * inv_freq  # [B, T, hd/2]
            if self.cfg.rope_interleaved:
                angles = angles.repeat_interleave(2, dim=-1)
            else:
                angles = torch.cat([angles, angles], dim=-1)  # [B, T, hd]
            self._rope[key] = (angles.cos()[:, None], angles.sin()[:, None])
        cos, sin = self._rope[key]
        return cos.to(dtype), sin.to(dtype)


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.hook_embed = HookPoint()       # [B, T, d_model]
        self.hook_final_norm = HookPoint()  # [B, T, d_model], what the unembedding reads
        self.gradient_checkpointing = False
        self.hook_dict = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    # -- forward -------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, kv_cache=None, return_hidden=False):
        """input_ids [B, T] (only the new tokens when decoding with a cache); attention_mask [B, T_past + T],
        1 for real tokens, 0 for padding. Returns logits [B, T, V], or the final-normed hidden states
        [B, T, d_model] with return_hidden=True (see `unembed`)."""
        cfg = self.config
        B, T = input_ids.shape
        n_past = len(kv_cache) if kv_cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, n_past + T, dtype=torch.long, device=input_ids.device)
        assert attention_mask.shape == (B, n_past + T), \
            f"attention_mask {tuple(attention_mask.shape)} must cover past + new tokens ({B}, {n_past + T})"
        ctx = _Context(cfg, attention_mask, T, input_ids.device)

        x = self.embed(input_ids)  # [B, T, d_model]
        if cfg.embed_scale:  # Gemma: sqrt(d), rounded to the weight dtype first (as HF computes it)
            x = x * torch.tensor(cfg.d_model ** 0.5, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(ctx.positions)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.hook_embed(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, ctx, kv_cache, use_reentrant=False)
            else:
                x = block(x, ctx, kv_cache)
        h = self.hook_final_norm(self.final_norm(x))
        return h if return_hidden else self.unembed(h)

    def unembed(self, h):
        """Final-normed hidden states [..., d_model] -> logits [..., V]. Kept separate so callers can
        apply the (large) vocabulary projection only where they need log-probs."""
        weight, scale = self.unembed_params()
        logits = F.linear(h, weight)
        return logits * scale if scale != 1.0 else logits

    def unembed_params(self):
        """(weight [V, d_model], scale) with unembed(h) == scale * h @ weight.T (Cohere scales its logits)."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return weight, self.config.logit_scale()

    def new_kv_cache(self):
        return KVCache(self.config.n_layers)

    def value_vectors(self, layer):
        """The MLP value vectors of a layer, [d_mlp, d_model]: row j is what neuron j writes to the residual."""
        return self.blocks[layer].mlp.down.weight.T

    # -- hooks ---------------------------------------------------------------

    @contextlib.contextmanager
    def hooks(self, fwd_hooks):
        """Attach [(hook_name, fn)] for the duration of a with-block. fn(tensor, hook) returns None to
        only read the activation, or a tensor to replace it."""
        handles = []
        try:
            for name, fn in fwd_hooks:
                if name not in self.hook_dict:
                    raise KeyError(f"no hook point {name!r}; e.g. {next(iter(self.hook_dict))!r}")
                point = self.hook_dict[name]
                handles.append(point.register_forward_hook(lambda mod, inp, out, fn=fn: fn(out, mod)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def run_with_cache(self, input_ids, attention_mask=None, names=()):
        """Forward pass that also returns {hook_name: activation} for the requested hook points."""
        cache = {}

        def store(tensor, hook):
            cache[hook.name] = tensor.detach()

        with self.hooks([(name, store) for name in names]):
            logits = self(input_ids, attention_mask)
        return logits, cache

    # -- construction, HF names ------------------------------------------------

    @classmethod
    def from_config(cls, cfg, seed=0):
        """Random init (N(0, 0.02) weights, as GPT-2), for tests and toy runs."""
        torch.manual_seed(seed)
        model = cls(cfg)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
        return model

    def hf_state_dict(self):
        """Our parameters under their Hugging Face names and layouts (what `save_model` writes)."""
        return to_hf_tensors(self.config, self.state_dict())

    @classmethod
    def from_hf(cls, hf_config, tensors, source="checkpoint", config_source=None):
        """Build a model from an HF config dict and HF-named tensors (already in the target dtype/device).
        The module tree is created on the meta device and the loaded tensors are assigned into it, so the
        weights exist in memory once."""
        cfg = config_from_hf(hf_config, config_source or source)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {name: t.shape for name, t in model.hf_state_dict().items()}
        check_tensors(expected, tensors, source)
        model.load_state_dict(from_hf_tensors(cfg, tensors), assign=True, strict=True)
        return model


# -----------------------------------------------------------------------------
# Name and layout conversion between our modules and HF checkpoints

# Tensors old checkpoints carry that are not weights (causal-mask buffers, cached RoPE frequencies).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def qkv_split(cfg, fused, part):
    """Rows of a fused QKV projection belonging to q, k or v, for either fused layout."""
    H, hd = cfg.n_heads, cfg.head_dim
    if cfg.qkv_layout == "per_head":  # BLOOM: [H, 3, hd, ...]
        return fused.view(H, 3, hd, *fused.shape[1:])[:, "qkv".index(part)].reshape(H * hd, *fused.shape[1:])
    return fused.chunk(3, dim=0)["qkv".index(part)]


def qkv_fuse(cfg, q, k, v):
    if cfg.qkv_layout == "per_head":
        H, hd = cfg.n_heads, cfg.head_dim
        return torch.stack([t.view(H, hd, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(3 * H * hd,
                                                                                           *q.shape[1:])
    return torch.cat([q, k, v], dim=0)


def to_hf_tensors(cfg, sd):
    out = {}
    for ours, theirs in cfg.hf_names():
        t = sd[ours]
        out[theirs] = t.T if theirs.endswith(cfg.transposed) and t.dim() == 2 else t
    if cfg.fused_qkv:
        for i in range(cfg.n_layers):
            for p in ("weight", "bias"):
                q, k, v = (sd[f"blocks.{i}.attn.{x}.{p}"] for x in "qkv")
                fused = qkv_fuse(cfg, q, k, v)
                name = cfg.fused_qkv.format(i=i) + f".{p}"
                out[name] = fused.T if name.endswith(cfg.transposed) else fused
    return out


def from_hf_tensors(cfg, tensors):
    out = {}
    for ours, theirs in cfg.hf_names():
        t = tensors[theirs]
        out[ours] = t.T.contiguous() if theirs.endswith(cfg.transposed) and t.dim() == 2 else t
    if cfg.fused_qkv:
        for i in range(cfg.n_layers):
            for p in ("weight", "bias"):
                name = cfg.fused_qkv.format(i=i) + f".{p}"
                fused = tensors[name].T if name.endswith(cfg.transposed) else tensors[name]
                for x in "qkv":
                    out[f"blocks.{i}.attn.{x}.{p}"] = qkv_split(cfg, fused, x).contiguous()
    return out


def check_tensors(expected, tensors, source):
    """Refuse a checkpoint whose tensors are not exactly the ones the config implies."""
    # BLOOM checkpoints saved from BloomModel (e.g. bigscience/bloom-560m) omit the "transformer." prefix,
    # and tied lm_head weights may or may not be saved: normalise both before comparing.
    for name in list(tensors):
        if "transformer." + name in expected and name not in expected:
            tensors["transformer." + name] = tensors.pop(name)
        elif name == "lm_head.weight" and name not in expected or name.endswith(IGNORED_SUFFIXES):
            del tensors[name]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:5])}"
                         f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}"
                         f"{f' and {len(unexpected) - 5} more' if len(unexpected) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                             f"config implies {tuple(shape)}")


class _Stop(Exception):
    """Raised by a hook once every hook point a pooling pass needs has fired: the rest of the model never runs."""


def rms_normalize(x):
    """Scale each feature vector to unit RMS. A no-bias linear probe's decisions (sign of w.x) are unchanged
    by a positive rescaling of x, and it keeps Adam well-conditioned when residual norms are in the
    hundreds (Gemma), while leaving w in residual-stream coordinates, where it is compared to value vectors."""
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)


@torch.no_grad()
def pooled_activations(model, tokenizer, texts, names, batch_size=16, max_len=None, device="cpu", skip_bos=False,
                       progress=None, poolings=("mean",)):
    """{pooling: {hook_name: [N, d] float32 on CPU}}: each text's activation at the named hook points, averaged
    over its real tokens ("mean") and/or taken at its last token ("last"). Pooling happens inside the hooks, so
    no layer's [B, T, d] activations outlive its block, and the forward stops once every named hook point has
    fired. skip_bos leaves BOS out of the mean: it carries a large, text-independent activation in most models.
    Texts are truncated to max_len tokens (BOS included), batched by length, returned in input order."""
    ids = [x[:max_len] for x in tokenizer.encode_batch(list(texts))]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pooled = {p: {name: [] for name in names} for p in poolings}
    for start in tqdm(range(0, len(order), batch_size), desc=progress, leave=False, disable=progress is None):
        input_ids, mask = tokenizer.pad([ids[i] for i in order[start:start + batch_size]], side="right")
        keep = mask.float()
        if skip_bos and tokenizer.add_bos:
            keep[:, 0] = 0.0
            keep[keep.sum(-1) == 0, 0] = 1.0  # a text that is only BOS still gets a vector
        weights = (keep / keep.sum(-1, keepdim=True))[..., None].to(device)  # [B, T, 1]
        last = (mask.sum(-1) - 1).to(device)  # [B], right padding
        fired = set()

        def pool(t, hook):
            t = t.float()
            if "mean" in pooled:
                pooled["mean"][hook.name].append((t * weights).sum(1).cpu())  # [B, d]
            if "last" in pooled:
                pooled["last"][hook.name].append(t[torch.arange(len(t)), last].cpu())  # [B, d]
            fired.add(hook.name)
            if len(fired) == len(names):
                raise _Stop

        with model.hooks([(name, pool) for name in names]):
            try:
                model(input_ids.to(device), mask.to(device), return_hidden=True)
            except _Stop:
                pass
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return {p: {name: torch.cat(chunks)[inverse] for name, chunks in by_name.items()} for p, by_name in pooled.items()}


# -----------------------------------------------------------------------------
# Dtypes by the names scripts and config files use

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
