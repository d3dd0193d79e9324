"""
Every dataset the reproduction reads, from the vendored copies in data/ (see data/README.md for sources
and licenses; RTP-LX and the Indonesian word list are NON-COMMERCIAL).

    preference pairs   load_pairs(path): Lee et al.'s `toxicity_pairwise` jsonl (prompt_text,
                       unpert_gen_text = chosen, pert_gen_text = rejected) or generic (prompt, chosen,
                       rejected); write_toxicity_pairwise(pairs, path) writes the former.
    RTP-LX             load_rtplx(lang): the paper's evaluation prompts in 17 languages (prompt_toxicity: 3 native
                       annotators), with toxic and benign completions of unstated origin (none for ru); rtplx_pairs(lang): those as DPO pairs.
    the split          default_split(seed): English RTP-LX pairs for DPO training/validation, and per
                       language the held-out prompts (for generation) and pairs (for margins).
    pair builder       rtplx_pairs normalises whitespace on both sides and drops rows with LLM-prompt scaffolding
                       (rtplx_pair_counts); dpo.tokenize_pairs cuts both sides to one token length, no EOS.
                       pair_confounds(pairs, tokenizer): length/newline/markup ROC-AUCs of the pairs as trained;
                       placebo_pairs / placebo_split: rejected = another item's benign completion.
    parallel items     parallel_eval_items(split, n): the same RTP-LX indices held out in all 17 languages.
    parallel prompts   load_parallel(lang): the paper's 200 RTP-LX English prompts translated into 16
                       languages, line-aligned (bilingual retrieval, activation analysis).
    prompts            load_prompts(path): RTP-LX official json, parallel jsonl, generic jsonl, plain .txt.
    lexicons           data/wordlists, read by scorers.read_wordlist_files (terms and stems apart).
    Tatoeba            load_tatoeba(lang): 1,000 line-aligned X-English sentence pairs (non-toxic retrieval).

The paper trains DPO on 24,576 PPLM-generated pairs (Lee et al. 2024) that cannot be obtained offline;
the English RTP-LX (prompt, benign, toxic) triples stand in as ~1k real pairs. Because RTP-LX is also the
evaluation set, evaluation in every language skips each prompt that shares an RTP-LX index (outside
English, also a neighbouring one) with a training or validation pair, and the 200 parallel prompts (RTP-LX
English indices 0-199) never go to training.

Bad input raises ValueError naming file, line and field, e.g. `pairs.jsonl:7: missing field 'chosen'` or
`pairs.jsonl:9: not UTF-8 (byte 0xe9 at column 31: invalid continuation byte)`.

    python data.py split                        # split sizes per language
    python data.py export-pairs --out train.jsonl
    python data.py export-pairs --placebo --out placebo.jsonl   # rejected = another item's benign completion
    python data.py confounds --tokenizer gemma-3-270m --max-len 96   # length/newline/markup AUCs as trained
    python data.py check-pairs my_pairs/ --skip-bad
"""

import argparse
import codecs
import difflib
import functools
import html
import json
import random
import re
import unicodedata
from pathlib import Path

from checkpoint import cache_dir, resolve_checkpoint
from dpo import tokenize_pairs
from report import check_flags, exit_on_error, write_text
from stats import roc_auc
from tokenizer import load_tokenizer

# The paper's 17 languages in its order (alphabetical by ISO 639-1 code).
LANGS = ("ar", "cs", "de", "en", "es", "fr", "hi", "id", "it", "ja", "ko", "nl", "pl", "pt", "ru", "sv", "zh")
DATA_DIR = Path(__file__).resolve().parent / "data"
# Scripts written without spaces between words: a continuation is glued to the prompt directly.
NO_SPACE_LANGS = ("ja", "zh")


def check_lang(lang, flag=None):
    """ValueError unless `lang` is one of LANGS, naming the flag it came from when given."""
    if lang not in LANGS:
        raise ValueError(f"{flag + ': ' if flag else ''}unknown language {lang!r}; expected one of {' '.join(LANGS)}")


# -----------------------------------------------------------------------------
# jsonl with file:line errors


def _parse_json_line(text, path, line):
    """One jsonl line -> dict, or ValueError naming path:line."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
    return row


def decode_utf8(raw, path, first_line=1):
    """Bytes of a file (from line `first_line` on) -> str, or ValueError 'path:LINE: not UTF-8 (...)'. A UTF-8
    byte-order mark at the start of the file is dropped: Windows editors write one, and it is no prompt text."""
    if first_line == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {column}: {e.reason}); "
                         "save the file as UTF-8") from None


def utf8_lines(path):
    """Yield (line_number, str) of each line of a UTF-8 file, split at \\n only (as jsonl is; a JSON string may
    hold a raw U+2028, which str.splitlines() would take for a line break)."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            yield line, decode_utf8(raw, path, line)


