"""judge.py and build_judge.py: the item-disjoint split, Platt calibration, the n-gram judge, the shipped
artifacts and their card, and one-line errors for bad input."""
import json

import numpy as np
import pytest
import torch

import build_judge
import judge
from data import LANGS, load_rtplx
from design import default_split
from report import exit_on_error
from stats import roc_auc


@pytest.fixture(scope="module")
def split():
    return build_judge.judge_split(seed=0)


def test_split_validation_shares_no_item_with_training_or_the_held_out_evaluation(split):
    assert split["train"] and split["valid"] and not split["train"] & split["valid"]
    heldout = default_split()["info"]["heldout_indices"]
    guarded = {j for i in heldout for j in (i - 1, i, i + 1)}
    assert guarded <= split["excluded"]
    for item in split["train"] | split["valid"]:
        assert int(item.split(":")[1]) not in guarded, item
    # every row of every language maps to exactly one side or is excluded
    for lang in LANGS:
        for row in load_rtplx(lang):
            item = build_judge.item_of(lang, row["index"])
            if row["index"] in guarded:
                assert item not in split["train"] | split["valid"]
            else:
                assert (item in split["train"]) != (item in split["valid"])


def test_split_has_at_least_100_validation_items_per_language_and_is_seeded(split):
    for lang in LANGS:
        n = sum(build_judge.item_of(lang, r["index"]) in split["valid"] for r in load_rtplx(lang))
        assert n >= 100, (lang, n)
    assert build_judge.judge_split(seed=0)["valid"] == split["valid"]
    assert build_judge.judge_split(seed=1)["valid"] != split["valid"]


def test_items_join_translations_and_keep_language_extras_apart():
    assert build_judge.item_of("de", 17) == build_judge.item_of("ja", 17)
    assert build_judge.item_of("de", 1003) != build_judge.item_of("ja", 1003)


def test_platt_recovers_a_known_calibration_and_stays_finite_when_separable():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, 20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-(0.5 * s - 1.0)))
    a, b = build_judge.fit_platt(s, y)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(-1.0, abs=0.08)
    a, b = build_judge.fit_platt([-3, -2, -1, 1, 2, 3], [0, 0, 0, 1, 1, 1])
    assert np.isfinite(a) and 0 < a < 20


def test_calibration_is_per_language_with_a_pooled_fallback():
    cal = {"pooled": (1.0, 0.0), "de": (1.0, 2.0)}
    p = judge.calibrate(cal, [0.0, 0.0, 0.0], ["de", "xx", None])
    assert p[0] == pytest.approx(1 / (1 + np.exp(-2))) and p[1] == p[2] == pytest.approx(0.5)


def test_ngram_features_are_stable_and_normalised():
    a = judge.ngram_counts("Idiot  idiot")
    assert a == judge.ngram_counts("ＩＤＩＯＴ\n\nidiot")  # NFKC, case and whitespace do not matter
    assert sum(a.values()) == 2 * sum(judge.ngram_counts("idiot").values())
    X = judge.ngram_matrix(["you idiot", "", "こんにちは"]).to_dense()
    assert X.shape == (3, judge.N_BUCKETS)
    assert torch.linalg.norm(X, dim=1).tolist() == pytest.approx([1.0, 0.0, 1.0], abs=1e-5)


def test_ngram_logistic_learns_a_toy_task():
    bad, good = ["idiot", "stupid", "moron", "trash"], ["friend", "sunny", "garden", "music"]
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for _ in range(200):
        y = int(rng.integers(0, 2))
        words = list(rng.choice(good, 3)) + ([str(rng.choice(bad))] if y else [])
        texts.append(" ".join(rng.permutation(words)))
        labels.append(y)
    w, b = build_judge.train_logistic(judge.ngram_matrix(texts[:150]), labels[:150], l2=1e-4)
    scores = (torch.sparse.mm(judge.ngram_matrix(texts[150:]), w[:, None])[:, 0] + b).numpy()
    assert roc_auc(scores, labels[150:]) > 0.95


