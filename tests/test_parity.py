"""Numerical parity of model.py with Hugging Face transformers, via committed golden fixtures.

tests/fixtures/make_fixtures.py (run from a separate venv with transformers) wrote, for each family, a tiny
random checkpoint and HF's outputs on it; these tests only read those files, so transformers is not needed.
Also covered: KV-cache decoding, save/load round trip, sharded checkpoints, and clear errors on bad files.
"""
import json
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import checkpoint
import loading
from loading import load_model, save_model

MODELS_DIR = Path(__file__).parent / "fixtures" / "models"
FAMILIES = ["gpt2", "bloom", "llama", "gemma3", "cohere"]
ATOL = 1e-5  # HF's own eager vs sdpa kernels differ by up to ~3e-6 on these fixtures


@lru_cache(maxsize=None)
def golden(family):
    return torch.load(MODELS_DIR / family / "golden.pt", weights_only=True)


@lru_cache(maxsize=None)
def loaded(family):
    """One model per family for the whole module (tests only read it)."""
    model, tokenizer = load_model(str(MODELS_DIR / family))
    return model.eval(), tokenizer


def max_err(a, b, mask=None):
    """Largest |a - b| over [B, T, V] logits, counting only query positions where mask [B, T] is 1."""
    diff = (a.double() - b.double()).abs()
    if mask is not None:
        diff = diff[mask.bool()]
    return diff.max().item()


def copy_fixture(family, tmp_path):
    dst = tmp_path / family
    shutil.copytree(MODELS_DIR / family, dst, ignore=shutil.ignore_patterns("golden.pt"))
    return dst


@torch.no_grad()
def decode_with_cache(model, input_ids, attention_mask, n_prefill):
    """Prefill the first n_prefill tokens, then feed the rest one at a time. Returns logits [B, T, V]."""
    cache = model.new_kv_cache()
    out = [model(input_ids[:, :n_prefill], attention_mask=attention_mask[:, :n_prefill], kv_cache=cache)]
    for t in range(n_prefill, input_ids.shape[1]):
        out.append(model(input_ids[:, t:t + 1], attention_mask=attention_mask[:, :t + 1], kv_cache=cache))
    return torch.cat(out, dim=1)


@torch.no_grad()
def greedy(model, input_ids, attention_mask, n_new):
    """Greedy decoding with the KV cache, as HF generate(do_sample=False) does. Returns new ids [B, n_new]."""
    cache = model.new_kv_cache()
    logits = model(input_ids, attention_mask=attention_mask, kv_cache=cache)
    new = []
    for _ in range(n_new):
        next_id = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        new.append(next_id)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_id)], dim=1)
        logits = model(next_id, attention_mask=attention_mask, kv_cache=cache)
    return torch.cat(new, dim=1)


# ------------------------------------------------------------------------------------ logits parity
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_unpadded_logits_match_hf(family):
    model, _ = loaded(family)
    g = golden(family)
    assert next(model.parameters()).dtype == torch.float32  # stored bf16/fp16 weights are upcast on load
    logits = model(g["input_ids"], attention_mask=torch.ones_like(g["input_ids"]))
    assert logits.shape == g["logits_unpadded"].shape and logits.dtype == torch.float32
    assert max_err(logits, g["logits_unpadded"]) <= ATOL
    assert torch.equal(model(g["input_ids"]), logits)  # attention_mask=None means "no padding"


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_left_padded_logits_match_hf(family):
    model, _ = loaded(family)
    g = golden(family)
    logits = model(g["input_ids"], attention_mask=g["attention_mask"])
    assert torch.isfinite(logits[g["attention_mask"].bool()]).all()
    assert max_err(logits, g["logits_padded"], g["attention_mask"]) <= ATOL


# ------------------------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_prefill", [1, 5])  # 5 > Gemma's sliding window of 4
def test_kv_cache_matches_full_recompute_unpadded(family, n_prefill):
    model, _ = loaded(family)
    g = golden(family)
    ids, mask = g["input_ids"], torch.ones_like(g["input_ids"])
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
    cached = decode_with_cache(model, ids, mask, n_prefill)
    assert max_err(cached, full) <= ATOL
    assert max_err(cached, g["logits_unpadded"]) <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_matches_full_recompute_left_padded(family):
    model, _ = loaded(family)
    g = golden(family)
    ids, mask = g["input_ids"], g["attention_mask"]
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
    cached = decode_with_cache(model, ids, mask, n_prefill=8)  # every row has a real token in the prefill
    assert max_err(cached, full, mask) <= ATOL
    assert max_err(cached, g["logits_padded"], mask) <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuation_matches_hf_generate(family):
    model, _ = loaded(family)
    g = golden(family)
    prompt = g["greedy_prompt"][None]  # [1, 12]
    n_new = g["greedy_ids"].numel()
    assert torch.equal(greedy(model, prompt, torch.ones_like(prompt), n_new)[0], g["greedy_ids"])
    batched = greedy(model, g["input_ids"], g["attention_mask"], n_new)
    assert torch.equal(batched, g["greedy_padded_ids"])


