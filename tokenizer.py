"""One tokenizer code path for every model: a thin wrapper around a Rust `tokenizers.Tokenizer`.

Sources it can be built from:
  * a HF directory with tokenizer.json (+ tokenizer_config.json / special_tokens_map.json / config.json),
  * a GPT-2 style directory with vocab.json + merges.txt (byte-level BPE),
  * the `tokenizer.ggml.*` metadata of a GGUF file (`Tokenizer.from_gguf_fields`), which holds no
    tokenizer.json: we rebuild one (SentencePiece merges as transformers' GGUF loader derives them,
    byte-level split regexes as llama.cpp names them) and cache it, so only the first load pays.

BOS handling lives in the backend's post-processor (a TemplateProcessing that prepends BOS when
`add_bos`), so `save()` writes a tokenizer.json that adds BOS in transformers' AutoTokenizer too.

    python tokenizer.py /path/to/model_dir --text "Hello world"
    python tokenizer.py model.gguf --text "Hallo Welt" --save out_dir
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

import checkpoint
from report import check_outputs, exit_on_error, write_text

# llama.cpp's token types (gguf.TokenType), stored per token in tokenizer.ggml.token_type.
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# The split regexes llama.cpp pairs with each tokenizer.ggml.pre name (llama-vocab.cpp) for byte-level BPE.
GPT2_PRE = ("default", "gpt2", "mpt", "olmo", "jais")  # ByteLevel's built-in GPT-2 regex
DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx", "pixtral")
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A tokenizer.json alone names no EOS/BOS; these are the usual spellings, tried only when no config says.
CONVENTIONAL_EOS = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>")
CONVENTIONAL_BOS = ("<bos>", "<s>", "<|begin_of_text|>")

# tokenizer_config.json fields a saved copy must not repeat: they point at the source's files or code.
NOT_CARRIED = ("auto_map", "tokenizer_file", "name_or_path")

# Bump when the GGUF -> tokenizer.json rebuild changes, so stale cache entries are never read.
GGUF_BUILD_VERSION = 1


class Tokenizer:
    """Encode/decode/pad for one model. `pad_id` falls back to `eos_id` (never None).

    Takes ownership of `backend`: its post-processor is replaced by one that adds BOS iff `add_bos`.
    `config` holds the source's other tokenizer_config.json fields (chat_template, model_max_length,
    padding_side, ...), which this class does not use but `save()` writes back, so a saved checkpoint of an
    instruction model keeps its chat template.
    """

    def __init__(self, backend: Backend, bos_id: int | None, eos_id: int, pad_id: int | None = None,
                 add_bos: bool = False, config: dict | None = None):
        if add_bos and bos_id is None:
            raise ValueError("add_bos=True needs a bos token, but none was found")
        self.backend = backend
        self.config = {k: v for k, v in (config or {}).items() if k not in NOT_CARRIED}
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.add_bos = add_bos
        # The backend adds BOS itself, so encode() and encode_batch() need no Python-side fix-ups; any
        # template the source had (e.g. one that also appends EOS) is replaced by this one.
        if add_bos:
            bos = backend.id_to_token(bos_id)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)])
        else:
            backend.post_processor = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special).ids

    def encode_batch(self, texts: list[str], add_special: bool = True) -> list[list[int]]:
        # The Rust batch encoder runs on all cores and skips offset bookkeeping.
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=add_special)]

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def decode_batch(self, batch, skip_special: bool = True) -> list[str]:
        batch = batch.tolist() if isinstance(batch, torch.Tensor) else [list(ids) for ids in batch]
        return self.backend.decode_batch(batch, skip_special_tokens=skip_special)

    def tokens(self, ids) -> list[str]:
        """The vocabulary pieces of `ids` (for inspection: value-vector top tokens, the CLI)."""
        return [self.backend.id_to_token(int(i)) for i in ids]

    def pad(self, seqs: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """Stack id lists into (input_ids [B,T], attention_mask [B,T]) LongTensors padded with pad_id.

        Left padding is what batched generation wants (every row's last token is real); right padding is
        what training wants (positions start at 0 without relying on the mask).
        """
        if side not in ("left", "right"):
            raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
        if len(seqs) == 0:
            raise ValueError("pad() needs at least one sequence")
        rows = [torch.as_tensor(list(s), dtype=torch.long) for s in seqs]
        input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.pad_id,
                                                    padding_side=side)  # [B, T]
        lengths = torch.tensor([len(r) for r in rows])  # [B]
        positions = torch.arange(input_ids.shape[1])  # [T]
        if side == "right":
            attention_mask = positions[None, :] < lengths[:, None]  # [B, T]
        else:
            attention_mask = positions[None, :] >= (input_ids.shape[1] - lengths)[:, None]  # [B, T]
        return input_ids, attention_mask.long()

    # ---------------------------------------------------------------- saving and loading directories

    def save(self, out_dir) -> None:
        """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json (AutoTokenizer-loadable)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        special = {name: self.backend.id_to_token(i) for name, i in names.items() if i is not None}
        config = {**self.config, "tokenizer_class": "PreTrainedTokenizerFast", **special,
                  "add_bos_token": self.add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False}
        write_text(out_dir / "tokenizer.json", self.backend.to_str())
        write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        write_text(out_dir / "special_tokens_map.json", json.dumps(special, indent=2, ensure_ascii=False))

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Load tokenizer.json, or GPT-2 vocab.json + merges.txt, from a model directory."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: tokenizer directory does not exist")
        if (path / "tokenizer.json").is_file():
            try:
                backend = Backend.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # the Rust parser's messages are specific but say nothing of the file
                raise ValueError(f"{path / 'tokenizer.json'}: not a valid tokenizer.json ({e})") from None
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            backend = _byte_level_from_vocab_merges(path / "vocab.json", path / "merges.txt")
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json and no vocab.json + merges.txt")
        tok_config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        model_config = _read_json(path / "config.json")

        # A GPT-2 vocab knows nothing of which tokens are special; tokenizer_config.json does.
        added = [AddedToken(t["content"], special=bool(t.get("special")), normalized=bool(t.get("normalized")))
                 for t in tok_config.get("added_tokens_decoder", {}).values()]
        if added and not (path / "tokenizer.json").is_file():
            backend.add_tokens(added)

        def configured(name: str) -> int | None:
            for source in (tok_config, special_map):
                token = source.get(f"{name}_token")
                token = token.get("content") if isinstance(token, dict) else token
                if isinstance(token, str) and backend.token_to_id(token) is not None:
                    return backend.token_to_id(token)
            token_id = model_config.get(f"{name}_token_id")
            token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
            return token_id if isinstance(token_id, int) else None

        # What the source's own post-processor adds decides add_bos when no config says.
        with_special = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
        template_bos = with_special[0] if len(with_special) > len(plain) and with_special[0] != plain[0] else None

        bos_id = configured("bos")
        bos_id = bos_id if bos_id is not None else template_bos
        bos_id = bos_id if bos_id is not None else _conventional(backend, CONVENTIONAL_BOS)
        eos_id = configured("eos")
        eos_id = eos_id if eos_id is not None else _conventional(backend, CONVENTIONAL_EOS)
        if eos_id is None:
            raise ValueError(f"{path}: no eos token: set eos_token in tokenizer_config.json or "
                             f"eos_token_id in config.json")
        add_bos = tok_config.get("add_bos_token")
        add_bos = bool(add_bos) if add_bos is not None else template_bos is not None
        for token_id in (bos_id, eos_id):  # decode(skip_special=True) must drop them
            if token_id is not None:
                backend.add_special_tokens([backend.id_to_token(token_id)])
        return cls(backend, bos_id, eos_id, configured("pad"), add_bos, config=tok_config)

    # ---------------------------------------------------------------- GGUF

    @classmethod
    def from_gguf_fields(cls, fields: dict, cache_dir=None) -> "Tokenizer":
        """Build from the `tokenizer.ggml.*` values of a GGUF file (keys with or without that prefix).

        model "llama": SentencePiece BPE with scores (Gemma, Llama 2); model "gpt2": byte-level BPE with
        merges (Llama 3, SmolLM2). With `cache_dir`, the rebuilt tokenizer.json is stored there under a hash
        of the fields, so later loads skip the (seconds-long) merge derivation.
        """
        fields = _normalize_fields(fields)
        kind = fields["model"]
        if kind == "llama":
            default_add_bos = True  # llama.cpp adds BOS to a SentencePiece vocab that does not say otherwise
        elif kind == "gpt2":
            default_add_bos = False
        else:
            raise ValueError(f"GGUF field tokenizer.ggml.model: unsupported tokenizer {kind!r} "
                             f"(supported: 'llama', 'gpt2')")
        n_vocab = len(fields["tokens"])
        for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
            if key in fields and not 0 <= fields[key] < n_vocab:
                raise ValueError(f"GGUF field tokenizer.ggml.{key}: id {fields[key]} outside vocab of {n_vocab}")
        if "eos_token_id" not in fields:
            raise ValueError("GGUF field tokenizer.ggml.eos_token_id: missing")

        cached = None
        if cache_dir is not None:
            digest = hashlib.sha256(json.dumps([GGUF_BUILD_VERSION, fields], sort_keys=True).encode()).hexdigest()
            cached = Path(cache_dir) / f"gguf-tokenizer-{digest[:24]}.json"
        backend = None
        if cached is not None and cached.is_file():
            try:
                backend = Backend.from_file(str(cached))
            except Exception:  # unreadable entry (e.g. from another tokenizers version): rebuild it below
                backend = None
        if backend is None:
            backend = _sentencepiece_from_gguf(fields) if kind == "llama" else _byte_level_from_gguf(fields)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_text(cached, backend.to_str())
        carried = {"chat_template": fields["chat_template"]} if isinstance(fields.get("chat_template"), str) else {}
        return cls(backend, fields.get("bos_token_id"), fields["eos_token_id"], fields.get("padding_token_id"),
                   bool(fields.get("add_bos_token", default_add_bos)), config=carried)