def iter_jsonl(path):
    """Yield (line_number, dict) for each non-blank line; line numbers are 1-based like an editor's."""
    for line, text in utf8_lines(path):
        if text.strip():
            yield line, _parse_json_line(text, path, line)


def read_jsonl(path):
    """A jsonl file -> list of dicts. A malformed or non-object line raises ValueError 'path:LINE: ...'."""
    return [row for _, row in iter_jsonl(path)]


def require(row, field, path, line):
    """row[field] as a non-empty string, else ValueError 'path:LINE: missing field ...'."""
    value = row.get(field)
    if value is None:
        raise ValueError(f"{path}:{line}: missing field {field!r}")
    if not isinstance(value, str):
        raise ValueError(f"{path}:{line}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{path}:{line}: missing field {field!r} (empty string)")
    return value


# -----------------------------------------------------------------------------
# Preference pairs: Lee et al.'s toxicity_pairwise format and a generic one

# field names per format: (prompt, chosen, rejected)
PAIR_FIELDS = {
    "toxicity_pairwise": ("prompt_text", "unpert_gen_text", "pert_gen_text"),
    "generic": ("prompt", "chosen", "rejected"),
}


def _row_to_pair(row, path, line):
    """Detect the format from the row's keys (files may mix them) and return a pair dict."""
    for fmt, fields in PAIR_FIELDS.items():
        if any(f in row for f in fields):
            prompt, chosen, rejected = (require(row, f, path, line) for f in fields)
            pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": f"{path}:{line}"}
            if "index" in row:
                pair["index"] = row["index"]
            return pair
    raise ValueError(
        f"{path}:{line}: not a preference pair: expected fields prompt/chosen/rejected or "
        f"prompt_text/unpert_gen_text/pert_gen_text, got {sorted(row)}"
    )


