"""
Every dataset the reproduction reads, from the data root (root(): --data-root, $TOXDPO_DATA, ../shared/data, else
the user cache), never from copies in the repo. DATASETS lists each one's origin, license, citation and the sha256
of every file; data/README.md is the catalogue. RTP-LX, the Indonesian tweets and HateBR are NON-COMMERCIAL.

    data root          root(), path(dataset, *parts), need(dataset); `python data.py fetch [NAME...]` downloads
                       from the pinned origins (resumable, sha256-checked) into the root.
    text references    results keep {"ref": "rtp-lx/en/123#prompt", "sha": ...} instead of dataset texts;
                       text_ref(...) makes one, resolve_ref(...) reads the text back and checks its hash.
    preference pairs   load_pairs(path): Lee et al.'s `toxicity_pairwise` jsonl (prompt_text,
                       unpert_gen_text = chosen, pert_gen_text = rejected) or generic (prompt, chosen,
                       rejected), texts or references; write_toxicity_pairwise(pairs, path) writes the former.
    RTP-LX             load_rtplx(lang): the paper's evaluation prompts in 17 languages (prompt_toxicity: 3 native
                       annotators), with toxic and benign completions of unstated origin (none for ru); rtplx_pairs(lang): those as DPO pairs.
    pair builder       rtplx_pairs normalises whitespace on both sides and drops rows with LLM-prompt scaffolding
                       (rtplx_pair_counts); dpo.tokenize_pairs cuts both sides to one token length, no EOS.
    parallel prompts   load_parallel(lang): the paper's 200 RTP-LX English prompts translated into 16
                       languages, line-aligned (bilingual retrieval, activation analysis).
    prompts            load_prompts(path): RTP-LX official json, parallel jsonl, generic jsonl, plain .txt.
    lexicons           wordlists/ under the root and the repo's data/wordlists/supplement.json, read by scorers.
    Tatoeba            load_tatoeba(lang): 1,000 line-aligned X-English sentence pairs (non-toxic retrieval).

The split, placebo pairs and confound checks (the experiment's design) are in design.py.

Bad input raises ValueError naming file, line and field, e.g. `pairs.jsonl:7: missing field 'chosen'` or
`pairs.jsonl:9: not UTF-8 (byte 0xe9 at column 31: invalid continuation byte)`.

    python data.py fetch                         # every dataset missing under the root
    python data.py fetch davidson tatoeba --data-root ~/data
    python data.py check-pairs my_pairs/ --skip-bad
"""

import argparse
import codecs
import dataclasses
import difflib
import functools
import hashlib
import html
import http.client
import json
import os
import re
import shutil
import unicodedata
import urllib.error
import urllib.request
from pathlib import Path

from report import exit_on_error, write_text

# The paper's 17 languages in its order (alphabetical by ISO 639-1 code).
LANGS = ("ar", "cs", "de", "en", "es", "fr", "hi", "id", "it", "ja", "ko", "nl", "pl", "pt", "ru", "sv", "zh")
# Scripts written without spaces between words: a continuation is glued to the prompt directly.
NO_SPACE_LANGS = ("ja", "zh")



def check_lang(lang, flag=None):
    """ValueError unless `lang` is one of LANGS, naming the flag it came from when given."""
    if lang not in LANGS:
        raise ValueError(f"{flag + ': ' if flag else ''}unknown language {lang!r}; expected one of {' '.join(LANGS)}")


# -----------------------------------------------------------------------------
# The data root: other people's datasets live outside the repo

# The project's own data (the trained judges, the hand-made word-list supplement) stays in the repo.
REPO_DATA = Path(__file__).resolve().parent / "data"
DATA_ENV = "TOXDPO_DATA"
_root_override = None  # set by --data-root


def set_root(path):
    """Use `path` as the data root for the rest of this process (the --data-root flag)."""
    global _root_override
    _root_override = Path(path)


def add_root_flag(parser):
    """The --data-root flag, the same in every command that reads a dataset; apply_root_flag(args) uses it."""
    parser.add_argument("--data-root", default=None, metavar="DIR", help=f"where the third-party datasets are "
                        f"(default: ${DATA_ENV}, else ../shared/data beside the repo, else "
                        "~/.cache/dpo-multilingual/data)")


def apply_root_flag(args):
    """Make the parsed --data-root (add_root_flag) the data root of this process, when given."""
    if getattr(args, "data_root", None):
        set_root(args.data_root)


def root():
    """
    Where the third-party datasets are: --data-root, else $TOXDPO_DATA, else ../shared/data beside the repo when
    it exists (this workspace and CI), else the user cache ($XDG_CACHE_HOME or ~/.cache)/dpo-multilingual/data,
    which `python data.py fetch` fills. The layout under it is the same everywhere: one folder per dataset
    (DATASETS[name].folder).
    """
    if _root_override is not None:
        return _root_override
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    shared = REPO_DATA.parent.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpo-multilingual" / "data"


def path(dataset, *parts):
    """A dataset's folder (or a file in it) under the data root: path("rtp-lx", "en.jsonl"). Nothing is checked
    here (module constants call it at import); readers call need(dataset) first."""
    return root() / DATASETS[dataset].folder / Path(*parts)


class MissingData(FileNotFoundError):
    """A dataset is not under the data root. The message is the one line a user needs: what and how to fetch."""


def missing_files(dataset):
    """Names of the dataset's files (those the product reads: all but license notes) absent under the root."""
    return [f for f in DATASETS[dataset].files if not f.startswith(NOTE_FILES) and not path(dataset, f).is_file()]


