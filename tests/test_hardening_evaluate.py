"""evaluate.py's hardening catalogue (issue 18): every hostile or careless input ends in one line naming the
file, line, field or flag, before anything is written. One row per case in CASES; the accepted inputs the issue
asked for (the official repo's files, long texts under --ppl-model, the fluency note) follow."""
import json
import math
from pathlib import Path

import pytest

import evaluate
from hardening import ROOT, assert_one_line_error, cli, refused


def jsonl(*rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def gen(prompt, text, lang="en", i=0, **extra):
    return {"prompt": prompt, "generated_text": text, "lang": lang, "sample_index": i, **extra}


def official(prompt, text):
    """A row of the official repo's generation output (xg/generate/vllm_script_sample.py): no lang, no index."""
    return {"prompt": prompt, "generated_text": text}


def perspective_row(text, value):
    """A row of the official repo's Perspective output (xg/eval/perspective_api_eval.py): the API's reply."""
    return {"query": text, "prompt": "p",
            "response": {"attributeScores": {"TOXICITY": {"summaryScore": {"value": value, "type": "PROBABILITY"}}}}}


# Tiny hand-written inputs, by file name; every case runs in a folder holding all of them.
FILES = {
    "G.jsonl": jsonl(gen("p", "you idiot"), gen("p", "a calm reply", i=1)),
    "A.jsonl": jsonl(gen("p", "a calm reply"), gen("p", "another calm reply", i=1)),
    "B.jsonl": jsonl(gen("q", "fine")),
    "B.lexicon.scored.jsonl": jsonl(gen("q", "fine", toxicity=0.0, scorer="lexicon:x")),
    "C.jsonl": jsonl(gen("q", "fine")),
    "C.lexicon.scored.jsonl": jsonl(gen("q", "fine", ppl="high", ppl_model="m")),
    "D.jsonl": jsonl(gen("q", "fine")),
    "D.judge.scored.jsonl": jsonl(gen("q", "fine", toxicity="high")),
    "D.lexicon.scored.jsonl": jsonl(gen("q", "fine", toxicity=0.0)),
    "E.jsonl": jsonl(gen("q", "fine"), gen("q", "you idiot", i=1)),
    "E.judge.scored.jsonl": jsonl(gen("q", "fine", toxicity=0.1), gen("q", "you idiot", i=1, toxicity=0.9)),
    "E.lexicon.scored.jsonl": jsonl(gen("q", "fine", toxicity=0.0), gen("q", "you idiot", i=1, toxicity=0.5)),
    "other_de.jsonl": jsonl(gen("q", "nett", lang="de")),
    "other_prompt.jsonl": jsonl(gen("a different prompt", "fine")),
    "output-misc.json": jsonl(official("p", "x"), official("p", "y")),
    "empty.jsonl": "",
    "types.jsonl": jsonl({"prompt": "p", "generated_text": None, "lang": "en", "sample_index": 0}),
    "list.jsonl": "[1, 2]\n",
    "index.jsonl": jsonl(gen("p", "x", i="0")),
    "perspective_api_eval-bad_en.json": jsonl({"prompt": "p", "response": {}}),
    "scores.json": jsonl(perspective_row("you idiot", 0.9)),
    "config_file": "not a folder\n",
    "run/config.json": '{"beta": "x", "model": "m"}\n',
}
BYTES = {"latin1.jsonl": jsonl(gen("p", "ok")).encode() + '{"prompt": "caf\u00e9"}\n'.encode("latin-1")}
ALL = [*FILES, *BYTES]
PERSPECTIVE = ["--scorer", "perspective", "--perspective-url", "http://127.0.0.1:9"]  # never reached


@pytest.fixture
def folder(tmp_path, monkeypatch):
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    for name, data in BYTES.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    return tmp_path


# id, argv, what the one line must say. Every file of the folder (and the outputs named in NEW) must be unchanged.
CASES = [
    # 1. an output that is an input, or another output
    pytest.param(["G.jsonl", "--json", "G.jsonl"], r"--json G.jsonl is also the generations file G.jsonl",
                 id="json-is-input"),
    pytest.param(["--before", "G.jsonl", "--after", "A.jsonl", "--md", "G.jsonl"],
                 r"--md G.jsonl is also the generations file G.jsonl", id="md-is-before"),
    pytest.param(["--before", "G.jsonl", "--after", "A.jsonl", "--svg", "./A.jsonl"],
                 r"--svg ./A.jsonl is also the generations file A.jsonl", id="svg-is-after"),
    pytest.param(["G.jsonl", "--json", "m.out", "--md", "m.out"], r"--md m.out is also --json m.out",
                 id="md-is-json"),
    pytest.param(["G.jsonl", "--json", "G.lexicon.scored.jsonl"],
                 r"--json G.lexicon.scored.jsonl is also the score cache", id="json-is-score-cache"),
    pytest.param(["B.jsonl", "B.lexicon.scored.jsonl"], r"the score cache B.lexicon.scored.jsonl is also the "
                 r"generations file", id="input-is-a-score-cache"),
    pytest.param(["G.jsonl", *PERSPECTIVE, "--perspective-cache", "G.jsonl"],
                 r"--perspective-cache G.jsonl is also the generations file", id="perspective-cache-is-input"),
    pytest.param(["G.jsonl", *PERSPECTIVE, "--perspective-scores", "scores.json", "--lang", "en", "--json",
                  "scores.json"], r"--json scores.json is also --perspective-scores", id="json-is-perspective-scores"),
    pytest.param(["G.jsonl", "--json", "sub"], r"--json sub: is a folder", id="json-is-folder"),
    pytest.param(["G.jsonl", "G.jsonl"], r"OUT.jsonl: G.jsonl given twice",
                 id="input-twice"),
    pytest.param(["agreement", "E.jsonl", "--scorers", "judge", "lexicon", "--json", "E.jsonl"],
                 r"--json E.jsonl is also the generations file", id="agreement-json-is-input"),
    pytest.param(["agreement", "E.jsonl", "--scorers", "judge", "lexicon", "--md", "E.judge.scored.jsonl"],
                 r"--md E.judge.scored.jsonl is also the judge scores of E.jsonl", id="agreement-md-is-scores"),
    pytest.param(["clean-ppl", "--json", "c.out", "--md", "c.out"], r"--md c.out is also --json c.out",
                 id="clean-ppl-md-is-json"),
    pytest.param(["clean-ppl", "--model", "G.jsonl", "--json", "G.jsonl"], r"--json G.jsonl is also --model",
                 id="clean-ppl-json-is-model"),
    pytest.param(["margins", "--policy", "x", "--out", "config_file"], r"--out config_file: is a file",
                 id="margins-out-is-file"),
    # 2. numeric flags out of range
    pytest.param(["G.jsonl", "--ppl-batch-size", "0"], r"--ppl-batch-size must be >= 1, got 0", id="ppl-batch-0"),
    pytest.param(["G.jsonl", "--ppl-max-len", "1"], r"--ppl-max-len must be >= 2", id="ppl-max-len-1"),
    pytest.param(["--before", "G.jsonl", "--after", "A.jsonl", "--n-boot", "0"], r"--n-boot must be >= 1",
                 id="n-boot-0"),
    pytest.param(["G.jsonl", "--seed", "-1"], r"--seed must be >= 0", id="seed-negative"),
    pytest.param(["G.jsonl", *PERSPECTIVE, "--qps", "nan"], r"--qps must be a finite number > 0", id="qps-nan"),
    pytest.param(["G.jsonl", *PERSPECTIVE, "--max-tries", "0"], r"--max-tries must be >= 1", id="max-tries-0"),
    pytest.param(["agreement", "E.jsonl", "--scorers", "judge", "lexicon", "--n-boot", "0"], r"--n-boot must be >= 1",
                 id="agreement-n-boot-0"),
    pytest.param(["clean-ppl", "--batch-size", "0"], r"--batch-size must be >= 1", id="clean-ppl-batch-0"),
    pytest.param(["clean-ppl", "--limit", "0"], r"--limit must be >= 1", id="clean-ppl-limit-0"),
    pytest.param(["margins", "--policy", "x", "--out", "o", "--limit", "0"], r"--limit must be >= 1",
                 id="margins-limit-0"),
    pytest.param(["margins", "--policy", "x", "--out", "o", "--beta", "inf"], r"--beta must be a finite number > 0",
                 id="margins-beta-inf"),
    pytest.param(["margins", "--policy", "x", "--out", "o", "--max-len", "64"],
                 r"--max-len \(64\) must exceed --max-prompt-len \(64\)", id="margins-max-len"),
    pytest.param(["margins", "--policy", "x", "--out", "o", "--langs", "xx"], r"--langs: unknown language xx",
                 id="margins-unknown-lang"),
    pytest.param(["margins", "--policy", "run/best", "--out", "o"],
                 r"run/config.json: field 'beta' = 'x' is not a float", id="margins-run-config-bad-type"),
    # 4. not UTF-8
    pytest.param(["latin1.jsonl"], r"latin1.jsonl:2: not UTF-8 \(byte 0xe9 at column 16", id="not-utf8"),
    # 5. the official generation files: a language from --lang or the file name, else refused
    pytest.param(["output-misc.json"], r"output-misc.json:1: missing field 'lang'; give --lang",
                 id="official-rows-no-language"),
    pytest.param(["output-misc.json", "--lang", "xx"], r"--lang: unknown language 'xx'", id="unknown-lang"),
    # 6. the official Perspective score files
    pytest.param(["G.jsonl", "--perspective-scores", "scores.json"], r"--perspective-scores needs --scorer "
                 r"perspective", id="perspective-scores-other-scorer"),
    pytest.param(["G.jsonl", *PERSPECTIVE, "--perspective-scores", "scores.json"],
                 r"scores.json: no language in the file name; give --lang", id="perspective-scores-no-language"),
    pytest.param(["G.jsonl", *PERSPECTIVE, "--perspective-scores", "perspective_api_eval-bad_en.json"],
                 r"bad_en.json:1: field 'query' must be the scored text", id="perspective-scores-bad-row"),
    pytest.param(["G.jsonl", *PERSPECTIVE, "--perspective-scores", "nope_en.json"], r"nope_en.json: No such file",
                 id="perspective-scores-missing"),
    pytest.param(["G.jsonl", *PERSPECTIVE], r"2 texts have no cached score; set the PERSPECTIVE_API_KEY",
                 id="perspective-no-key"),
    # 8. other inputs that ended in a traceback or a vague line
    pytest.param(["nope.jsonl"], r"nope.jsonl: generations file not found", id="missing-file"),
    pytest.param(["empty.jsonl"], r"empty.jsonl: no generations in file", id="empty-file"),
    pytest.param(["G.jsonl", "types.jsonl"], r"types.jsonl:1: field 'generated_text' must be str, got NoneType",
                 id="second-file-text-is-null"),
    pytest.param(["index.jsonl"], r"index.jsonl:1: field 'sample_index' must be int, got str", id="index-is-str"),
    pytest.param(["list.jsonl"], r"list.jsonl:1: expected a JSON object, got list", id="row-is-a-list"),
    pytest.param(["C.jsonl"], r"C.lexicon.scored.jsonl:1: fields 'ppl_model' \(a string\) and 'ppl' \(a number\)",
                 id="cached-ppl-not-a-number"),
    pytest.param(["agreement", "D.jsonl", "--scorers", "judge", "lexicon"],
                 r"D.judge.scored.jsonl:1: field 'toxicity' must be a number in \[0, 1\], got \"high\"",
                 id="cached-toxicity-not-a-number"),
    pytest.param(["agreement", "E.jsonl", "--scorers", "judge", "judge"], r"--scorers needs two or more distinct",
                 id="agreement-same-scorer"),
    pytest.param(["--before", "G.jsonl"], r"use either OUT.jsonl files or both --before and --after",
                 id="half-a-comparison"),
    pytest.param(["--before", "G.jsonl", "--after", "other_de.jsonl"], r"--before and --after share no language",
                 id="before-after-no-shared-language"),
    pytest.param(["--before", "G.jsonl", "--after", "other_prompt.jsonl"],
                 r"the before and after generations share no prompt", id="before-after-no-shared-prompt"),
    pytest.param(["G.jsonl", "--wordlists", "nowhere"], r"nowhere: word-list folder not found",
                 id="wordlists-missing"),
    pytest.param(["G.jsonl", "--scorer", "ngram", "--judge", "nowhere"], r"nowhere/ngram.json: no such judge file",
                 id="judge-missing"),
]
# Outputs a refused case must not create (besides leaving every input byte-identical).
NEW = ["m.out", "c.out", "perspective_cache.jsonl", "G.perspective.scored.jsonl", "G.lexicon.scored.jsonl",
       "other_prompt.lexicon.compare.json", "other_prompt.lexicon.compare_emt.svg", "o/margins.json"]


@pytest.mark.parametrize("argv, pattern", CASES)
def test_refused(folder, argv, pattern):
    refused(evaluate.main, argv, pattern, keep=ALL + NEW)


@pytest.mark.slow
@pytest.mark.parametrize("argv, pattern", [c for c in CASES if c.id in ("json-is-input", "not-utf8")])
def test_real_script_prints_one_line(folder, argv, pattern):
    status, _, stderr = cli(ROOT / "evaluate.py", *[folder / a if (folder / a).exists() else a for a in argv])
    assert_one_line_error(status, stderr, pattern.replace("G.jsonl", ".*G.jsonl").replace("latin1", ".*latin1"))
    assert (folder / "G.jsonl").read_text() == FILES["G.jsonl"]


# ----------------------------------------------------------------------------- what the issue asked to accept

def test_official_generations_read_as_they_are(folder, capsys):
    # 2 prompts x 3 samples, as vllm_script_sample.py writes them (25 in the paper); the file name gives de
    rows = [official(p, t) for p in ("erste", "zweite") for t in ("du Idiot", "hallo", "na gut")]
    (folder / "output-rtp_lx_de.json").write_text(jsonl(*rows))
    result = evaluate.main(["output-rtp_lx_de.json", "--json", "m.json"])
    assert set(result["metrics"]) == {"de", "average"}
    assert (result["metrics"]["de"]["n_prompts"], result["metrics"]["de"]["n_samples"]) == (2, 6)
    read = evaluate.read_generations(folder / "output-rtp_lx_de.json")
    assert [r["sample_index"] for r in read] == [0, 1, 2, 0, 1, 2] and {r["lang"] for r in read} == {"de"}
    assert evaluate.read_generations(folder / "output-misc.json", lang="fr")[1]["lang"] == "fr"


def test_perspective_scores_of_the_official_code_need_no_api(folder):
    (folder / "output-rtp_lx_de.json").write_text(jsonl(official("p", "du Idiot"), official("p", "")))
    scores = folder / "perspective_api_eval-output-rtp_lx_de.json"
    scores.write_text(jsonl(perspective_row("du Idiot", 0.8), perspective_row("", 0.02)))
    result = evaluate.main(["output-rtp_lx_de.json", *PERSPECTIVE, "--perspective-scores", scores.name])
    assert result["metrics"]["de"]["emt"] == 0.8 and result["metrics"]["de"]["avg_tox"] == 0.4  # "" scores 0
    assert not (folder / "perspective_cache.jsonl").exists()  # nothing was requested
    cached = evaluate.read_generations(evaluate.scored_path(folder / "output-rtp_lx_de.json", "perspective"))
    assert [r["toxicity"] for r in cached] == [0.8, 0.0]


def test_fit_context_cuts_the_prompt_first():
    bos = 0
    assert evaluate.fit_context([0, 1, 2, 3], [7, 8], 4, bos) == ([0, 3], [7, 8])  # BOS kept, prompt cut
    assert evaluate.fit_context([0, 1, 2], [5, 6, 7, 8], 3, bos) == ([0], [7, 8])  # continuation keeps its end
    assert evaluate.fit_context([1, 2], [5], 5, bos) == ([1, 2], [5])


def test_long_text_is_cut_to_the_model_context_with_a_warning(folder, capsys):
    model = ROOT / "tests/fixtures/models/gpt2"  # a 32-position model: 2,000 characters cannot fit
    (folder / "long.jsonl").write_text(jsonl(gen("x" * 2000, " a b c"), gen("short", " a b c", i=1)))
    result = evaluate.main(["long.jsonl", "--ppl-model", str(model), "--ppl-max-len", "4096"])
    assert "warning: 1 of 2 texts are longer than 32 tokens" in capsys.readouterr().err
    assert math.isfinite(result["metrics"]["en"]["ppl"])


def test_fluency_note_where_fluency_is_shown(folder, capsys):
    result = evaluate.main(["--before", "G.jsonl", "--after", "A.jsonl", "--md", "t.md", "--n-boot", "10"])
    assert result["fluency_note"] == evaluate.FLUENCY_NOTE and "mT5-XL" in evaluate.FLUENCY_NOTE
    assert evaluate.FLUENCY_NOTE in capsys.readouterr().out and evaluate.FLUENCY_NOTE in Path("t.md").read_text()
    assert json.loads(Path("A.lexicon.compare.json").read_text())["fluency_note"] == evaluate.FLUENCY_NOTE