def load_pairs(path, skip_bad=False):
    """
    Preference pairs from a .jsonl file or a directory of them (sorted by name, like Lee et al.'s
    data/toxicity_pairwise/). Returns (pairs, n_skipped); each pair is a dict with prompt, chosen,
    rejected, source ("file:line") and index when the row has one. A malformed line (not UTF-8, not a JSON
    object) or a missing/empty field raises ValueError naming file and line, unless skip_bad, which drops and counts such rows.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"{path}: directory has no .jsonl files")
    elif path.exists():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    pairs, n_skipped = [], 0
    for file in files:
        with open(file, "rb") as f:
            for line, raw in enumerate(f, 1):
                try:  # inside the try: skip_bad skips an undecodable line like any other malformed one
                    text = decode_utf8(raw, file, line)
                    if text.strip():
                        pairs.append(_row_to_pair(_parse_json_line(text, file, line), file, line))
                except ValueError:
                    if not skip_bad:
                        raise
                    n_skipped += 1
    return pairs, n_skipped


def train_valid_pairs(path=None, valid_path=None, valid_frac=0.05, skip_bad=False):
    """(train pairs, valid pairs, n_skipped) for DPO: the pairs of `path` and `valid_path`; without valid_path a
    valid_frac share of `path` (a fixed seed: the split does not move with the training seed); without path the
    English RTP-LX pairs of default_split()."""
    if path is None:
        split = default_split()
        return split["train"], split["valid"], 0
    pairs, n_skipped = load_pairs(path, skip_bad=skip_bad)
    if valid_path is not None:
        valid, n_skipped_valid = load_pairs(valid_path, skip_bad=skip_bad)
        if not pairs or not valid:
            empty = path if not pairs else valid_path
            raise ValueError(f"{empty}: no usable pairs")
        return pairs, valid, n_skipped + n_skipped_valid
    if len(pairs) < 2:
        raise ValueError(f"{path}: {len(pairs)} usable pair(s); need at least 2 (train + validation)")
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)  # fixed seed: the validation split does not move with --seed
    n_valid = min(len(pairs) - 1, max(1, round(valid_frac * len(pairs))))
    return [pairs[i] for i in order[n_valid:]], [pairs[i] for i in order[:n_valid]], n_skipped


def write_toxicity_pairwise(pairs, path):
    """
    Write pairs in Lee et al.'s format (prompt_text, unpert_gen_text = chosen, pert_gen_text = rejected),
    atomically, so the official repo's DPO code reads ours. `index` is kept when present (their loader
    ignores extra keys); load_pairs reads the file back to the same prompt/chosen/rejected/index.
    """
    lines = []
    for pair in pairs:
        row = {"prompt_text": pair["prompt"], "unpert_gen_text": pair["chosen"], "pert_gen_text": pair["rejected"]}
        if "index" in pair:
            row["index"] = pair["index"]
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_text(path, "".join(lines))


# -----------------------------------------------------------------------------
# RTP-LX

_QUOTES = str.maketrans({c: '"' for c in "“”„‟«»「」『』‘’‚‛'`´"})


def _letters(text):
    """
    Keep only letters, marks and digits (casefolded, NFKC) and remember where each came from:
    returns (key string, original position per key char). Comparing keys ignores the quote, bracket,
    spacing and case edits that RTP-LX's toxic completions make when they repeat the prompt.
    """
    keys, positions = [], []
    for i, ch in enumerate(text):
        for c in unicodedata.normalize("NFKC", ch).casefold():
            if unicodedata.category(c)[0] in "LMN":
                keys.append(c)
                positions.append(i)
    return "".join(keys), positions


def strip_repeated_prompt(prompt, text, space_delimited=True):
    """
    RTP-LX completions often restate the prompt before continuing; return (continuation, how) with that
    restatement removed. how is "exact" (text starts with prompt), "normalized" (equal after dropping
    quotes/punctuation/case), "fuzzy" (the completion restates the prompt with edits: a dropped "MORE:"
    label, a fixed typo) or "none" (text returned unchanged).
    """
    if text.startswith(prompt):
        return text[len(prompt):], "exact"
    p_keys, p_pos = _letters(prompt)
    # A restatement sits at the start; the head of the text is all the search below can use.
    t_keys, t_pos = _letters(text[: 2 * len(prompt) + 40])
    if not p_keys or not t_keys:
        return text, "none"
    if t_keys.startswith(p_keys):
        n_keys, how, whole_word = len(p_keys), "normalized", True
    else:
        # Look for the prompt in order near the start of the text. Thresholds were read off the data:
        # genuine restatements keep >= half the prompt's letters in blocks of >= 3, reach its last
        # letters, and start within the first quarter; unrelated continuations never do all three.
        window = t_keys[: len(p_keys) + len(p_keys) // 4 + 8]
        matcher = difflib.SequenceMatcher(None, p_keys, window, autojunk=False)
        blocks = [b for b in matcher.get_matching_blocks() if b.size >= 3]
        if (
            not blocks
            or sum(b.size for b in blocks) < 0.5 * len(p_keys)
            or blocks[-1].a + blocks[-1].size < len(p_keys) - 2
            or blocks[0].b > len(p_keys) // 4 + 3
        ):
            return text, "none"
        n_keys, how = blocks[-1].b + blocks[-1].size, "fuzzy"
        whole_word = blocks[-1].a + blocks[-1].size == len(p_keys)
    cut = t_pos[n_keys - 1] + 1
    if not whole_word and space_delimited:
        # The prompt's last word was restated with an edit (bachwo -> bachwu): finish that word.
        while cut < len(text) and not text[cut].isspace() and unicodedata.category(text[cut])[0] in "LM":
            cut += 1
    rest = text[cut:]
    # The prompt's trailing punctuation ('here,') is usually repeated too: drop the copy.
    tail = prompt[p_pos[-1] + 1:].strip().translate(_QUOTES)
    if tail and rest.lstrip().translate(_QUOTES).startswith(tail):
        rest = rest.lstrip()[len(tail):]
    return rest, how


def as_continuation(text, space_delimited=True):
    """
    Make a completion follow its prompt by plain concatenation, as Lee et al.'s continuations do.
    RTP-LX stores completions without leading whitespace, so both sides of a pair get the same rule
    (one space before a word in spaced scripts): a spacing difference between chosen and rejected
    would be a free signal for DPO to learn instead of toxicity.
    """
    text = text.lstrip()
    if space_delimited and text and _starts_word(text):
        return " " + text
    return text


def _starts_word(text):
    """Does text open a new word ('so', '(so', '„so', '"so') rather than close one (', so', '" he')?"""
    category = unicodedata.category(text[0])
    if category[0] in "LN" or category in ("Ps", "Pi"):
        return True
    # a straight quote opens a quotation when a word follows it at once
    return text[0] in "\"'" and len(text) > 1 and unicodedata.category(text[1])[0] in "LN"


def load_rtplx(lang, data_dir=DATA_DIR):
    """
    RTP-LX prompts for one language: list of dicts with index (int, the RTP-LX prompt id), prompt
    (surrounding whitespace stripped), prompt_toxicity (mean native-annotator score, 1-5; >= 3 is
    roughly toxic), toxic_completion and benign_completion (str or None; None for all of ru).
    """
    check_lang(lang)
    return [dict(row) for row in _rtplx_rows(lang, Path(data_dir))]


# Cached because the split and evaluation read each language several times and the prompt matching in
# rtplx_pairs is slow; callers get copies so the cache cannot be mutated.
@functools.lru_cache(maxsize=None)
def _rtplx_rows(lang, data_dir):
    path = data_dir / "rtp-lx" / f"{lang}.jsonl"
    rows = []
    for line, row in iter_jsonl(path):
        try:
            index = int(row.get("index"))
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{line}: field 'index' must be an integer, got {row.get('index')!r}") from None
        completions = {}
        for field in ("toxic_completion", "benign_completion"):
            value = row.get(field)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{path}:{line}: field {field!r} must be a string or null")
            completions[field] = value
        rows.append({
            "index": index,
            "prompt": require(row, "prompt", path, line).strip(),
            "prompt_toxicity": row.get("prompt_toxicity"),
            **completions,
            "source": f"{path}:{line}",
        })
    return tuple(rows)


# LLM-prompt scaffolding that some RTP-LX toxic completions carry (the generator echoed its instructions):
# a line labelled as the prompt/passage/... ("Prompt: A Texan, a Jew and a vegan walk into a bar...\n\nPassage:"),
# "The prompt is:", a completion opening with "Here is ...", a markdown header. Read off the data: en drops 10
# of 999 rows (5 "Prompt:" lines, 4 of them followed by "Passage:"; 1 "The prompt is"; 2 "Here is one"; 1
# "Scenario:"; 1 "Example:"); cs/id/nl/pl/pt/sv repeat the English labels (id also "Promp:"), zh uses 提示/完成提示/写作段落/段落, hi "Translation:". Speaker labels of dialogues ("Tom:") are
# content, not scaffolding, and stay.
SCAFFOLDING = re.compile(
    r"(?im)^\s*(?:prompts?|promp|passage|continuation|completion|scenario|example|translation"
    r"|提示|完成提示|写作段落|段落)\s*[:：]"
    r"|\bthe prompt is\b"
    r"|\A\s*here (?:is|are)\b"
    r"|^\s*#{1,6}\s")


def has_scaffolding(text, prompt=""):
    """Does a completion carry LLM-prompt scaffolding (see SCAFFOLDING)? A marker the prompt itself holds is a
    restatement, not scaffolding ('So here is a reminder' -> 'Here is a reminder ...')."""
    return any(m.group(0).strip().casefold() not in prompt.casefold() for m in SCAFFOLDING.finditer(text))


def normalize_whitespace(text):
    """Runs of whitespace (newlines included) -> one space, ends stripped. Applied to both sides of a pair: 654 of
    999 English toxic completions hold a paragraph break and no benign one does, a free signal for DPO."""
    return re.sub(r"\s+", " ", text).strip()


def rtplx_pairs(lang, data_dir=DATA_DIR):
    """
    RTP-LX rows as DPO pairs: chosen = benign completion, rejected = toxic completion, both with any
    restated prompt stripped, whitespace normalised (normalize_whitespace) and made to follow the prompt by
    concatenation. Rows without both completions (all of ru) and rows whose completions carry LLM-prompt
    scaffolding (has_scaffolding) are dropped; rtplx_pair_counts(lang) counts them. Each pair has prompt,
    chosen, rejected, index, lang, source and stripped (how the toxic completion's restated prompt was
    removed; see strip_repeated_prompt). This is the one text-level builder for training and held-out
    margins; dpo.tokenize_pairs then cuts both sides to a common token length without EOS.
    """
    check_lang(lang)
    return [dict(pair) for pair in _rtplx_pairs(lang, Path(data_dir))[0]]


def rtplx_pair_counts(lang, data_dir=DATA_DIR):
    """{rows, no_completions, scaffolding, prompt_only, kept}: what rtplx_pairs kept and dropped, and why."""
    check_lang(lang)
    return dict(_rtplx_pairs(lang, Path(data_dir))[1])


@functools.lru_cache(maxsize=None)
def _rtplx_pairs(lang, data_dir):
    spaced = lang not in NO_SPACE_LANGS
    pairs, counts = [], {"rows": 0, "no_completions": 0, "scaffolding": 0, "prompt_only": 0, "kept": 0}
    for row in _rtplx_rows(lang, data_dir):
        counts["rows"] += 1
        benign, toxic = row["benign_completion"], row["toxic_completion"]
        if not benign or not toxic or not benign.strip() or not toxic.strip():
            counts["no_completions"] += 1
            continue
        if has_scaffolding(benign, row["prompt"]) or has_scaffolding(toxic, row["prompt"]):
            counts["scaffolding"] += 1
            continue
        chosen = strip_repeated_prompt(row["prompt"], benign, spaced)[0]
        rejected, how = strip_repeated_prompt(row["prompt"], toxic, spaced)
        # A restatement cut that leaves a letter first ended inside a word ('prosím, ne' + 'kupujte'):
        # glue it on as written. Otherwise both sides follow the same spacing rule.
        mid_word = how != "none" and rejected[:1].isalpha()
        chosen, rejected = normalize_whitespace(chosen), normalize_whitespace(rejected)
        if not chosen or not rejected:
            counts["prompt_only"] += 1  # the completion was only the prompt again
            continue
        chosen = as_continuation(chosen, spaced)
        rejected = rejected if mid_word else as_continuation(rejected, spaced)
        pairs.append({
            "prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
            "index": row["index"], "lang": lang, "source": row["source"], "stripped": how,
        })
    counts["kept"] = len(pairs)
    return tuple(pairs), counts


# -----------------------------------------------------------------------------
# Parallel prompts, prompt files, word lists, Tatoeba


def load_parallel(lang, data_dir=DATA_DIR):
    """The paper's 200 parallel prompts in one language (field Prompt; their translations are
    HTML-escaped, e.g. &quot;, so they are unescaped). Line i is the same prompt in every language."""
    check_lang(lang)
    path = Path(data_dir) / "parallel" / f"dpo_toxicity_pairwise_{lang}_200.jsonl"
    return [html.unescape(require(row, "Prompt", path, line)) for line, row in iter_jsonl(path)]


def normalize_prompt(text):
    """Key for matching the same prompt across files: HTML-unescaped, NFKC, quotes unified, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", html.unescape(text)).translate(_QUOTES)
    return re.sub(r"\s+", " ", text).strip()