def left_truncate(ids, max_tokens, bos_id=None):
    """The last max_tokens of a token list, its leading BOS (when bos_id is given) kept in front: the end of a
    prompt is what its continuation follows, and a model trained with BOS drifts without it. The one cut of
    this kind: generation prompts, DPO prompts (dpo.tokenize_pairs) and scored contexts (evaluate.fit_context)."""
    if len(ids) <= max_tokens:
        return ids
    head = ids[:1] if bos_id is not None and ids[:1] == [bos_id] else []
    return head + ids[len(ids) - (max_tokens - len(head)):]


def read_gguf_tokenizer_fields(path) -> dict:
    """The `tokenizer.ggml.*` metadata of a GGUF file as plain Python values, keys without the prefix."""
    # checkpoint.py's own header parser, not gguf.GGUFReader, which builds a numpy view per element of the
    # 262k-entry token array and is far slower (timings in bench/README.md).
    meta = checkpoint.read_gguf_metadata(path)
    prefix = "tokenizer.ggml."
    return {key[len(prefix):]: value for key, value in meta.items() if key.startswith(prefix)}


# -------------------------------------------------------------------------------- builders


def _normalize_fields(fields: dict) -> dict:
    """Strip the key prefix and turn numpy arrays/bytes into plain lists/str, so hashing and checks are uniform."""
    prefix = "tokenizer.ggml."
    out = {}
    for key, value in fields.items():
        key = key[len(prefix):] if key.startswith(prefix) else key
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8")
        if isinstance(value, (list, tuple)):
            value = [v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else v for v in value]
        out[key] = value
    for key in ("model", "tokens"):
        if key not in out:
            raise ValueError(f"GGUF field tokenizer.ggml.{key}: missing")
    n_vocab = len(out["tokens"])
    for key in ("scores", "token_type"):
        if key in out and len(out[key]) != n_vocab:
            raise ValueError(f"GGUF field tokenizer.ggml.{key}: {len(out[key])} entries for {n_vocab} tokens")
    return out


