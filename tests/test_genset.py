import json
import random

import numpy as np
import pytest

import genset
from stats import roc_auc


def population(sizes, empties=()):
    """Synthetic population: {stratum: size}; the first `empties[stratum]` rows of a stratum are empty."""
    rows = []
    for s, n in sizes.items():
        for i in range(n):
            text = "" if i < dict(empties).get(s, 0) else f"text {s} {i}"
            rows.append({"key": (s.split("/")[0], "en", i, 0), "text": text, "stratum": s})
    return rows


def test_draw_sample_takes_every_stratum_with_its_weight():
    sizes = {"base/low/nohit": 50, "base/high/hit": 2, "dpo/mid/nohit": 9}
    drawn = genset.draw_sample(population(sizes, {"dpo/mid/nohit": 1}), per_stratum=4, seed=0)
    for s, n in sizes.items():
        rows = [r for r in drawn if r["stratum"] == s and not r["empty"]]
        nonempty = n - (1 if s == "dpo/mid/nohit" else 0)
        assert len(rows) == min(4, nonempty)  # small strata are taken whole
        assert all(r["weight"] == pytest.approx(nonempty / len(rows)) for r in rows)
        assert all(r["stratum_population"] == n for r in rows)
    empty = [r for r in drawn if r["empty"]]
    assert len(empty) == 1 and empty[0]["weight"] == 1.0  # empty rows are a census, not toxic by rule
    # the weights of each stratum add back up to its size
    assert sum(r["weight"] for r in drawn) == pytest.approx(sum(sizes.values()))


def test_weighted_metrics_match_a_hand_computed_example():
    scores, labels, weights = [0.9, 0.4, 0.6, 0.2], [1, 1, 0, 0], [1, 2, 1, 3]
    # pos-neg pairs weighted w_pos * w_neg: (0.9>0.6) 1 + (0.9>0.2) 3 + (0.4<0.6) 0 + (0.4>0.2) 6 = 10 of 3 * 4
    assert genset.weighted_auc(scores, labels, weights) == pytest.approx(10 / 12)
    assert genset.weighted_auc([0.5, 0.5], [1, 0], [2, 3]) == pytest.approx(0.5)  # a tie counts half
    # flagged at >= 0.5: 0.9 (toxic, w 1) and 0.6 (clean, w 1); toxic weight in all: 3
    assert genset.weighted_precision_recall(scores, labels, weights) == pytest.approx((0.5, 1 / 3))
    rng = np.random.default_rng(0)
    s, y = rng.random(40).round(1), rng.random(40) < 0.4
    assert genset.weighted_auc(s, y, np.ones(40)) == pytest.approx(roc_auc(s, y))  # unit weights: plain AUC


def test_blind_file_hides_run_and_scores(tmp_path):
    drawn = genset.draw_sample(population({"base/low/nohit": 6, "dpo/high/hit": 6}, {"base/low/nohit": 2}), 3)
    blind, key = genset.write_sample(drawn, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "blind.jsonl").read_text().splitlines()]
    assert rows == blind and all(set(r) == {"blind_id", "lang", "text"} for r in rows)
    assert all(r["text"].strip() for r in rows)  # empty continuations are never shown for labelling
    assert {k["run"] for k in key} == {"base", "dpo"} and len(key) == len(rows) + 2
    # the shuffle mixes runs: the blind order is not the stratum order
    runs = {k["blind_id"]: k["run"] for k in key}
    assert [runs[r["blind_id"]] for r in rows] != sorted(runs[r["blind_id"]] for r in rows)


def write_run(folder, run, n, seed):
    rng = random.Random(seed)
    rows = [{"generated_text": "" if i == 0 else f"t{i}", "lang": ["en", "de", "ja"][i % 3], "prompt_index": i,
             "sample_index": 0} for i in range(n)]
    (folder / f"gen_{run}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for inst in genset.INSTRUMENTS:
        scored = [{**r, "toxicity": rng.choice([0.0, 0.5]) if inst == "lexicon" else rng.random()} for r in rows]
        (folder / f"gen_{run}.{inst}.scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scored))


def test_sample_label_score_end_to_end_with_the_empty_rule(tmp_path):
    for i, run in enumerate(genset.RUNS):
        write_run(tmp_path, run, 60, i)
    out = tmp_path / "set"
    genset.main(["sample", "--run-dir", str(tmp_path), "--out", str(out), "--per-stratum", "3", "--min-total", "10"])
    blind = [json.loads(line) for line in (out / "blind.jsonl").read_text().splitlines()]
    labels = ["unsure"] + ["toxic", "not_toxic"] * len(blind)  # one unsure row
    (out / "labels.jsonl").write_text("".join(json.dumps({"blind_id": r["blind_id"], "label": labels[i],
                                                          "reason": "test"}) + "\n" for i, r in enumerate(blind)))
    with pytest.raises(ValueError, match="orphan its labels"):  # labels pin the draw
        genset.main(["sample", "--run-dir", str(tmp_path), "--out", str(out), "--min-total", "10"])
    rows = genset.load_labels(out)
    empty = [r for r in rows if r["empty"]]
    assert len(empty) == 3 and all(r["label"] == "not_toxic" and r["text"] == "" for r in empty)
    genset.main(["score", "--run-dir", str(tmp_path), "--out", str(out), "--n-boot", "20"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["held_out"] is True
    assert set(metrics["instruments"]["word lists"]) == {"all", "en", "latin", "other_scripts"}
    # unsure rows are dropped and their stratum's sure rows stand for them: weights still sum to the population
    assert genset.sure_rows(rows)[1].sum() == pytest.approx(3 * 60)
    all_unsure = [{**r, "label": "unsure"} if r["stratum"] == rows[0]["stratum"] else r for r in rows]
    with pytest.raises(ValueError, match="no sure label"):
        genset.sure_rows(all_unsure)


def test_load_labels_refuses_a_missing_label(tmp_path):
    drawn = genset.draw_sample(population({"base/low/nohit": 4}), 2)
    blind, _ = genset.write_sample(drawn, tmp_path)
    (tmp_path / "labels.jsonl").write_text(json.dumps({"blind_id": blind[0]["blind_id"], "label": "toxic",
                                                       "reason": "x"}) + "\n")
    with pytest.raises(ValueError, match=blind[1]["blind_id"]):
        genset.load_labels(tmp_path)


def test_scorer_object_scores_the_labelled_texts():
    """Any object with .score(texts, langs) plugs in, e.g. a rebuilt judge: here one that flags 'idiot'."""
    class WordScorer:
        def score(self, texts, langs):
            assert len(langs) == len(texts)
            return [float("idiot" in t) for t in texts]

    rows = [{"run": "base", "lang": "en", "prompt_index": i, "sample_index": 0, "stratum": "base/low/nohit",
             "stratum_nonempty": 8, "empty": False, "text": t, "label": lab}
            for i, (t, lab) in enumerate([("you idiot", "toxic"), ("nice day", "not_toxic"),
                                          ("idiot!", "toxic"), ("tea time", "not_toxic")])]
    scores = genset.scorer_scores(WordScorer(), rows)
    assert scores[("base", "en", 0, 0)] == 1.0 and scores[("base", "en", 1, 0)] == 0.0
    m = genset.evaluate(rows, {"word": scores}, n_boot=10)["word"]["all"]
    assert (m["precision"], m["recall"], m["auc"]) == (1.0, 1.0, 1.0)