def lang_from_path(path):
    """The language a file name names: the first part of it (split at _ . - and spaces, lowercased) that is a
    code of LANGS, else None. RTP_LX_ZH-Hans.json -> zh, dpo_toxicity_pairwise_de_200.jsonl -> de, en.txt -> en."""
    for part in re.split(r"[_.\-\s]+", Path(path).name.lower()):
        if part in LANGS:
            return part
    return None


# What load_prompts reads. Anything else is refused rather than read as text: a CSV read line by line would make
# its header a prompt and glue ",en" onto every other one.
PROMPT_SUFFIXES = (".json", ".jsonl", ".txt")


def load_prompts(path):
    """
    Prompts for generation from any of: the official RTP-LX files RTP_LX_{LANG}.json (a JSON list or
    jsonl of objects with field Prompt), the parallel jsonl (Prompt), generic jsonl (prompt, optional
    lang), or plain text .txt (one prompt per line, blank lines skipped). Returns a list of dicts with prompt
    and, when known (row field, else file name), lang. Another suffix, a file with no prompt, undecodable bytes
    or an empty prompt raise ValueError naming the file (and line).
    """
    path = Path(path)
    if path.suffix.lower() not in PROMPT_SUFFIXES:
        raise ValueError(f"{path}: not a prompt file; expected {', '.join(PROMPT_SUFFIXES)} (a .txt file holds one "
                         "prompt per line)")
    file_lang = lang_from_path(path)
    text = decode_utf8(path.read_bytes(), path)
    if path.suffix.lower() == ".txt":
        items = [(line, {"prompt": s}) for line, s in enumerate(text.splitlines(), 1) if s.strip()]
    else:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # not one JSON document: read it as jsonl
        if isinstance(whole, list):
            # a JSON list has no line per item, so errors name the item: "file:item 3"
            items = [(f"item {n}", row) for n, row in enumerate(whole, 1)]
        else:
            items = [(line, _parse_json_line(s, path, line)) for line, s in enumerate(text.split("\n"), 1) if s.strip()]
    prompts = []
    for line, row in items:
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
        prompt = require(row, "Prompt" if "Prompt" in row else "prompt", path, line)
        item = {"prompt": html.unescape(prompt).strip()}
        if not item["prompt"]:  # '&nbsp;' passes require's check but unescapes to whitespace
            raise ValueError(f"{path}:{line}: the prompt is only whitespace")
        lang = row.get("lang") or file_lang
        if lang:
            item["lang"] = lang
        prompts.append(item)
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def load_tatoeba(lang, data_dir=DATA_DIR):
    """1,000 Tatoeba sentence pairs between lang and English: (xx_sentences, en_sentences), line-aligned."""
    check_lang(lang)
    if lang == "en":
        raise ValueError("tatoeba pairs are X-English; there is no en-en set")
    root = Path(data_dir) / "tatoeba"
    xx = (root / f"{lang}-en.{lang}").read_text(encoding="utf-8").splitlines()
    en = (root / f"{lang}-en.en").read_text(encoding="utf-8").splitlines()
    if len(xx) != len(en):
        raise ValueError(f"{root}/{lang}-en: {len(xx)} {lang} lines but {len(en)} en lines; files must be line-aligned")
    return xx, en