def _sentencepiece_from_gguf(fields: dict) -> Backend:
    """SentencePiece BPE -> tokenizers BPE, reproducing transformers' GGUF conversion (and so HF's Gemma).

    SentencePiece encodes by repeatedly merging the adjacent pair whose union has the best score. A
    tokenizers BPE model does the same given merges ranked by that score: every split of a piece into two
    in-vocab pieces is a merge, ranked by the piece it makes.
    """
    tokens = list(fields["tokens"])
    n_vocab = len(tokens)
    types = list(fields.get("token_type") or [NORMAL] * n_vocab)
    scores = list(fields.get("scores") or [-float(i) for i in range(n_vocab)])

    # llama.cpp's converter writes user-defined pieces with "▁" already turned back into " " (it matches them
    # in raw text). Like transformers, spell whitespace runs back as "▁" runs and leave them to the BPE model,
    # whose top-ranked merges rebuild them from the normalized text.
    respelled = {i for i, token in enumerate(tokens) if types[i] == USER_DEFINED and token and set(token) == {" "}}
    for i in respelled:
        tokens[i] = "▁" * len(tokens[i])
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != n_vocab:
        raise ValueError(f"GGUF field tokenizer.ggml.tokens: {n_vocab - len(vocab)} duplicate tokens")

    # Merge rank = rank of the piece it makes. Pieces whose GGUF score is a placeholder (-1000 for control
    # and user-defined pieces, which SentencePiece matches before any BPE) rank first, in id order, as in
    # SentencePiece's own piece order; normal pieces follow by score (a stable sort keeps ties in id order).
    # This equals transformers' order wherever it can change a result (Gemma's scores fall with id).
    placeholder = [i for i in range(n_vocab) if types[i] != NORMAL]
    by_score = sorted((i for i in range(n_vocab) if types[i] == NORMAL), key=scores.__getitem__, reverse=True)
    pieces = [tokens[i] for i in placeholder + by_score if len(tokens[i]) > 1]
    # Every cut of a piece into two in-vocab halves is a merge, longer left half first (like transformers).
    # A flat comprehension over dict lookups: Gemma's 262k pieces give 515k merges, so this loop is the hot spot.
    merges = [(p[:cut], p[cut:]) for p in pieces for cut in range(len(p) - 1, 0, -1)
              if p[:cut] in vocab and p[cut:] in vocab]

    unk_id = fields.get("unknown_token_id")
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id] if unk_id is not None else None,
                                 fuse_unk=True, byte_fallback=True))
    if fields.get("add_space_prefix", False):
        # Metaspace with prepend_scheme="first" prefixes "▁" once per text, not once per added-token split.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        backend.normalizer = normalizers.Replace(" ", "▁")
    strip_prefix = [decoders.Strip(" ", 1, 0)] if fields.get("add_space_prefix", False) else []
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + strip_prefix)
    _add_typed_tokens(backend, [t for i, t in enumerate(tokens) if i not in respelled],
                      [k for i, k in enumerate(types) if i not in respelled])
    return backend


