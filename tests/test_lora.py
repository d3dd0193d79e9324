"""Tests for lora.py and LoRA training in train_dpo.py: the merged weight is base + scale * B @ A, disabled
adapters give the base model exactly, the reference-by-disabling equals a frozen copy, LoRA DPO learns and
resumes exactly, adapters round-trip through disk, and bad adapter files fail with one-line errors."""

import copy
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

import loading
import lora
import train_dpo
from checkpoint import read_safetensors
from dpo import batch_logps, collate, tokenize_pair
from test_train_dpo import ROOT, TINY_MODEL, pair_loss, read_metrics, run_args

FAMILIES = ["gpt2", "bloom", "llama", "gemma3", "cohere"]
MODELS = ROOT / "tests" / "fixtures" / "models"


def randomize_adapters(model, seed=0):
    """Adapters as after some training: B is zero at the start, which would make most checks trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_weights_are_base_plus_scaled_BA_and_keep_the_outputs(family):
    base, _ = loading.load_model(MODELS / family)
    model = randomize_adapters(lora.add_lora(copy.deepcopy(base), rank=4, alpha=8, dropout=0.0))
    layers = lora.lora_layers(model)
    assert len(layers) == model.config.n_layers * (7 if model.config.mlp_gated else 6)  # every linear layer
    ids, mask = inputs(model.config.vocab_size)
    unmerged = model(ids, mask)
    expected = {name: layer.weight + 2.0 * layer.lora_B @ layer.lora_A for name, layer in layers.items()}
    merged = lora.merge(model)
    assert not lora.lora_layers(merged) and not lora.adapter_state_dict(merged)
    for name, weight in expected.items():
        assert type(merged.get_submodule(name)) is torch.nn.Linear
        torch.testing.assert_close(merged.get_submodule(name).weight, weight, rtol=0, atol=1e-7)
    torch.testing.assert_close(merged(ids, mask), unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base(ids, mask), unmerged, atol=1e-3)  # the adapters do change the model


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_update_gradients(dropout):
    g = torch.Generator().manual_seed(0)
    x, A, B = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
               for shape in ((2, 5, 6), (3, 6), (4, 3)))
    keep = (torch.rand(2, 5, 6, generator=g) >= dropout) if dropout else None
    torch.autograd.gradcheck(lambda x, A, B: lora.LoRAUpdate.apply(x, A, B, keep, 1 - dropout, 0.7), (x, A, B))
    out = lora.LoRAUpdate.apply(x, A, B, keep, 1 - dropout, 0.7)
    dropped = x if keep is None else x * keep / (1 - dropout)
    torch.testing.assert_close(out, 0.7 * dropped @ A.T @ B.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_disabled_adapters_give_the_base_logits_exactly(family):
    base, _ = loading.load_model(MODELS / family)
    ids, mask = inputs(base.config.vocab_size)
    expected = base(ids, mask)
    model = lora.add_lora(copy.deepcopy(base), rank=4).eval()
    assert torch.equal(model(ids, mask), expected)  # B = 0 at the start: the update is exactly zero
    randomize_adapters(model)
    with lora.disabled(model):
        assert torch.equal(model(ids, mask), expected)
    assert not torch.equal(model(ids, mask), expected)  # and back on after the with-block


def test_only_adapters_train_and_stay_fp32_on_a_bf16_base():
    base, _ = loading.load_model(TINY_MODEL, dtype=torch.bfloat16)
    model = lora.add_lora(base, rank=2, targets="q,v")
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == set(lora.adapter_state_dict(model)) and len(trained) == 2 * 2 * model.config.n_layers
    assert all(p.dtype == torch.float32 for p in lora.adapter_state_dict(model).values())
    assert model.blocks[0].attn.q.weight.dtype == torch.bfloat16
    ids, mask = inputs(model.config.vocab_size)
    randomize_adapters(model)
    model(ids, mask).float().sum().backward()
    assert all(p.grad is not None for p in lora.adapter_state_dict(model).values())
    with pytest.raises(ValueError, match="unknown layer"):
        lora.add_lora(loading.load_model(TINY_MODEL)[0], rank=2, targets="q,proj")


def test_reference_by_disabling_equals_a_frozen_copy():
    base, tok = loading.load_model(TINY_MODEL)
    frozen = copy.deepcopy(base)
    policy = randomize_adapters(lora.add_lora(base, rank=4)).train()  # train mode: LoRA dropout is on
    examples = [tokenize_pair(tok, f"prompt {i}", " a calm reply", " nasty words", 12, 24) for i in range(4)]
    batch = collate(examples, tok.pad_id)
    args = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        expected = batch_logps(frozen, *args)[0]
        with lora.disabled(policy):
            by_disabling = batch_logps(policy, *args)[0]
    assert torch.equal(by_disabling, expected)
    assert all(layer.enabled for layer in lora.lora_layers(policy).values())


def lora_args(tmp_path, out, *extra):
    return run_args(tmp_path, out, "--lora-rank", "8", "--lora-alpha", "16", "--lr", "1e-2", *extra)


def test_lora_dpo_learns_and_saves_adapters_only(tmp_path):
    out = tmp_path / "run"
    result = train_dpo.main(lora_args(tmp_path, out, "--max-steps", "12"))
    assert result["step"] == 12
    start_loss, start_acc = pair_loss(TINY_MODEL, tmp_path)
    loss, accuracy = pair_loss(out / "last", tmp_path)  # load_model merges the adapters into the base
    assert loss < 0.5 * math.log(2) < start_loss and accuracy >= 0.9 > start_acc
    for name in ("best", "last"):
        assert sorted(p.name for p in (out / name).iterdir() if p.name != "state.pt") == \
            ["README.md", lora.CONFIG_NAME, lora.WEIGHTS_NAME]
    config = lora.read_adapter_config(out / "last")
    assert config["rank"] == 8 and config["base_model"] == str(TINY_MODEL.resolve()) and config["format"] == "peft"
    peft_config = json.loads((out / "last" / lora.CONFIG_NAME).read_text())  # PEFT's schema, all 7 layer kinds
    assert len(peft_config["target_modules"]) == len(lora.TARGETS)
    # the embedding, norms and every base weight are untouched: the run trained the adapters alone
    trained, _ = loading.load_adapter_model(out / "last", merged=False)
    base, _ = loading.load_model(TINY_MODEL)
    for name, p in base.state_dict().items():
        assert torch.equal(trained.state_dict()[name], p), name


def test_lora_resume_and_frozen_reference_reproduce_the_run(tmp_path):
    full, parts, frozen = tmp_path / "full", tmp_path / "parts", tmp_path / "frozen"
    train_dpo.main(lora_args(tmp_path, full, "--max-steps", "6"))
    train_dpo.main(lora_args(tmp_path, parts, "--max-steps", "3"))
    train_dpo.main(["--out", str(parts), "--resume", "--max-steps", "6"])
    assert read_metrics(parts) == read_metrics(full)  # LoRA dropout's RNG travels in state.pt too
    train_dpo.main(lora_args(tmp_path, frozen, "--max-steps", "6", "--ref-model", "frozen"))
    assert not (frozen / "ref_logps.pt").exists()
    for a, b in zip(read_metrics(full), read_metrics(frozen), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def test_adapters_round_trip_and_convert_cli(tmp_path):
    base, tok = loading.load_model(TINY_MODEL)
    model = randomize_adapters(lora.add_lora(copy.deepcopy(base), rank=3, alpha=6, targets="q,k,v,o,down"))
    model.eval()
    lora.save_adapters(model, tmp_path / "adapters", TINY_MODEL)
    loaded = lora.load_adapters(copy.deepcopy(base), tmp_path / "adapters").eval()
    for name, p in lora.adapter_state_dict(model).items():
        assert torch.equal(lora.adapter_state_dict(loaded)[name], p)
    ids, mask = inputs(base.config.vocab_size)
    expected = model(ids, mask)
    assert torch.equal(loaded(ids, mask), expected)
    through_load_model, _ = loading.load_model(tmp_path / "adapters")  # merged
    assert all(p.requires_grad for p in through_load_model.parameters())
    torch.testing.assert_close(through_load_model(ids, mask), expected, rtol=1e-5, atol=1e-5)
    loading.main(["convert", str(tmp_path / "adapters"), "--out", str(tmp_path / "merged"), "--device", "cpu"])
    merged, _ = loading.load_model(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").exists()
    torch.testing.assert_close(merged(ids, mask), expected, rtol=1e-5, atol=1e-5)
    info = subprocess.run([sys.executable, "lora.py", "info", str(tmp_path / "adapters")], cwd=ROOT,
                          capture_output=True, text=True)
    n = sum(p.numel() for p in lora.adapter_state_dict(model).values())
    assert info.returncode == 0 and f"{n / 1e6:.2f}M adapter parameters" in info.stdout


def test_bad_adapter_directories_are_one_line_errors(tmp_path):
    base, _ = loading.load_model(TINY_MODEL)
    model = lora.add_lora(copy.deepcopy(base), rank=2)
    good = tmp_path / "good"
    lora.save_adapters(model, good, TINY_MODEL)

    def fails(path, match):
        proc = subprocess.run([sys.executable, "loading.py", "convert", str(path), "--out", str(tmp_path / "m"),
                               "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert match in proc.stderr, proc.stderr

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    weights = truncated / lora.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    fails(truncated, f"{weights}: tensor")
    missing_field = tmp_path / "missing_field"
    shutil.copytree(good, missing_field)
    cfg = json.loads((missing_field / lora.CONFIG_NAME).read_text())  # PEFT's schema (save_adapters on gemma3)
    del cfg["r"]
    (missing_field / lora.CONFIG_NAME).write_text(json.dumps(cfg))
    fails(missing_field, f"{missing_field / lora.CONFIG_NAME}: field 'r'")
    mismatched = tmp_path / "mismatched"  # the gemma3 fixture's adapters on the llama fixture
    shutil.copytree(good, mismatched)
    cfg = json.loads((mismatched / lora.CONFIG_NAME).read_text())
    (mismatched / lora.CONFIG_NAME).write_text(json.dumps({**cfg, "base_model_name_or_path": str(MODELS / "llama")}))
    fails(mismatched, "model.layers.2.self_attn.q_proj.lora_A.weight is not a LoRA weight of a linear layer of this "
                      "llama model's blocks")
    no_base = tmp_path / "no_base"
    shutil.copytree(good, no_base)
    (no_base / lora.CONFIG_NAME).write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "gone")}))
    fails(no_base, "base model")


def test_lora_run_on_a_bf16_base(tmp_path):
    out = tmp_path / "bf16"
    result = train_dpo.main(lora_args(tmp_path, out, "--max-steps", "2", "--dtype", "bf16"))
    assert result["step"] == 2 and all(math.isfinite(m["loss"]) for m in read_metrics(out))
    trained, _ = loading.load_adapter_model(out / "last", dtype=torch.bfloat16, merged=False)
    assert trained.blocks[0].mlp.up.weight.dtype == torch.bfloat16
    assert {p.dtype for p in lora.adapter_state_dict(trained).values()} == {torch.float32}


@pytest.mark.parametrize("family", ["gpt2", "bloom", "llama"])
def test_peft_adapters_load_with_peft_logits(family):
    """Adapters saved by peft itself (tests/fixtures/make_peft_fixtures.py): Conv1D layers (gpt2) and fused q/k/v
    projections (gpt2, bloom) included."""
    fixture = ROOT / "tests" / "fixtures" / "peft" / family
    golden = torch.load(fixture / "golden.pt", weights_only=True)
    model, _ = loading.load_adapter_model(fixture, base=MODELS / family, merged=False)
    assert set(lora.lora_layers(model)) and model.lora_config["rank"] == 4
    torch.testing.assert_close(model.eval()(golden["input_ids"]), golden["logits"], rtol=1e-5, atol=1e-5)
    merged = lora.merge(model)
    torch.testing.assert_close(merged(golden["input_ids"]), golden["logits"], rtol=1e-5, atol=1e-5)
    info = subprocess.run([sys.executable, "lora.py", "info", str(fixture)], cwd=ROOT, capture_output=True, text=True)
    assert info.returncode == 0 and "PEFT LoRA rank 4" in info.stdout, info.stderr


def test_peft_adapters_for_another_model_are_refused(tmp_path):
    shutil.copytree(ROOT / "tests" / "fixtures" / "peft" / "llama", tmp_path / "llama")
    with pytest.raises(ValueError, match=f"on base model {TINY_MODEL}\\): missing tensor\\(s\\) blocks.2."):
        loading.load_adapter_model(tmp_path / "llama", base=TINY_MODEL)  # same layer names, one layer more
    with pytest.raises(ValueError, match="attn.c_attn.lora_A.weight is not a LoRA weight of a linear layer of "
                                         "this llama model"):
        loading.load_adapter_model(ROOT / "tests" / "fixtures" / "peft" / "gpt2", base=MODELS / "llama")
    cfg = json.loads((tmp_path / "llama" / lora.CONFIG_NAME).read_text())
    (tmp_path / "llama" / lora.CONFIG_NAME).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="'use_dora' = True is unsupported"):
        loading.load_adapter_model(tmp_path / "llama", base=MODELS / "llama")


def test_adapters_written_in_peft_format_match_peft_files_and_load_back(tmp_path):
    base, _ = loading.load_model(MODELS / "llama")
    model = randomize_adapters(lora.add_lora(copy.deepcopy(base), rank=4, alpha=8)).eval()
    lora.save_adapters(model, tmp_path / "ours", MODELS / "llama")
    loading.main(["peft", str(tmp_path / "ours"), "--out", str(tmp_path / "peft")])
    ours = read_safetensors(tmp_path / "peft" / lora.WEIGHTS_NAME)
    written_by_peft = read_safetensors(ROOT / "tests" / "fixtures" / "peft" / "llama" / lora.WEIGHTS_NAME)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in written_by_peft.items()}
    config = json.loads((tmp_path / "peft" / lora.CONFIG_NAME).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert sorted(config["target_modules"]) == sorted({k.split(".")[-3] for k in written_by_peft})
    back, _ = loading.load_adapter_model(tmp_path / "peft", merged=False)
    ids, mask = inputs(base.config.vocab_size)
    assert torch.equal(back.eval()(ids, mask), model(ids, mask))
    with pytest.raises(ValueError, match="fused q/k/v"):
        lora.save_peft_adapters(lora.add_lora(loading.load_model(MODELS / "bloom")[0], rank=2), tmp_path / "b",
                                MODELS / "bloom")