# -----------------------------------------------------------------------------
# The split


def default_split(seed=0, n_train=None, n_valid=50, n_heldout=400, block=10, data_dir=DATA_DIR):
    """
    Deterministic split of RTP-LX for English-only DPO and 17-language evaluation.

    Units are RTP-LX indices (the id of a source prompt, shared by its transcreations). English indices
    are grouped in blocks of `block` consecutive ids; every block holding one of the 200 parallel prompts
    (matched to English RTP-LX by normalised text) is held out, then blocks drawn with `seed` are held out
    until `n_heldout` English indices are, `n_valid` more go to validation, and the rest to training.
    Evaluation in language L keeps the rows whose index is not a training/validation index; for L != en
    also not one off, because in cs de es fr it zh the ids drift by one near the end of the file
    (de id 990 restates en id 989) -- blocks make that guard cost only block edges.

    Returns a dict:
      train, valid          English RTP-LX pairs (shuffled by seed; train truncated to n_train if given,
                            which leaves the held-out sets unchanged)
      eval_prompts[lang]    held-out rows {index, prompt, prompt_toxicity, lang} for generation
      eval_pairs[lang]      held-out benign/toxic pairs for margin evaluation ([] for ru)
      info                  seed, parallel_matched, and the parallel/train/valid/held-out English index lists
    """
    rng = random.Random(seed)
    en_rows = load_rtplx("en", data_dir)
    en_pairs = rtplx_pairs("en", data_dir)
    en_indices = sorted(r["index"] for r in en_rows)
    parallel_keys = {normalize_prompt(p) for p in load_parallel("en", data_dir)}
    parallel_idx = {r["index"] for r in en_rows if normalize_prompt(r["prompt"]) in parallel_keys}

    blocks = {}
    for i in en_indices:
        blocks.setdefault(i // block, []).append(i)
    heldout = {b for b in blocks if parallel_idx & set(blocks[b])}
    others = [b for b in sorted(blocks) if b not in heldout]
    rng.shuffle(others)
    n_held = sum(len(blocks[b]) for b in heldout)
    train_idx, valid_idx = set(), set()
    for b in others:
        if n_held < n_heldout:
            n_held += len(blocks[b])
        elif len(valid_idx) < n_valid:
            valid_idx.update(blocks[b])
        else:
            train_idx.update(blocks[b])
    seen = train_idx | valid_idx

    train = [p for p in en_pairs if p["index"] in train_idx]
    valid = [p for p in en_pairs if p["index"] in valid_idx]
    rng.shuffle(train)
    rng.shuffle(valid)
    if n_train is not None:
        train = train[:n_train]

    def held_out(lang, index):
        if lang == "en":
            return index not in seen
        return not ({index - 1, index, index + 1} & seen)

    eval_prompts, eval_pairs = {}, {}
    for lang in LANGS:
        eval_prompts[lang] = [
            {"index": r["index"], "prompt": r["prompt"], "prompt_toxicity": r["prompt_toxicity"], "lang": lang}
            for r in load_rtplx(lang, data_dir) if held_out(lang, r["index"])
        ]
        eval_pairs[lang] = [p for p in rtplx_pairs(lang, data_dir) if held_out(lang, p["index"])]
    info = {
        "seed": seed,
        "parallel_matched": len(parallel_idx),
        "parallel_indices": sorted(parallel_idx),
        "train_indices": sorted(train_idx),
        "valid_indices": sorted(valid_idx),
        "heldout_indices": sorted(set(en_indices) - seen),
    }
    return {"train": train, "valid": valid, "eval_prompts": eval_prompts, "eval_pairs": eval_pairs, "info": info}


def parallel_eval_items(split, n_items, seed=0):
    """
    {lang: [rows {index, prompt, prompt_toxicity, lang}]}: n_items (None: all) evaluation prompts with the SAME
    RTP-LX indices in all 17 languages, so per-language results compare one set of source prompts. Indices come from
    those held out in every language (split["eval_prompts"], with its +-1 drift guard outside English) and
    present in every file; the parallel prompts (English indices 0-199) come first, then the others, each
    group in an order drawn with seed. Rows keep the order of the indices. Near the end of the cs de es fr it zh
    files an index may hold the transcreation of its English neighbour (see default_split).
    """
    common = None
    for lang in LANGS:
        indices = {r["index"] for r in split["eval_prompts"][lang]}
        common = indices if common is None else common & indices
    n_items = len(common) if n_items is None else n_items
    if n_items > len(common):
        raise ValueError(f"n_items {n_items} > {len(common)} indices held out in all {len(LANGS)} languages")
    rng = random.Random(seed)
    parallel = sorted(common & set(split["info"]["parallel_indices"]))
    others = sorted(common - set(parallel))
    rng.shuffle(parallel)
    rng.shuffle(others)
    chosen = (parallel + others)[:n_items]
    items = {}
    for lang in LANGS:
        first = {}
        for r in split["eval_prompts"][lang]:
            first.setdefault(r["index"], r)  # an index listed twice in a file: its first row
        items[lang] = [dict(first[i]) for i in chosen]
    return items


# -----------------------------------------------------------------------------
# Placebo pairs and confound checks


def placebo_pairs(pairs, seed=0):
    """
    A placebo for toxicity DPO: the same prompts, chosen = the pair's own chosen (benign) completion, rejected
    = ANOTHER pair's chosen completion, assigned by a seeded derangement (a random single cycle, Sattolo's
    algorithm: no pair gets its own). Both sides are benign RTP-LX text through the same builder, so they match
    in length, style and spacing and differ in no toxicity; the rejected side is only off-topic for its prompt.
    Each pair keeps prompt, chosen, index, lang, source and gets rejected and rejected_from (the donor's index).
    """
    if len(pairs) < 2:
        raise ValueError(f"placebo pairs need at least 2 pairs to derange, got {len(pairs)}")
    rng = random.Random(seed)
    donor = list(range(len(pairs)))
    for i in range(len(donor) - 1, 0, -1):
        j = rng.randrange(i)  # j < i (never i itself) makes one n-cycle: a derangement
        donor[i], donor[j] = donor[j], donor[i]
    out = []
    for pair, d in zip(pairs, donor):
        placebo = {k: v for k, v in pair.items() if k not in ("rejected", "stripped")}
        placebo["rejected"] = pairs[d]["chosen"]
        placebo["rejected_from"] = pairs[d].get("index", d)
        out.append(placebo)
    return out


def placebo_split(split, seed=0):
    """default_split's dict with train and valid replaced by placebo_pairs (held-out sets unchanged), so the
    pipeline writes them as it writes the real ones: write_toxicity_pairwise(placebo_split(s)["train"], path)."""
    return {**split, "train": placebo_pairs(split["train"], seed), "valid": placebo_pairs(split["valid"], seed),
            "info": {**split["info"], "placebo_seed": seed}}


# HTML tags, URLs, markdown links, headers and list bullets.
MARKUP = re.compile(r"<[A-Za-z/][^>]*>|https?://|www\.|\[[^\]]+\]\([^)]+\)|^\s*#{1,6}\s|^\s*[-*]\s", re.MULTILINE)


def pair_confounds(pairs, tokenizer=None, max_prompt_len=64, max_len=256):
    """
    How well surface features alone tell the rejected side from the chosen one, on the texts AS TRAINED: ROC-AUC
    of "rejected vs chosen" (0.5: no signal; 1.0 or 0.0: a perfect free signal) by character length, newline,
    markup (MARKUP) and, given a tokenizer, token length. With a tokenizer the responses go through
    dpo.tokenize_pairs (the common token cut) and are decoded back, so the texts are what the model sees.
    Returns {n_pairs, auc: {feature: auc}, mean_chosen: {feature: mean}, mean_rejected: {feature: mean}}.
    """
    if tokenizer is None:
        chosen, rejected = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
        tokens = None
    else:
        examples = tokenize_pairs(tokenizer, pairs, max_prompt_len, max_len)
        n_prompt = [len(ex["prompt_input_ids"]) for ex in examples]
        ids = {side: [ex[f"{side}_input_ids"][n:] for ex, n in zip(examples, n_prompt)] for side in ("chosen", "rejected")}
        chosen, rejected = (tokenizer.decode_batch(ids[side]) for side in ("chosen", "rejected"))
        tokens = ([len(x) for x in ids["chosen"]], [len(x) for x in ids["rejected"]])
    features = {"chars": (lambda texts: [len(t) for t in texts]),
                "newline": (lambda texts: [float("\n" in t or "\r" in t) for t in texts]),
                "markup": (lambda texts: [float(MARKUP.search(t) is not None) for t in texts])}
    values = {name: (f(chosen), f(rejected)) for name, f in features.items()}
    if tokens is not None:
        values["tokens"] = tokens
    labels = [0] * len(pairs) + [1] * len(pairs)
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    return {"n_pairs": len(pairs),
            "auc": {name: roc_auc(c + r, labels) for name, (c, r) in values.items()},
            "mean_chosen": {name: mean(c) for name, (c, _) in values.items()},
            "mean_rejected": {name: mean(r) for name, (_, r) in values.items()}}


def load_tokenizer_of(model):
    """The tokenizer of a model name/path (an embedded name, HF dir, .gguf), without loading the weights."""
    return load_tokenizer(resolve_checkpoint(model), cache_dir=cache_dir() / "tokenizers")


# -----------------------------------------------------------------------------
# CLI


def split_table(split):
    """Markdown table of split sizes per language."""
    lines = [
        "| lang | eval prompts | eval pairs |",
        "|---|---:|---:|",
    ]
    for lang in LANGS:
        lines.append(f"| {lang} | {len(split['eval_prompts'][lang])} | {len(split['eval_pairs'][lang])} |")
    return "\n".join(lines)


def split_flags():
    """The flags that shape default_split, shared by split, export-pairs and confounds."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--seed", type=int, default=0,
                       help="seed for the block shuffle, pair order and placebo derangement (default 0)")
    flags.add_argument("--n-train", type=int, default=None, help="keep only this many training pairs (default: all)")
    flags.add_argument("--n-valid", type=int, default=50, help="English indices for validation (default 50)")
    flags.add_argument("--n-heldout", type=int, default=400,
                       help="English indices held out for evaluation, the 200 parallel prompts included (default 400)")
    flags.add_argument("--data-dir", default=str(DATA_DIR), help="the vendored data folder (default: data/ beside data.py)")
    return flags


def pair_flags():
    """Which English pairs export-pairs and confounds read."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--which", choices=("train", "valid"), default="train", help="which English pairs (default train)")
    flags.add_argument("--placebo", action="store_true",
                       help="placebo pairs instead (placebo_pairs): rejected = another item's benign completion")
    return flags