def _byte_level_from_gguf(fields: dict) -> Backend:
    """Byte-level BPE: tokens are already in GPT-2's byte-to-unicode alphabet, merges are "left right" strings."""
    tokens = list(fields["tokens"])
    if "merges" not in fields:
        raise ValueError("GGUF field tokenizer.ggml.merges: missing (needed for model 'gpt2')")
    merges = []
    for index, merge in enumerate(fields["merges"]):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"GGUF field tokenizer.ggml.merges[{index}]: expected 'left right', got {merge!r}")
        merges.append((parts[0], parts[1]))
    pre = fields.get("pre", "default")
    if pre in LLAMA3_PRE:
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
        pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                 use_regex=False)])
    elif pre in DIGITS_THEN_GPT2_PRE:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre in GPT2_PRE:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raise ValueError(f"GGUF field tokenizer.ggml.pre: unknown pre-tokenizer {pre!r} (known: "
                         f"{', '.join(LLAMA3_PRE + DIGITS_THEN_GPT2_PRE + GPT2_PRE)})")
    vocab = {token: i for i, token in enumerate(tokens)}
    # Llama 3's tokenizer.json emits a whole pre-token that is itself in the vocab without merging.
    backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in LLAMA3_PRE))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    _add_typed_tokens(backend, tokens, list(fields.get("token_type") or [NORMAL] * len(tokens)))
    return backend