def _data_root(data_dir, dataset):
    """data_dir (a root a caller gave, e.g. a test's folder) as a Path, else root() once `dataset` is there."""
    if data_dir is not None:
        return Path(data_dir)
    need(dataset)
    return root()


def need(dataset):
    """MissingData naming the dataset, the root and the fetch command unless its files are under the root."""
    missing = missing_files(dataset)
    if missing:
        raise MissingData(f"{dataset}: {len(missing)} file(s) missing under {root()} (e.g. {missing[0]}); "
                          f"run `python data.py fetch {dataset}` or point {DATA_ENV} / --data-root at a copy")


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
    """row[field] as a non-empty string (a text reference resolved: resolve_ref), else ValueError
    'path:LINE: missing field ...'."""
    value = row.get(field)
    if isinstance(value, dict):
        value = resolve_ref(value, f"{path}:{line}")
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



def write_toxicity_pairwise(pairs, path, refs=False):
    """
    Write pairs in Lee et al.'s format (prompt_text, unpert_gen_text = chosen, pert_gen_text = rejected),
    atomically, so the official repo's DPO code reads ours. `index` is kept when present (their loader
    ignores extra keys); load_pairs reads the file back to the same prompt/chosen/rejected/index. refs: RTP-LX
    pairs (rtplx_pairs, design.placebo_pairs) are written as text references (pair_refs), not their texts.
    """
    lines = []
    for pair in pairs:
        texts = pair_refs(pair) if refs else (pair["prompt"], pair["chosen"], pair["rejected"])
        row = dict(zip(PAIR_FIELDS["toxicity_pairwise"], texts))
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


def load_rtplx(lang, data_dir=None):
    """
    RTP-LX prompts for one language: list of dicts with index (int, the RTP-LX prompt id), prompt
    (surrounding whitespace stripped), prompt_toxicity (mean native-annotator score, 1-5; >= 3 is
    roughly toxic), toxic_completion and benign_completion (str or None; None for all of ru).
    """
    check_lang(lang)
    return [dict(row) for row in _rtplx_rows(lang, _data_root(data_dir, "rtp-lx"))]


# Cached because the split and evaluation read each language several times and the prompt matching in
# rtplx_pairs is slow; callers get copies so the cache cannot be mutated.
@functools.lru_cache(maxsize=None)
def _rtplx_rows(lang, data_dir):
    path = data_dir / DATASETS["rtp-lx"].folder / f"{lang}.jsonl"
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


def rtplx_pairs(lang, data_dir=None):
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
    return [dict(pair) for pair in _rtplx_pairs(lang, _data_root(data_dir, "rtp-lx"))[0]]


def rtplx_pair_counts(lang, data_dir=None):
    """{rows, no_completions, scaffolding, prompt_only, kept}: what rtplx_pairs kept and dropped, and why."""
    check_lang(lang)
    return dict(_rtplx_pairs(lang, _data_root(data_dir, "rtp-lx"))[1])


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


def load_parallel(lang, data_dir=None):
    """The paper's 200 parallel prompts in one language (field Prompt; their translations are
    HTML-escaped, e.g. &quot;, so they are unescaped). Line i is the same prompt in every language."""
    check_lang(lang)
    folder = _data_root(data_dir, "official-assets") / DATASETS["official-assets"].folder
    path = folder / "translated_pairwise_data" / f"dpo_toxicity_pairwise_{lang}_200.jsonl"
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
        if isinstance(row.get("prompt"), dict):
            item["prompt_ref"] = row["prompt"]  # generate.py writes the reference, not the text, into its rows
        if not item["prompt"]:  # '&nbsp;' passes require's check but unescapes to whitespace
            raise ValueError(f"{path}:{line}: the prompt is only whitespace")
        lang = row.get("lang") or file_lang
        if lang:
            item["lang"] = lang
        prompts.append(item)
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def load_tatoeba(lang, data_dir=None):
    """1,000 Tatoeba sentence pairs between lang and English: (xx_sentences, en_sentences), line-aligned."""
    check_lang(lang)
    if lang == "en":
        raise ValueError("tatoeba pairs are X-English; there is no en-en set")
    folder = _data_root(data_dir, "tatoeba") / DATASETS["tatoeba"].folder
    xx = (folder / f"{lang}-en.{lang}").read_text(encoding="utf-8").splitlines()
    en = (folder / f"{lang}-en.en").read_text(encoding="utf-8").splitlines()
    if len(xx) != len(en):
        raise ValueError(f"{folder}/{lang}-en: {len(xx)} {lang} lines but {len(en)} en lines; files must be line-aligned")
    return xx, en




# -----------------------------------------------------------------------------
# The datasets: where each comes from, under what terms, and the sha256 of every file


@dataclasses.dataclass(frozen=True)
class Dataset:
    folder: str           # under the data root
    what: str
    origin: str           # the public source, at a pinned commit where one is known
    base: str | None      # URL prefix the files' origin paths are joined to; None: nothing to download
    license: str
    non_commercial: bool
    citation: str
    processed: str | None  # why some files cannot be downloaded as they are here (None: all can)
    files: dict            # {path in folder: (path at the origin or None, sha256)}


# A file whose name starts so is a license or provenance note beside the data: checked when present, never read.
NOTE_FILES = ("LICENSE", "NOTICE", "README", "rtp-lx_metadata")

CONTENT_WARNING = ("Content warning: these datasets hold real toxic text (slurs, threats, sexual and hateful "
                   "language in many languages) by design: they are what the paper measures.")