def split_of(args):
    check_flags(args, {"n_train": 0, "n_valid": 0, "n_heldout": 0})
    return default_split(args.seed, args.n_train, args.n_valid, args.n_heldout, data_dir=Path(args.data_dir))


def chosen_pairs(args):
    """(pairs, description) of --which (placebo with --placebo) from the split these flags make."""
    split = split_of(args)
    pairs = placebo_split(split, args.seed)[args.which] if args.placebo else split[args.which]
    return pairs, f"{'placebo ' if args.placebo else ''}{args.which}"


def run_split(args):
    split = split_of(args)
    info = split["info"]
    print(f"seed {info['seed']}: {len(split['train'])} train pairs, {len(split['valid'])} valid pairs (English RTP-LX)")
    print(f"parallel prompts matched to English RTP-LX: {info['parallel_matched']} of "
          f"{len(load_parallel('en', Path(args.data_dir)))} (held out)")
    print(f"held-out English indices: {len(info['heldout_indices'])}")
    stripped = {}
    for p in split["train"] + split["valid"]:
        stripped[p["stripped"]] = stripped.get(p["stripped"], 0) + 1
    print("restated prompt removed from toxic completions (train+valid): "
          + ", ".join(f"{k} {v}" for k, v in sorted(stripped.items())))
    counts = rtplx_pair_counts("en", Path(args.data_dir))
    print(f"English RTP-LX rows dropped before the split: {counts['scaffolding']} with LLM-prompt scaffolding, "
          f"{counts['no_completions']} without both completions, {counts['prompt_only']} only restating the prompt")
    print(split_table(split))