def test_mlp_head_round_trips_through_its_tensors():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8)).astype(np.float32)
    y = (X[:, 0] * X[:, 1] > 0).astype(int)  # not linearly separable
    tensors = build_judge.fit_head("mlp", X, y, [str(i) for i in range(300)], seed=0, l2=0.0)
    assert roc_auc(judge.head_logits(tensors, X), y) > 0.8


# -- the shipped judge ---------------------------------------------------------

OBVIOUS = [  # (lang, toxic, benign)
    ("en", "you are a fucking idiot, shut up", "the weather is lovely today"),
    ("de", "du bist ein verdammtes arschloch", "das Wetter ist heute schön"),
    ("es", "eres un puto imbécil de mierda", "hoy hace buen tiempo"),
    ("fr", "ferme ta gueule, espèce de connard", "il fait beau aujourd'hui"),
]


def test_shipped_ngram_judge_scores_probabilities_and_ranks_obvious_cases():
    j = judge.load("ngram")
    assert j.name == "judge-ngram"
    for lang, toxic, benign in OBVIOUS:
        p_toxic, p_benign = j.score([toxic, benign], [lang, lang])
        assert 0 <= p_benign < p_toxic <= 1, lang
    assert all(0 <= p <= 1 for p in j.score(["", "hello"], None))  # unknown language: pooled calibration


@pytest.mark.slow
def test_shipped_feature_judge_scores_probabilities_and_ranks_obvious_cases():
    j = judge.load("feature")
    assert j.name == "judge-feature"
    texts = [t for _, toxic, benign in OBVIOUS for t in (toxic, benign)]
    langs = [lang for lang, _, _ in OBVIOUS for _ in range(2)]
    p = j.score(texts, langs)
    assert all(0 <= x <= 1 for x in p)
    assert all(p[2 * k] > p[2 * k + 1] for k in range(len(OBVIOUS)))


def test_card_is_generated_from_metrics():
    metrics = json.loads((judge.JUDGE_DIR / "metrics.json").read_text(encoding="utf-8"))
    assert build_judge.render_card(metrics) == (judge.JUDGE_DIR / "README.md").read_text(encoding="utf-8")


def test_shipped_artifacts_are_small():
    for path in judge.JUDGE_DIR.iterdir():
        assert path.stat().st_size < 4_000_000, path


# -- bad input -----------------------------------------------------------------


def test_bad_input_gives_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ngram.json: no such judge file"):
        judge.load("ngram", path=tmp_path)
    with pytest.raises(ValueError, match="unknown judge kind 'bert'"):
        judge.load("bert")
    j = judge.load("ngram")
    with pytest.raises(TypeError, match=r"texts\[1\]: expected a string, got int"):
        j.score(["ok", 3], None)
    with pytest.raises(TypeError, match="texts must be a list of strings, got str"):
        j.score("just one text", None)
    with pytest.raises(ValueError, match="got 2 texts but 1 langs"):
        j.score(["a", "b"], ["en"])


def test_cli_reports_bad_files_in_one_line(tmp_path, capsys):
    bad = tmp_path / "gens.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n', encoding="utf-8")
    for argv, message in ((["score", "--kind", "ngram", "--in", str(bad)], f"{bad}:2: field 'text' must be a string"),
                          (["score", "--kind", "ngram", "--in", str(tmp_path / "no.jsonl")], "no.jsonl: no such file"),
                          (["score", "--kind", "nope", "hi"], "unknown judge kind 'nope'")):
        with pytest.raises(SystemExit) as e:  # what `python judge.py` does: one line, status 1
            exit_on_error(lambda: judge.main(argv))
        assert message in e.value.code and "\n" not in e.value.code


def test_cli_scores_a_jsonl_file(tmp_path):
    src, out = tmp_path / "gens.jsonl", tmp_path / "scored.jsonl"
    src.write_text('{"text": "you fucking idiot", "lang": "en"}\n{"text": "guten Morgen", "lang": "de"}\n',
                   encoding="utf-8")
    judge.main(["score", "--kind", "ngram", "--in", str(src), "--lang-field", "lang", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["lang"] for r in rows] == ["en", "de"] and rows[0]["toxicity"] > rows[1]["toxicity"]