DATASETS = {
    "rtp-lx": Dataset(
        folder="rtp-lx",
        what="RTP-LX, the paper's evaluation set: {lang}.jsonl for 17 languages (index, prompt, prompt_toxicity, toxic_completion, benign_completion)",
        origin="https://github.com/microsoft/RTP-LX/tree/aae2534775cde4c607ddb83991cea48b9e7d1e1d/RTP-LX",
        base=None,
        license="CC BY-NC 4.0 (data), MIT (code), Apache-2.0 (RealToxicityPrompts notice)", non_commercial=True,
        citation="de Wynter et al. 2024, RTP-LX: Can LLMs Evaluate Toxicity in Multilingual Scenarios? arXiv:2404.14397",
        processed="the origin holds RTP_LX_{LANG}.json (26 languages); these 17 jsonl files were converted from them with each completion cut to 600 characters, so fetch cannot rebuild them byte for byte",
        files={
            "LICENSE": (None, "05ee4c82d91d011f41956f228dab74a737d1642c9554ad17a61e9e75532227b3"),
            "NOTICE": (None, "9b3de8e4284df25e16562e3468262be2961ab5c59d955d998dc0e7d424f06751"),
            "ar.jsonl": (None, "0e16458ca08946c629eac71efe65fc62f6944eba9af42b48181f40b1e970d465"),
            "cs.jsonl": (None, "3dbc5835d50ad31bc84a6f06ed7b1462d82029bfb407a38efa6e5f4b9e2bf157"),
            "de.jsonl": (None, "6c1946edb41c012a0470f52e75d4b2a6be405620c2d698acc1754faf477fbd7f"),
            "en.jsonl": (None, "9e1e5ad5bd8e72c4b2641fcef5f5f1459858eca2358ff956f89ee7ec08ad8162"),
            "es.jsonl": (None, "b4366c38949671cc87c2032bc550a678a7736c764403e3e9032778442eb549b7"),
            "fr.jsonl": (None, "33e944886d408ddd90f097801c4d5028750ce282d5f4fd1e03ecda43fe47ffd1"),
            "hi.jsonl": (None, "549b3f42d04f32391b78059f3dbf22b30c34f104a5bd85b7d0c8532326d42cd1"),
            "id.jsonl": (None, "e4cbebfd334c880894dcb1ee1950bfa0aaaca4734f6591682e1e8aef90386a67"),
            "it.jsonl": (None, "d13a024c92604308c05139303ca7bead82d8661de43ad15772f5c849af72bbba"),
            "ja.jsonl": (None, "914f8288db1415689e7856af2334f10deb23988083355ca3d6396cb5ebcf80fa"),
            "ko.jsonl": (None, "1c09a95ff64a3baf29a2dd17085a9f759a592d78b5e6106d4cb873a92477fe01"),
            "nl.jsonl": (None, "d6227d1353913b3e1410efa6912e838706c9776d9b414abf5f7a15aa1641bc65"),
            "pl.jsonl": (None, "a0150781bf339b8f9a9b039ad1ab398e36f86d626c2a554b30613fff5e1bad6c"),
            "pt.jsonl": (None, "e6361ea08cbb69889f27e856d06fe86ce4f9e3078342a5bc913759a76158aa06"),
            "rtp-lx_metadata.json": (None, "89f296e3759b8cc7e01a58ce41cb8dd37337c0c59b3541567d67deeeda474b2d"),
            "ru.jsonl": (None, "0bc88ae5e85ef292b63449f49de54da185cfff5c06be2fe670d61b6c6ff3b294"),
            "sv.jsonl": (None, "7aafdae1afe2a4f8c284a6a94faec11311cbca9eee5db5287b441771496efb08"),
            "zh.jsonl": (None, "59da0ebec15db6a76a07b544c8c7e84d3857647b671d3e576edc53f714ebbf84"),
    }),
    "official-assets": Dataset(
        folder="official-assets",
        what="the paper's 200 parallel prompts (translated_pairwise_data/), its mGPT probe, toxic value vectors and neuron activations",
        origin="https://github.com/BatsResearch/cross-lingual-detox/tree/4aa428300fe8967a67961a129810e4c8a1835f89/assets",
        base="https://raw.githubusercontent.com/BatsResearch/cross-lingual-detox/4aa428300fe8967a67961a129810e4c8a1835f89/",
        license="BSD-3-Clause, (c) 2024 Brown University", non_commercial=False,
        citation="Li, Yong & Bach 2024, Preference Tuning For Toxicity Mitigation Generalizes Across Languages, arXiv:2406.16235",
        processed="the two mgpt_*.json files were extracted from the repository's notebooks and assets/neuron-activations.pkl; fetch gets the prompts, probe and license only",
        files={
            "LICENSE": ('LICENSE', "2330c9582b8b0200ffde1a28ca24309a3fc5e36f658039046826b4593c0b33a4"),
            "english-probe-mgpt.pt": ('assets/weights/english-probe.pt', "0cadecb6703828d1fad9c817bac6f7ee1eab41e7910eb51d9afb173c55aff804"),
            "mgpt_toxic_neuron_activations.json": (None, "5c5ffd08de38ccbc011e563072fc2404c69abe30a4cb0e5b03f4eaf7132ebeaf"),
            "mgpt_toxic_value_vectors.json": (None, "4918963575aaeb52449323965092fd122455797f5b79a65837552d34d32f6291"),
            "translated_pairwise_data/dpo_toxicity_pairwise_ar_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_ar_200.jsonl', "57b4b577fba4900b1b4d3e3e5c2809e1070d2cd63a6883e2fe7ee4223c76e512"),
            "translated_pairwise_data/dpo_toxicity_pairwise_cs_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_cs_200.jsonl', "aeeafb8be5d502a88b4d459e12bc0bb3217858dec14ba3203be1bdc65ee77009"),
            "translated_pairwise_data/dpo_toxicity_pairwise_de_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_de_200.jsonl', "948435e98709f4ffc5a87fcc9cc29d355f5485edf34b35659be17a9d4ad75e7c"),
            "translated_pairwise_data/dpo_toxicity_pairwise_en_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_en_200.jsonl', "8d0e4be5d3842f2a4300a3e843361cb8314c0fd82291bd20332fba5c00a96adc"),
            "translated_pairwise_data/dpo_toxicity_pairwise_es_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_es_200.jsonl', "b1babfa720498f54a3c5c5eed0c1c54b3b03840ea13a2153a593104b10d80927"),
            "translated_pairwise_data/dpo_toxicity_pairwise_fr_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_fr_200.jsonl', "69fefe09b77877575233ebc2cb596dbfbe9446def2d1454f0e8e9c2971279092"),
            "translated_pairwise_data/dpo_toxicity_pairwise_hi_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_hi_200.jsonl', "f2cf1ffc0a381af57bd969b8f4b9c2266fed4d7aae0ed51acade2b7d2a923956"),
            "translated_pairwise_data/dpo_toxicity_pairwise_id_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_id_200.jsonl', "845632a40a30d261f649d8385f810419b651a39cb1cd985ceaadada76ae03d6c"),
            "translated_pairwise_data/dpo_toxicity_pairwise_it_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_it_200.jsonl', "d9ddab742ed05c942601c4d9c39f80f9f42742b15779b4cebdf9ef128f663a89"),
            "translated_pairwise_data/dpo_toxicity_pairwise_ja_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_ja_200.jsonl', "2b18bcc057daca28136f3686f4fffd112a7855265cbe95252aeaa307c7ae4f1b"),
            "translated_pairwise_data/dpo_toxicity_pairwise_ko_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_ko_200.jsonl', "359c0aa6564e3f0591bc621ba3910ef76249c3cad5a50377a204e6df6f263fbe"),
            "translated_pairwise_data/dpo_toxicity_pairwise_nl_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_nl_200.jsonl', "0a32a17fbc41c1522e5537078707ff209b23b40fda73936f75e342eacf35bc25"),
            "translated_pairwise_data/dpo_toxicity_pairwise_pl_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_pl_200.jsonl', "d0c402c3378c9392b5533360547a6ecdab4df107d977b731a935706e58a70302"),
            "translated_pairwise_data/dpo_toxicity_pairwise_pt_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_pt_200.jsonl', "d80fa5967e098b80b311f8b4074bdf548dd4ee60824d0bd8678751a5367fb700"),
            "translated_pairwise_data/dpo_toxicity_pairwise_ru_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_ru_200.jsonl', "3acd9fd65bfc791ea6c990fdbcfa77bc44fc45a4168a45417ee59cdbc64176c8"),
            "translated_pairwise_data/dpo_toxicity_pairwise_sv_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_sv_200.jsonl', "40f108af1fa8972ebf87a9b23d32492a721ab98dda871c4d637de7f84c32fd95"),
            "translated_pairwise_data/dpo_toxicity_pairwise_zh_200.jsonl": ('assets/translated_pairwise_data/dpo_toxicity_pairwise_zh_200.jsonl', "e2e56c9defce805b7bb3b640cdf1413244ca05de958fb8f065eb1a71064ceeb7"),
    }),
    "ldnoobw": Dataset(
        folder="wordlists/ldnoobw",
        what="LDNOOBW profanity lists, one term per line, 16 languages (no id)",
        origin="https://github.com/LDNOOBW/List-of-Dirty-Naughty-Obscene-and-Otherwise-Bad-Words (commit not recorded when copied; files are checked by sha256)",
        base="https://raw.githubusercontent.com/LDNOOBW/List-of-Dirty-Naughty-Obscene-and-Otherwise-Bad-Words/master/",
        license="CC BY 4.0", non_commercial=False,
        citation="Shutterstock, List of Dirty, Naughty, Obscene, and Otherwise Bad Words (LDNOOBW)",
        processed=None,
        files={
            "LICENSE": (None, "55bfbc1759943f7d19acfc68e35644b7fbe10cd8d39ab3551ce5ecff5dda9979"),
            "ar.txt": ('ar', "23dbd9c55257bf2a4965f46664dc7eac04b61ff4eb3571e41f7e964c7c3ed96b"),
            "cs.txt": ('cs', "90706df86709bade1ca39cf9f9d9836409c674fc3bffcb7525bdd20e59b596bc"),
            "de.txt": ('de', "ebe44d7772897390e27f7bec412fdcdf0efc294e4db157f8487c4cd8d4fabd55"),
            "en.txt": ('en', "af851ecef1d5f212caba17339b12ac39cc2fef7d78c74876f67237644fcee8bd"),
            "es.txt": ('es', "073334261cc2e7c08339faefd2f19f9623e8240a0ac18fe2a26c368b897496ce"),
            "fr.txt": ('fr', "79763a705e08256b393952852bb63aa903f4485e0ef02f70735f5e50efff213c"),
            "hi.txt": ('hi', "83636e9b7a5260451e09e9e471f81dad9f082d107a82da77047e57d7856ed0cc"),
            "it.txt": ('it', "d413f41018d58aa79d2c4809d0161f29ffd5652c4dc34c5b7b9ade680ee5599a"),
            "ja.txt": ('ja', "f83c4d0843ea6474c17bf171edd72b616b3af403f8613f2cde1bd841faf6f316"),
            "ko.txt": ('ko', "0dd4b74ffea6e3bb35d658e6d8262b53ee99281eaa48ecb515a2065bfcc7f69d"),
            "nl.txt": ('nl', "8298ba0cdc3ca9a1989c349b8ad0148e4504c2804f2f2fb6c2f52bfb39c5ae71"),
            "pl.txt": ('pl', "98cf824e3692255645c5a72d5913f26fd4f20930f725683b4c96bb312ca5d9b3"),
            "pt.txt": ('pt', "05ef524b0bb7f83f87257f6ec4dabf70e16b8bb6930f769fb93deaf608ff196d"),
            "ru.txt": ('ru', "2598adabd2b761733d72a68d8ee4fcc1d2c38f2f85b6ff489985c6ce1d93bf75"),
            "sv.txt": ('sv', "77f3f99a89bd3b2bde6a654741bacfcb3acca3f5c804af4d8d3fea11e09ea562"),
            "zh.txt": ('zh', "a1d9aa037c8b039ef3b40148b3364ce2ca62ce4a955b7082a16ad99f6cbd1bc0"),
    }),
    "id-abusive": Dataset(
        folder="wordlists/id-abusive",
        what="Indonesian abusive words (abusive.csv) and 13,169 labelled tweets (re_dataset.csv, latin-1)",
        origin="https://github.com/okkyibrohim/id-multi-label-hate-speech-and-abusive-language-detection (abusive.csv @ 96299db9, re_dataset.csv @ 475b3995)",
        base="https://raw.githubusercontent.com/okkyibrohim/id-multi-label-hate-speech-and-abusive-language-detection/master/",
        license="CC BY-NC-SA 4.0", non_commercial=True,
        citation="Ibrohim & Budi 2019, Multi-label Hate Speech and Abusive Language Detection in Indonesian Twitter, ALW3",
        processed=None,
        files={
            "LICENSE.txt": (None, "26f666a2b2efdbafe3934774f7c4a93f35d2757191edda3c0d8214a43288ad64"),
            "abusive.csv": ('abusive.csv', "d82db41526e4065fb3ff2825b6ce859339cd47802396460d497527b73ddb5cd3"),
            "re_dataset.csv": ('re_dataset.csv', "44c04e31ad4b7ee4a95f1884e7af4da2c44b69762143eb2de0ede7f90502735e"),
    }),
    "davidson": Dataset(
        folder="davidson",
        what="24,783 English tweets, class 0 hate speech / 1 offensive / 2 neither (labeled_data.csv)",
        origin="https://github.com/t-davidson/hate-speech-and-offensive-language/tree/6a1e3f02522963d820e302c3ad48b189552c143b",
        base="https://raw.githubusercontent.com/t-davidson/hate-speech-and-offensive-language/6a1e3f02522963d820e302c3ad48b189552c143b/",
        license="MIT", non_commercial=False,
        citation="Davidson et al. 2017, Automated Hate Speech Detection and the Problem of Offensive Language, ICWSM",
        processed=None,
        files={
            "LICENSE": ('LICENSE', "3ec8d318cf9e36fe40da3081f5a64ebe3d198ebf85a330cbebc84de90a047fb2"),
            "labeled_data.csv": ('data/labeled_data.csv', "fcb8bc7c68120ae4af04a5b9acd58585513ede11e1548ebf36a5c2040b6f6281"),
    }),
    "tatoeba": Dataset(
        folder="tatoeba",
        what="1,000 Tatoeba sentence pairs English-X for the 16 other languages, as packaged in the LASER test set",
        origin="https://github.com/facebookresearch/LASER/tree/fec5c7d63daa2bea9d127e8252b10e87278586c0/data/tatoeba/v1",
        base="https://raw.githubusercontent.com/facebookresearch/LASER/fec5c7d63daa2bea9d127e8252b10e87278586c0/",
        license="sentences CC BY 2.0 FR (Tatoeba contributors); packaging BSD (LASER)", non_commercial=False,
        citation="Artetxe & Schwenk 2019, Massively Multilingual Sentence Embeddings for Zero-Shot Cross-Lingual Transfer and Beyond, TACL",
        processed=None,
        files={
            "LICENSE.LASER": ('LICENSE', "05ec63ab2a813d0ef4c872cc2e74c71f666ea0560f92bfa31ee2f093c4ede17f"),
            "ar-en.ar": ('data/tatoeba/v1/tatoeba.ara-eng.ara', "e67a0ae072b79cd9e8eb09f166c3bc0b23488d39f5720f2ee0a8350ae17b719f"),
            "ar-en.en": ('data/tatoeba/v1/tatoeba.ara-eng.eng', "3c11838c963f598a52dcf2f452b666353538257001db5c59c3a5f54a999b336b"),
            "cs-en.cs": ('data/tatoeba/v1/tatoeba.ces-eng.ces', "0ca1f07a72f547df79288f0c6a1642176009d0b878a75534ed018fe715946f6b"),
            "cs-en.en": ('data/tatoeba/v1/tatoeba.ces-eng.eng', "ac195f54f697faaae84e9ea3e395c5c20c46d5b5bf97f4a9840fdfd2a6b183f0"),
            "de-en.de": ('data/tatoeba/v1/tatoeba.deu-eng.deu', "edfa6f75a42554df388f45891735d5e4214158a99def4b73b5908af4a3054551"),
            "de-en.en": ('data/tatoeba/v1/tatoeba.deu-eng.eng', "eb9cc83a42f2c4b22f310d05311207e41abb56c2a084666cac3ee0f84d2d0b84"),
            "es-en.en": ('data/tatoeba/v1/tatoeba.spa-eng.eng', "89e4470f4572040b1ca94b3edad97dcd8bd2f0141f072e12933b8659dadf917d"),
            "es-en.es": ('data/tatoeba/v1/tatoeba.spa-eng.spa', "f9628cea40481e8251f0999718bd893cff0f261752f5e526b3bc20284e2ca018"),
            "fr-en.en": ('data/tatoeba/v1/tatoeba.fra-eng.eng', "5634220f8a26a9a23b84753a9aec0b0832e6bdaa9da3f83e0bd84c928c3f46e3"),
            "fr-en.fr": ('data/tatoeba/v1/tatoeba.fra-eng.fra', "644172ff9642fefa9e41c29b7d6f44196518e84350dc44d4992e943c0cca92b6"),
            "hi-en.en": ('data/tatoeba/v1/tatoeba.hin-eng.eng', "adfce2269a55dbac69b25c0f4f6eb89e0f9383165485925a2e042e61b9480562"),
            "hi-en.hi": ('data/tatoeba/v1/tatoeba.hin-eng.hin', "15e4fb0a394be4438319f1d6955d1aea226e2a8c5ad38798b23b76ae43d742ed"),
            "id-en.en": ('data/tatoeba/v1/tatoeba.ind-eng.eng', "62a3f5127b60eb3526b8fa3994a68fa1a1f114f3a395307a8808a3517c05ffc5"),
            "id-en.id": ('data/tatoeba/v1/tatoeba.ind-eng.ind', "4f03cd70cba071f746eacd3ebf6b60fd5a8377ce18b4cc52edec6721f05f352a"),
            "it-en.en": ('data/tatoeba/v1/tatoeba.ita-eng.eng', "738bf8f981e42d285f4f08bc09238782d285b02050e6e95287aa4e998bb7b24b"),
            "it-en.it": ('data/tatoeba/v1/tatoeba.ita-eng.ita', "9b3f369d0ed92273b46dd3b983721636e3d15024ce7125f5103229249c386d26"),
            "ja-en.en": ('data/tatoeba/v1/tatoeba.jpn-eng.eng', "b42129b34e1bf225ccc25fc00e532a6113af98adbc6605b93021bd8aadeb68b6"),
            "ja-en.ja": ('data/tatoeba/v1/tatoeba.jpn-eng.jpn', "56040bd6949170a631039d9f8f4c6440db8761b0065c9686feba55c99a320d46"),
            "ko-en.en": ('data/tatoeba/v1/tatoeba.kor-eng.eng', "f900cf3c9b72ed5a400e1804702863ff3df00be58eb060902e02285d0e68fab3"),
            "ko-en.ko": ('data/tatoeba/v1/tatoeba.kor-eng.kor', "e550c84184ec35b1a0dab3154284719511a21746e53c40f46eb6ab08179e9188"),
            "nl-en.en": ('data/tatoeba/v1/tatoeba.nld-eng.eng', "3b8836749df573a53235b85ed6771f31bf2de428f520d2d6a1dd94b61b4ef057"),
            "nl-en.nl": ('data/tatoeba/v1/tatoeba.nld-eng.nld', "d564d4ce1c621ccaefdbe9f5cb08eacccc7bf2a0b58666303e84ca9c7973bdb7"),
            "pl-en.en": ('data/tatoeba/v1/tatoeba.pol-eng.eng', "d21cca6c6c28a9df7e8ecdc923672311ca3395241b58a5749b34854d6c65df8f"),
            "pl-en.pl": ('data/tatoeba/v1/tatoeba.pol-eng.pol', "93e1378a66dfc83fcab4cf115f3eaa2635b42648e4746478f83f71cc6291cbfd"),
            "pt-en.en": ('data/tatoeba/v1/tatoeba.por-eng.eng', "deb4568cfb7b7cbbc060a7fe97c4639fb4680842f4fcd28df791ffdbb753855a"),
            "pt-en.pt": ('data/tatoeba/v1/tatoeba.por-eng.por', "b0c926a232c9889a87a1a970f9399c5618c2d95baf204321e9da794c0aec16f5"),
            "ru-en.en": ('data/tatoeba/v1/tatoeba.rus-eng.eng', "7b26f52d6085b7c4944d6f5f6f5b6e1932085b42112f1444db515ce59e878fb8"),
            "ru-en.ru": ('data/tatoeba/v1/tatoeba.rus-eng.rus', "446ff2cae66053c2277d9735b2c2df6b786cae258385f7ade7bed68d8835c6a0"),
            "sv-en.en": ('data/tatoeba/v1/tatoeba.swe-eng.eng', "50fdff247854beaafdd5726ff6bb634278ea791abc4c68ca6072149da14dbf58"),
            "sv-en.sv": ('data/tatoeba/v1/tatoeba.swe-eng.swe', "9b2a15609f8c35b054f3b575c4e2a06812fee1c55e3ad96cdd03df85edc9bc9f"),
            "zh-en.en": ('data/tatoeba/v1/tatoeba.cmn-eng.eng', "29ba36232488f5806aceccac57c59c5e750ddd08edb40eef417e3ada9ff9a239"),
            "zh-en.zh": ('data/tatoeba/v1/tatoeba.cmn-eng.cmn', "965d033966fcd186c89741ad49ab4b0a0b2bbd33e02666635ff3b2be23c1ac1f"),
    }),
    "toxicity-extra": Dataset(
        folder="toxicity-extra",
        what="10,319 labelled toxic/clean texts from other domains: MLMA tweets (en, fr, ar) and HateBR Instagram comments (pt)",
        origin="https://github.com/HKUST-KnowComp/MLMA_hate_speech @ 479836984aeb; https://github.com/franciellevargas/HateBR @ a1301437a7b2",
        base=None,
        license="MIT (MLMA), CC BY-NC 4.0 (HateBR)", non_commercial=True,
        citation="Ousidhoum et al. 2019, Multilingual and Multi-Aspect Hate Speech Analysis, EMNLP; Vargas et al. 2022, HateBR, LREC",
        processed="cleaned, deduplicated and sampled from the origins (see its README.md), so fetch cannot rebuild it byte for byte",
        files={
            "LICENSES/HKUST-KnowComp_MLMA_hate_speech_LICENSE.txt": (None, "1b606ff3629d98e8c6ce1217016293e4deb19f5cfabfeeba246e2a7aa12ea10e"),
            "LICENSES/franciellevargas_HateBR_LICENSE.txt": (None, "0547bb58dcfaa360b149fe46e0f95527abbb06d0373f113fffc61330b6cd0e41"),
            "README.md": (None, "e397b251daea5d9ea20769832ce6b5b73c7dbb8f871c1ab3c0af102af1bd1e6c"),
            "ar.jsonl": (None, "9b3a59d8cf49ad4a9767dfaaa0b6e5cac40eabaf9781629b22b7c73de7e95df7"),
            "en.jsonl": (None, "aca291d55e9bb562dd702f4cfd3ae5e572827a69ea6445f49eeb0c7eef1ab919"),
            "fr.jsonl": (None, "7eee3148682772db051f33ddc7ec7fab774a8b36fb2dc5f67d21037dcb8e8492"),
            "pt.jsonl": (None, "6b306cb900b1c9a3895008d5ca1e979b69e28b332af049e0125270b46d0027bd"),
    }),
    "gpt2-tokenizer": Dataset(
        folder="gpt2-tokenizer",
        what="GPT-2 BPE vocab.json + merges.txt (50,257 tokens); not read by the product",
        origin="https://huggingface.co/openai-community/gpt2 (revision not recorded when copied; files are checked by sha256)",
        base="https://huggingface.co/openai-community/gpt2/resolve/main/",
        license="MIT", non_commercial=False,
        citation="Radford et al. 2019, Language Models are Unsupervised Multitask Learners",
        processed=None,
        files={
            "LICENSE": (None, "55c21bb37e0f9dc0f33b5cb35991ab3951eb04799fb70bd7b7d807abcacc002e"),
            "merges.txt": ('merges.txt', "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
            "vocab.json": ('vocab.json', "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    }),
}

# What reproduce.py reads: fetched on first use (fetch_missing).
PIPELINE_DATASETS = ("rtp-lx", "official-assets", "ldnoobw", "id-abusive", "davidson", "tatoeba")


def sha256_of(file):
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url, target, sha256, timeout=60):
    """
    url -> target, through target.part: a .part left by an interrupted download is resumed with an HTTP Range
    request (a server that ignores Range sends the whole file, which replaces it). The bytes must hash to sha256,
    else the .part is deleted and ValueError says so; only then is it renamed onto target (atomic), so target is
    never a partial or unchecked file. A network failure leaves the .part for the next try and raises ValueError.
    """
    target = Path(target)
    part = target.with_name(target.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            with open(part, "ab" if reply.status == 206 else "wb") as f:
                shutil.copyfileobj(reply, f)
            if reply.length:  # http.client ends a read early without an error when the connection drops
                raise ConnectionError(f"connection closed {reply.length} bytes short")
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: nothing left after `have` bytes, the .part is whole: check it below
            raise ValueError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        kept = part.stat().st_size if part.exists() else 0
        raise ValueError(f"{url}: download interrupted ({getattr(e, 'reason', None) or e!r}); {kept} bytes kept "
                         f"in {part}, run the fetch again to resume") from None
    got = sha256_of(part)
    if got != sha256:
        part.unlink()
        raise ValueError(f"{url}: sha256 {got} is not the pinned {sha256}; the download was deleted (the origin "
                         "changed or the URL is wrong: see data/README.md)")
    os.replace(part, target)


def fetch(dataset, timeout=60):
    """Download the dataset's files that are missing or differ under the root, check their sha256 and print the
    license and content warning. ValueError (one line) when a file the product reads cannot be downloaded."""
    spec = DATASETS[dataset]
    missing = [f for f in missing_files(dataset) if spec.files[f][0] is None or spec.base is None]
    if missing:
        raise ValueError(f"{dataset}: cannot fetch {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
                         f"{spec.processed}. Copy the folder {spec.folder}/ from a machine that has it (e.g. "
                         f"../shared/data) into {root()}, or set {DATA_ENV} to such a copy")
    for name, (origin_path, sha256) in spec.files.items():
        target = path(dataset, name)
        if origin_path is None or spec.base is None or (target.is_file() and sha256_of(target) == sha256):
            continue
        print(f"fetching {dataset}/{name} from {spec.base}{origin_path}")
        download(spec.base + origin_path, target, sha256, timeout)
    print(f"{dataset}: ready under {path(dataset)}. License: {spec.license}"
          f"{' -- NON-COMMERCIAL use only' if spec.non_commercial else ''}. Cite: {spec.citation}.")
    print(CONTENT_WARNING)


def fetch_missing(datasets=PIPELINE_DATASETS):
    """Fetch each of datasets that is not under the root (the main command calls this first)."""
    for dataset in datasets:
        if missing_files(dataset):
            print(f"{dataset}: not under {root()}; fetching it (python data.py fetch {dataset})")
            try:
                fetch(dataset)
            except ValueError as e:
                raise ValueError(f"{dataset} is missing under {root()} and could not be fetched ({e}); run "
                                 f"`python data.py fetch {dataset}` with a network, or set {DATA_ENV}") from None


# -----------------------------------------------------------------------------
# Text references: results keep ids and hashes, not the datasets' texts

REF_FIELDS = ("prompt", "benign", "toxic")  # an RTP-LX prompt, and the pair builder's chosen / rejected text
REF_PATTERN = re.compile(r"rtp-lx/([a-z]{2})/(\d+)#(prompt|benign|toxic)")


def text_sha(text):
    """The hash a reference carries: the first 16 hex digits of sha256 of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def text_ref(lang, index, field, text):
    """{"ref": "rtp-lx/{lang}/{index}#{field}", "sha": text_sha(text)}: what a result file keeps in place of the
    text of RTP-LX item `index` in `lang`; field is "prompt", or "benign" / "toxic" for the completion as
    rtplx_pairs builds it (stripped, whitespace-normalised, spaced to follow the prompt)."""
    assert field in REF_FIELDS, field
    return {"ref": f"rtp-lx/{lang}/{index}#{field}", "sha": text_sha(text)}


def pair_refs(pair):
    """(prompt, chosen, rejected) of an RTP-LX pair as text references. A placebo pair's rejected side is the
    benign completion of item pair["rejected_from"] (design.placebo_pairs)."""
    lang, index = pair["lang"], pair["index"]
    rejected = (text_ref(lang, pair["rejected_from"], "benign", pair["rejected"]) if "rejected_from" in pair
                else text_ref(lang, index, "toxic", pair["rejected"]))
    return text_ref(lang, index, "prompt", pair["prompt"]), text_ref(lang, index, "benign", pair["chosen"]), rejected


def resolve_ref(value, where):
    """The text a reference names, read under the data root and checked against its hash; ValueError naming
    `where` (FILE:LINE) for a malformed reference, an unknown item or a hash that does not match."""
    ref = value.get("ref")
    match = REF_PATTERN.fullmatch(ref) if isinstance(ref, str) and isinstance(value.get("sha"), str) else None
    if match is None or match[1] not in LANGS:
        raise ValueError(f"{where}: not a text reference: {json.dumps(value)[:80]}; expected "
                         '{"ref": "rtp-lx/LANG/INDEX#prompt|benign|toxic", "sha": "..."}')
    lang, index, field = match[1], int(match[2]), match[3]
    text = _ref_texts(lang, field == "prompt", root()).get((index, field))
    if text is None:
        raise ValueError(f"{where}: {ref}: RTP-LX {lang} has no {field} text for index {index} under {root()}")
    if text_sha(text) != value["sha"]:
        raise ValueError(f"{where}: {ref}: the text under {root()} hashes to {text_sha(text)}, the file was made "
                         f"with {value['sha']}; the dataset copy or the pair builder differs from that run's")
    return text


@functools.lru_cache(maxsize=None)
def _ref_texts(lang, prompts_only, data_root):
    """{(index, field): text} of one language; an index listed twice keeps its first row (as the split does)."""
    need("rtp-lx")
    texts = {}
    for row in _rtplx_rows(lang, data_root):
        texts.setdefault((row["index"], "prompt"), row["prompt"])
    for pair in () if prompts_only else _rtplx_pairs(lang, data_root)[0]:
        texts.setdefault((pair["index"], "benign"), pair["chosen"])
        texts.setdefault((pair["index"], "toxic"), pair["rejected"])
    return texts


def as_written(row):
    """A row read with a resolved prompt (key prompt_ref) as it goes back to a file: the reference, not the text."""
    if "prompt_ref" not in row:
        return row
    return {k: (row["prompt_ref"] if k == "prompt" else v) for k, v in row.items() if k != "prompt_ref"}


# -----------------------------------------------------------------------------
# CLI


def run_fetch(args):
    unknown = [n for n in args.names if n not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset {unknown[0]!r}; expected one of {' '.join(DATASETS)}")
    for dataset in args.names or [d for d in DATASETS if missing_files(d)]:
        fetch(dataset)
    if not args.names:
        print(f"every dataset is under {root()}")


def run_check_pairs(args):
    pairs, n_skipped = load_pairs(args.path, skip_bad=args.skip_bad)
    print(f"{args.path}: {len(pairs)} pairs, {n_skipped} skipped")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_root_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    fetching = sub.add_parser("fetch", help="download datasets from their pinned origins into the data root, "
                              "check every file's sha256, print license and content warning")
    fetching.add_argument("names", nargs="*", metavar="NAME",
                          help=f"datasets to fetch: {' '.join(DATASETS)} (default: every one missing)")
    fetching.set_defaults(run=run_fetch)
    check = sub.add_parser("check-pairs", help="validate a pairs .jsonl file or directory and count its pairs")
    check.add_argument("path", help="a .jsonl file or a directory of .jsonl files")
    check.add_argument("--skip-bad", action="store_true", help="count and skip malformed rows instead of stopping")
    check.set_defaults(run=run_check_pairs)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_root_flag(args)
    args.run(args)


if __name__ == "__main__":
    exit_on_error(main)
