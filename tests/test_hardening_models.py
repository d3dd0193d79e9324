"""Hardening catalogue of the model side (issue 18): checkpoints, configs, GGUF files, adapters, devices, hub ids
and resumed runs that a careless or hostile user can hand the scripts. Each row of CASES builds its bad input in
tmp_path and names what must be refused, and with which one-line message; tests below the table check what
the fixes keep (carried-over files, model cards, PEFT-format adapters, the hub download)."""

import copy
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import loading
import lora
import runstate
import train_config
import train_dpo
from hardening import assert_one_line_error, cli, refused
from test_checkpoint import write_gguf

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "fixtures" / "models"
GGUF_DIR = ROOT / "tests" / "fixtures" / "gguf"
TINY = MODELS / "gemma3"


# -----------------------------------------------------------------------------
# Building bad inputs


def model_copy(tmp_path, family="gemma3"):
    return Path(shutil.copytree(MODELS / family, tmp_path / family))


def edit_header(path, edit):
    """Rewrite a safetensors header through edit(header) and keep the data bytes as they are."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])


def overlapping(tmp_path):
    d = model_copy(tmp_path)

    def alias(header):  # two same-sized norm weights share one span of bytes
        a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
        header[b]["data_offsets"] = header[a]["data_offsets"]
    edit_header(d / "model.safetensors", alias)
    return d


def with_weight(tmp_path, value, family="gemma3"):
    d = model_copy(tmp_path, family)
    tensors = checkpoint.read_safetensors(d / "model.safetensors")
    tensors["model.norm.weight"][3] = value
    checkpoint.write_safetensors(d / "model.safetensors", tensors, {"format": "pt"})
    return d


def truncated(tmp_path):
    d = model_copy(tmp_path)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    return d


def with_config(tmp_path, **fields):
    d = model_copy(tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **fields}))
    return d


def with_tensor_type(tmp_path, qtype):
    """tiny_llama.gguf with the ggml type of token_embd.weight's tensor info set to `qtype`."""
    data = bytearray((GGUF_DIR / "tiny_llama.gguf").read_bytes())
    name = b"token_embd.weight"
    at = data.rindex(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # the tensor info follows the metadata
    (n_dims,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, qtype)
    path = tmp_path / "bad_type.gguf"
    path.write_bytes(bytes(data))
    return path


def cut_gguf(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes((GGUF_DIR / "tiny_llama.gguf").read_bytes()[:-2000])
    return path


def adapter_dir(tmp_path, name="adapters", family="gemma3"):
    base, _ = loading.load_model(MODELS / family)
    out = tmp_path / name
    lora.save_adapters(lora.add_lora(base, rank=2), out, MODELS / family)
    return out


def rebase(adapters, base):
    config_file = lora.adapter_files(adapters)[0]
    config = json.loads(config_file.read_text())
    field = "base_model_name_or_path" if "peft_type" in config else "base_model"
    config_file.write_text(json.dumps({**config, field: str(base)}))


def self_based(tmp_path):
    d = adapter_dir(tmp_path)
    rebase(d, d)
    return d


def cycle(tmp_path):
    a, b = adapter_dir(tmp_path, "a"), adapter_dir(tmp_path, "b")
    rebase(a, b)
    rebase(b, a)
    return a


def offline_hub(monkeypatch):
    class OfflineHub:  # what huggingface_hub raises without a network, in one class
        @staticmethod
        def snapshot_download(repo_id, **kw):
            raise OSError("Cannot reach https://huggingface.co: offline\nsecond line of the message")
    monkeypatch.setitem(sys.modules, "huggingface_hub", OfflineHub)


def pairs_file(path, n=12, word="kind"):
    path.write_text("".join(json.dumps({"prompt": f"Tell me something {i}", "chosen": f" a {word} reply",
                                        "rejected": " rude words"}) + "\n" for i in range(n)))
    return path


def resumed_on_changed_data(tmp_path):
    """A two-step run, then its pairs file rewritten; returns the resume's argv and the run's files."""
    out, data = tmp_path / "run", pairs_file(tmp_path / "pairs.jsonl")
    train_dpo.main(["--model", str(TINY), "--data", str(data), "--out", str(out), "--max-steps", "2",
                    "--eval-every", "2", "--batch-size", "2", "--max-len", "24", "--max-prompt-len", "12",
                    "--device", "cpu", "--valid-frac", "0.2"])
    pairs_file(data, word="gentle")
    keep = [out / "config.json", out / "data.json", out / "ref_logps.pt", out / "metrics.jsonl",
            out / "last" / "state.pt", out / "last" / "model.safetensors"]
    return ["--out", out, "--resume", "--max-steps", "4"], keep


def convert(model):
    return lambda tmp_path: (loading.main, ["convert", model(tmp_path), "--out", tmp_path / "out", "--device", "cpu"],
                             [tmp_path / "out" / "config.json"])


def info(model, *flags):
    return lambda tmp_path: (loading.main, ["info", model(tmp_path), *flags], [])


# -----------------------------------------------------------------------------
# The catalogue: (build(tmp_path) -> (main, argv, files that must not change), message pattern)

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

CASES = [
    pytest.param(convert(overlapping), r"model\.safetensors: tensors 'model\.layers\.0\.input_layernorm\.weight' and "
                 r"'model\.layers\.0\.post_attention_layernorm\.weight' overlap", id="safetensors-overlapping-offsets"),
    pytest.param(convert(lambda t: with_weight(t, float("nan"))),
                 r"model\.safetensors: tensor 'model\.norm\.weight' has 1 non-finite value", id="weights-nan"),
    pytest.param(convert(lambda t: with_weight(t, float("inf"), "llama")),
                 r"llama/model\.safetensors: tensor 'model\.norm\.weight' has 1 non-finite", id="weights-inf"),
    pytest.param(lambda t: (loading.main, ["convert", with_weight(t, 1e6), "--out", t / "out", "--device", "cpu",
                                           "--dtype", "fp16"], [t / "out" / "config.json"]),
                 r"tensor 'model\.norm\.weight' has 1 non-finite value\(s\) \(NaN/inf\) as torch\.float16",
                 id="weights-overflow-fp16"),
    pytest.param(convert(truncated), r"gemma3/model\.safetensors: tensor .* past the .* data section \(file truncated",
                 id="safetensors-truncated"),
    pytest.param(convert(lambda t: with_config(t, num_hidden_layers="3")),
                 r"config\.json: field 'num_hidden_layers' = '3' must be a whole number", id="config-string-layers"),
    pytest.param(convert(lambda t: with_config(t, hidden_size=True)),
                 r"config\.json: field 'hidden_size' = True must be a whole number", id="config-bool-size"),
    pytest.param(convert(lambda t: with_config(t, rms_norm_eps="1e-6")),
                 r"config\.json: field 'rms_norm_eps' = '1e-6' must be a positive number", id="config-string-eps"),
    pytest.param(convert(lambda t: with_config(t, num_key_value_heads=3)),
                 r"config\.json: 4 attention heads are not a multiple of 3 key/value heads", id="config-gqa-heads"),
    pytest.param(info(lambda t: write_gguf(t / "a.gguf", "llama", {"token_embd.weight": np.ones((4, 32), np.float32)},
                                           general__alignment=0), "--device", "cpu"),
                 r"a\.gguf: GGUF field general\.alignment = 0 must be a power of two", id="gguf-alignment-0"),
    pytest.param(info(lambda t: with_tensor_type(t, 99), "--device", "cpu"),
                 r"bad_type\.gguf: corrupt or truncated GGUF header \(tensor 'token_embd\.weight' has unknown ggml "
                 r"type 99\)", id="gguf-bad-tensor-type"),
    pytest.param(info(lambda t: write_gguf(t / "nan.gguf", "llama", {"token_embd.weight": np.full((4, 32), np.nan,
                                                                                        np.float32)}),
                      "--device", "cpu"),
                 r"nan\.gguf: tensor 'token_embd\.weight' has 128 non-finite", id="gguf-weights-nan"),
    pytest.param(info(cut_gguf, "--device", "cpu"),
                 r"cut\.gguf: tensor .* \(truncated\?\)", id="gguf-truncated"),
    pytest.param(convert(self_based), r"adapter_config\.json: base model .* is an adapter directory already on the "
                 r"way .* \(a cycle\)", id="adapter-base-is-itself"),
    pytest.param(convert(cycle), r"b/adapter_config\.json: base model .*/a' is an adapter directory .* \(a cycle\)",
                 id="adapter-base-cycle"),
    pytest.param(info(lambda t: "tests/fixtures/nowhere/model.gguf"), r"nowhere/model\.gguf: no such file",
                 id="missing-gguf-path-is-not-a-hub-id"),
    pytest.param(info(lambda t: TINY, "--device", "tpu"), r"--device 'tpu': not a device", id="device-tpu"),
    pytest.param(info(lambda t: TINY, "--device", "cuda"), r"--device cuda: this machine has no CUDA device",
                 id="device-cuda-without-cuda", marks=NO_CUDA),
    pytest.param(lambda t: (train_dpo.main, ["--out", t / "run", "--device", "cuda"], [t / "run" / "config.json"]),
                 r"--device cuda: this machine has no CUDA device", id="train-device-cuda-without-cuda",
                 marks=NO_CUDA),
    pytest.param(lambda t: (train_dpo.main, *resumed_on_changed_data(t)),
                 r"pairs\.jsonl: the train pairs \(\d+\) differ from the \d+ the run in .* started with",
                 id="resume-on-changed-data"),
]


@pytest.mark.parametrize("build, pattern", CASES)
def test_refused(build, pattern, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    main, argv, keep = build(tmp_path)
    refused(main, argv, pattern, keep=keep)


@pytest.mark.parametrize("name", ["ai-forever/mGPT", "gpt2"], ids=["org-name", "legacy-bare-name"])
def test_hub_id_offline_says_what_to_do(name, monkeypatch):
    offline_hub(monkeypatch)
    refused(loading.main, ["info", name, "--device", "cpu"],
            rf"{name}: no such local path, and the hub download failed \(OSError: Cannot reach .*: offline\); "
            rf"download it where there is a network \(hf download {name} --local-dir DIR")


def test_hub_id_offline_is_one_line_from_the_command_line():
    status, _, stderr = cli("loading.py", "info", "ai-forever/mGPT", "--device", "cpu",
                            env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(status, stderr, r"^loading\.py: error: ai-forever/mGPT: .*hf download ai-forever/mGPT")
    assert "huggingface-cli" not in stderr


@pytest.mark.parametrize("repo_files, calls", [
    (["model.safetensors", "pytorch_model.bin"], 1), (["pytorch_model.bin"], 2)], ids=["both", "bin-only"])
def test_hub_download_fetches_bin_only_without_safetensors(repo_files, calls, tmp_path, monkeypatch):
    patterns = []

    class Hub:
        @staticmethod
        def snapshot_download(repo_id, allow_patterns):
            patterns.append(allow_patterns)
            for name in repo_files:  # what the patterns let through
                if any(Path(name).match(p) for p in allow_patterns):
                    (tmp_path / name).write_bytes(b"")
            return str(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", Hub)
    assert checkpoint.resolve_checkpoint("org/model") == tmp_path
    assert len(patterns) == calls and not any("pytorch_model*.bin" in p for p in patterns[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(repo_files[:1] if calls == 1 else repo_files)


# -----------------------------------------------------------------------------
# What saving keeps


def test_saved_checkpoint_keeps_chat_template_generation_config_and_card(tmp_path):
    src = model_copy(tmp_path)
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": template,
                                                           "padding_side": "left"}))
    model, tok = loading.load_model(src)
    loading.save_model(model, tok, tmp_path / "saved", notes=["Fine-tuned on something (CC BY-NC 4.0)"])
    saved = tmp_path / "saved"
    written = json.loads((saved / "tokenizer_config.json").read_text())
    assert (written["chat_template"], written["padding_side"], written["model_max_length"]) == (template, "left", 256)
    assert json.loads((saved / "generation_config.json").read_text()) == \
        json.loads((src / "generation_config.json").read_text())
    card = (saved / "README.md").read_text()
    shown = loading.shown  # no absolute paths in a card: relative to the working folder, else the last two parts
    assert f"- Base model: {shown(src)}" in card and "Gemma Terms of Use" in card and "CC BY-NC 4.0" in card
    again, tok_again = loading.load_model(saved)  # the card's lines carry over to a checkpoint saved from it
    loading.save_model(again, tok_again, tmp_path / "again")
    card = (tmp_path / "again" / "README.md").read_text()
    assert f"- Base model: {shown(saved)}" in card and f"- Base model: {shown(src)}" in card and "CC BY-NC 4.0" in card
    assert str(tmp_path) not in card and "license: gemma" in card.split("\n---\n")[0]


def test_gguf_checkpoint_card_says_the_weights_are_dequantized(tmp_path):
    model, tok = loading.load_model(GGUF_DIR / "tiny_gemma3.gguf")
    loading.save_model(model, tok, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "dequantized from the GGUF file tiny_gemma3.gguf (" in card and "not the original" in card
    assert "Gemma Terms of Use" in card


def test_training_notes_name_the_data_license():
    assert "CC BY-NC 4.0: this model is for non-commercial use only" in runstate.training_card(
        train_config.TrainConfig())["notes"][0]
    assert "pairs.jsonl; their license applies" in runstate.training_card(
        train_config.TrainConfig(data="pairs.jsonl"))["notes"][0]


def test_run_checkpoints_carry_card_and_data_record(tmp_path):
    data = pairs_file(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    train_dpo.main(["--model", str(TINY), "--data", str(data), "--out", str(out), "--max-steps", "2",
                    "--eval-every", "2", "--batch-size", "2", "--max-len", "24", "--max-prompt-len", "12",
                    "--device", "cpu", "--valid-frac", "0.2", "--lora-rank", "2"])
    for name in ("best", "last"):
        card = (out / name / "README.md").read_text()
        assert f"Base model: {loading.shown(TINY)}" in card and "pairs.jsonl; their license applies" in card
        config = json.loads((out / name / lora.CONFIG_NAME).read_text())  # PEFT's schema: peft loads it as is
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(TINY.resolve())
    record = json.loads((out / "data.json").read_text())
    assert record["train"]["source"] == str(data) and record["train"]["pairs"] + record["valid"]["pairs"] == 12
    train_dpo.main(["--out", str(out), "--resume", "--max-steps", "4"])  # same data: resumes
    assert (out / "last" / "README.md").read_text().count("Base model:") == 1


# -----------------------------------------------------------------------------
# Adapter directories


def test_fused_qkv_adapters_use_file_names_peft_does_not_claim(tmp_path):
    d = adapter_dir(tmp_path, family="gpt2")
    assert sorted(p.name for p in d.iterdir()) == [lora.OWN_CONFIG_NAME, lora.OWN_WEIGHTS_NAME]
    model, _ = loading.load_adapter_model(d, merged=False)
    assert model.lora_config["rank"] == 2 and lora.lora_layers(model)


def test_adapter_dirs_of_the_older_layout_still_load(tmp_path):
    base, _ = loading.load_model(TINY)
    model = lora.add_lora(copy.deepcopy(base), rank=2)
    old = tmp_path / "old"  # our schema under PEFT's file names, as runs wrote it before
    lora.write_adapter_dir(old, {"base_model": str(TINY), **model.lora_config, "parameters": 1},
                           lora.adapter_state_dict(model))
    loaded, _ = loading.load_adapter_model(old, merged=False)
    for name, p in lora.adapter_state_dict(model).items():
        assert torch.equal(lora.adapter_state_dict(loaded)[name], p)


# -----------------------------------------------------------------------------
# Labels


def test_eval_every_and_seed_labels():
    assert train_config.TrainConfig().eval_every == 25
    help_text = " ".join(train_config.build_parser().format_help().split())
    assert "eval_steps=25" in help_text and "official code uses 0" in help_text
    assert "also adapts the token embedding and LM head" in help_text
    assert "lora_targets" not in train_config.PAPER_VALUES and "seed" not in train_config.PAPER_VALUES