def _add_typed_tokens(backend: Backend, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens: both are matched
    whole in the raw text before the model runs, as llama.cpp and SentencePiece do."""
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == USER_DEFINED])


def _byte_level_from_vocab_merges(vocab_path: Path, merges_path: Path) -> Backend:
    vocab = _read_json(vocab_path)
    merges = []
    with open(merges_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or (line_no == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{merges_path}:{line_no}: expected 'left right', got {line!r}")
            for part in parts:
                if part not in vocab:
                    raise ValueError(f"{merges_path}:{line_no}: merge part {part!r} not in {vocab_path.name}")
            merges.append((parts[0], parts[1]))
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _conventional(backend: Backend, names: tuple[str, ...]) -> int | None:
    for name in names:
        if backend.token_to_id(name) is not None:
            return backend.token_to_id(name)
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}:1: expected a JSON object, got {type(data).__name__}")
    return data


def load_tokenizer(path, cache_dir=None) -> Tokenizer:
    """A model directory or a .gguf file -> Tokenizer."""
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file does not exist")
        return Tokenizer.from_gguf_fields(read_gguf_tokenizer_fields(path), cache_dir=cache_dir)
    return Tokenizer.from_dir(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Inspect or convert a tokenizer: print the ids and pieces of some text, decode ids, "
                    "or save the tokenizer as an AutoTokenizer-loadable directory.",
        epilog="examples:\n  python tokenizer.py ~/.cache/gemma3.gguf --text 'Hallo Welt'\n"
               "  python tokenizer.py model_dir --decode 2 9259 1902\n"
               "  python tokenizer.py model.gguf --save out_dir   # GGUF -> tokenizer.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="model directory (tokenizer.json, or vocab.json + merges.txt) or a .gguf file")
    parser.add_argument("--text", action="append", default=[],
                        help="text to encode; repeat the flag for several texts (encoded as one batch)")
    parser.add_argument("--decode", type=int, nargs="+", metavar="ID", help="token ids to decode back to text")
    parser.add_argument("--no-special", action="store_true",
                        help="encode without adding BOS and decode keeping special tokens (default: add BOS when "
                             "the model wants it, drop special tokens when decoding)")
    parser.add_argument("--save", metavar="DIR", help="write tokenizer.json + tokenizer_config.json + "
                                                      "special_tokens_map.json into DIR")
    parser.add_argument("--cache-dir", help="where a tokenizer rebuilt from a .gguf is cached (default: "
                                            "checkpoint.py's cache dir + /tokenizers, i.e. $DPO_ML_CACHE or "
                                            "~/.cache/dpo-multilingual)")
    args = parser.parse_args(argv)
    check_outputs([], [("the tokenizer", args.path)], folders=[("--save", args.save)])
    if args.cache_dir is None:
        args.cache_dir = checkpoint.cache_dir() / "tokenizers"
    start = time.perf_counter()
    tok = load_tokenizer(args.path, cache_dir=args.cache_dir)
    print(f"loaded {args.path} in {time.perf_counter() - start:.2f}s: vocab {tok.vocab_size}, "
          f"bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}, add_bos {tok.add_bos}")
    for text, ids in zip(args.text, tok.encode_batch(args.text, add_special=not args.no_special)):
        print(json.dumps({"text": text, "ids": ids, "tokens": tok.tokens(ids)}, ensure_ascii=False))
    if args.decode:
        print(json.dumps({"ids": args.decode, "text": tok.decode(args.decode, skip_special=not args.no_special)},
                         ensure_ascii=False))
    if args.save:
        tok.save(args.save)
        print(f"saved to {args.save}")


if __name__ == "__main__":
    exit_on_error(main)