def run_export_pairs(args):
    pairs, source = chosen_pairs(args)
    write_toxicity_pairwise(pairs, args.out)
    print(f"wrote {len(pairs)} {source} pairs to {args.out}")


def run_confounds(args):
    if args.tokenizer and not 1 <= args.max_prompt_len < args.max_len:  # train_config's rule, so cuts match training
        raise ValueError(f"--max-len ({args.max_len}) must exceed --max-prompt-len ({args.max_prompt_len}), "
                         "which must be >= 1, to leave room for a response")
    pairs, source = (load_pairs(args.pairs)[0], args.pairs) if args.pairs else chosen_pairs(args)
    tokenizer = load_tokenizer_of(args.tokenizer) if args.tokenizer else None
    result = pair_confounds(pairs, tokenizer, args.max_prompt_len, args.max_len)
    how = f"{args.tokenizer} tokens, max_len {args.max_len}" if tokenizer else "texts as built, untokenized"
    print(f"{result['n_pairs']} {source} pairs ({how}); ROC-AUC of rejected vs chosen (0.5 = no signal):")
    for name, auc in result["auc"].items():
        print(f"  {name:8s} AUC {auc:.3f}   mean chosen {result['mean_chosen'][name]:.3f}, "
              f"rejected {result['mean_rejected'][name]:.3f}")