# ------------------------------------------------------------------------------------ checkpoints
def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_round_trips_exactly(family, tmp_path):
    model, tokenizer = loaded(family)
    save_model(model, tokenizer, str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "config.json").exists()
    reloaded, _ = load_model(str(tmp_path / "saved"))
    without_hf = lambda cfg: {k: v for k, v in vars(cfg).items() if k != "hf"}  # hf may gain default keys
    assert without_hf(reloaded.config) == without_hf(model.config)
    assert_same_state(model, reloaded)
    g = golden(family)
    with torch.no_grad():
        assert torch.equal(reloaded(g["input_ids"]), model(g["input_ids"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_loads(family, tmp_path):
    src = MODELS_DIR / family
    tensors = checkpoint.read_safetensors(str(src / "model.safetensors"))
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    out = tmp_path / "sharded"
    out.mkdir()
    checkpoint.write_hf_weights(str(out), tensors, max_shard_bytes=total_bytes // 3)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, out / name)
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert set(index["weight_map"]) == set(tensors)
    sharded, _ = load_model(str(out))
    assert_same_state(loaded(family)[0], sharded)


def test_convert_cli_writes_the_model_in_the_dtype_asked(tmp_path, capsys):
    loading.main(["convert", str(MODELS_DIR / "llama"), "--out", str(tmp_path / "bf16"), "--device", "cpu",
                  "--dtype", "bf16"])
    written = checkpoint.read_safetensors(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    converted, _ = load_model(tmp_path / "bf16", dtype="bf16")
    assert torch.equal(converted.embed.weight, loaded("llama")[0].embed.weight.bfloat16())
    loading.main(["info", str(tmp_path / "bf16"), "--device", "cpu", "--batch", "1", "--seq", "4"])
    assert "llama, " in capsys.readouterr().out


def test_dtype_defaults_to_bf16_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve_dtype refuses devices it lacks
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert [loading.resolve_dtype(d, None) for d in ("cpu", "cuda", "cuda:1", "mps")] == ["fp32", "bf16", "bf16",
                                                                                           "fp32"]
    assert loading.resolve_dtype("cuda", "fp32") == "fp32"


# ------------------------------------------------------------------------------------ bad inputs
def rewrite_weights(model_dir, edit):
    """Apply edit(dict name -> tensor) to model.safetensors and write it back."""
    path = model_dir / "model.safetensors"
    tensors = checkpoint.read_safetensors(str(path))
    edit(tensors)
    path.unlink()
    checkpoint.write_safetensors(str(path), tensors)


def layer1_mlp_weight(model_dir):
    """A tensor every family has and none may omit: the first layer-1 MLP weight, by name."""
    names = checkpoint.read_safetensors(str(model_dir / "model.safetensors"))
    return sorted(n for n in names if ".1.mlp." in n and n.endswith("weight"))[0]


def load_error(model_dir):
    """The one-line ValueError message load_model raises for model_dir."""
    with pytest.raises(ValueError) as info:
        load_model(str(model_dir))
    message = str(info.value)
    assert "\n" not in message, f"error should be one line: {message!r}"
    return message


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [0.5, 0.999, 4])  # mid-data, the tail, inside the 8-byte header length
def test_truncated_safetensors_is_a_clear_error(family, keep, tmp_path):
    model_dir = copy_fixture(family, tmp_path)
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    n_keep = keep if isinstance(keep, int) else int(len(data) * keep)
    path.write_bytes(data[:n_keep])
    assert "model.safetensors" in load_error(model_dir)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_shape_tensor_is_a_clear_error(family, tmp_path):
    model_dir = copy_fixture(family, tmp_path)
    name = layer1_mlp_weight(model_dir)

    def widen(tensors):
        t = tensors[name]
        tensors[name] = torch.zeros(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype)

    rewrite_weights(model_dir, widen)
    assert name in load_error(model_dir)


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_tensor_is_a_clear_error(family, tmp_path):
    model_dir = copy_fixture(family, tmp_path)
    name = layer1_mlp_weight(model_dir)
    rewrite_weights(model_dir, lambda tensors: tensors.pop(name))
    assert name in load_error(model_dir)


@pytest.mark.parametrize("family", FAMILIES)
def test_unexpected_tensor_is_a_clear_error(family, tmp_path):
    model_dir = copy_fixture(family, tmp_path)
    name = layer1_mlp_weight(model_dir).replace(".mlp.", ".surprise_adapter.")
    rewrite_weights(model_dir, lambda tensors: tensors.update({name: torch.zeros(4)}))
    assert name in load_error(model_dir)


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_model_type_is_a_clear_error(family, tmp_path):
    model_dir = copy_fixture(family, tmp_path)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "mamba_unheard_of"
    config_path.write_text(json.dumps(config))
    message = load_error(model_dir)
    assert "mamba_unheard_of" in message and "config.json" in message