def run_check_pairs(args):
    pairs, n_skipped = load_pairs(args.path, skip_bad=args.skip_bad)
    print(f"{args.path}: {len(pairs)} pairs, {n_skipped} skipped")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    splitting, which = split_flags(), pair_flags()
    sub.add_parser("split", parents=[splitting], help="print the train/valid sizes and held-out eval sizes per "
                   "language").set_defaults(run=run_split)
    export = sub.add_parser("export-pairs", parents=[splitting, which],
                            help="write a split's English pairs in Lee et al.'s toxicity_pairwise jsonl format")
    export.add_argument("--out", required=True, help="output .jsonl path (written atomically)")
    export.set_defaults(run=run_export_pairs)
    confounds = sub.add_parser("confounds", parents=[splitting, which],
                               help="ROC-AUC of rejected vs chosen by length, newline and markup on the pairs as trained")
    confounds.add_argument("--pairs", default=None, help="a pairs .jsonl file or directory instead of the split's pairs")
    confounds.add_argument("--tokenizer", default=None,
                           help="model whose tokenizer cuts the pairs as train_dpo does (e.g. gemma-3-270m); adds "
                                "token length. Omitted: the texts as built, untokenized")
    confounds.add_argument("--max-prompt-len", type=int, default=64, help="as train_dpo --max-prompt-len (default 64)")
    confounds.add_argument("--max-len", type=int, default=256,
                           help="as train_dpo --max-len (default 256; the CPU preset trains at 96)")
    confounds.set_defaults(run=run_confounds)
    check = sub.add_parser("check-pairs", help="validate a pairs .jsonl file or directory and count its pairs")
    check.add_argument("path", help="a .jsonl file or a directory of .jsonl files")
    check.add_argument("--skip-bad", action="store_true", help="count and skip malformed rows instead of stopping")
    check.set_defaults(run=run_check_pairs)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    exit_on_error(main)
