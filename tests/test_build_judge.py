"""build_judge.py: what the judges may train on, and a selection protocol that cannot see the labelled
generations. Tiny synthetic data; no model."""
import builtins
import inspect
import json
from pathlib import Path

import numpy as np
import pytest

import build_judge
import genset
import judge
from data import LANGS


@pytest.fixture
def tiny_rtplx(monkeypatch):
    """Three languages of synthetic RTP-LX: indices 0-29 shared (with completions), 999-1002 extras; the
    pipeline holds out 10-12 and DPO trains/validates on 0-9 and 20-29."""
    langs = ("de", "en", "ja")
    rows = {lang: [{"index": i, "prompt": f"{lang} prompt {i}", "prompt_toxicity": 1.0 + (i % 5),
                    "toxic_completion": "x", "benign_completion": "y"} for i in [*range(30), *range(999, 1003)]]
            for lang in langs}
    pairs = {lang: [{"index": r["index"], "rejected": f"{lang} toxic {r['index']}", "chosen": f"{lang} benign {r['index']}"}
                    for r in rows[lang]] for lang in langs}
    info = {"heldout_indices": [11], "train_indices": list(range(10)), "valid_indices": list(range(20, 30))}
    monkeypatch.setattr(build_judge, "LANGS", langs)
    monkeypatch.setattr(build_judge, "load_rtplx", lambda lang: [dict(r) for r in rows[lang]])
    monkeypatch.setattr(build_judge, "rtplx_pairs", lambda lang: pairs[lang])
    monkeypatch.setattr(build_judge, "default_split", lambda: {"info": info})
    monkeypatch.setattr(build_judge, "cut_tokens", lambda tokenizer, text: text)
    return info


def test_no_training_text_comes_from_an_evaluated_item_and_no_completion_from_a_dpo_pair(tiny_rtplx):
    split = build_judge.judge_split(seed=0, valid_shared=5)
    records = build_judge.labelled_texts(None, split)
    index = lambda r: int(r["item"].split(":")[1])  # noqa: E731
    assert {10, 11, 12} <= split["excluded"] and not any(index(r) in {10, 11, 12} for r in records)
    completions = [r for r in records if r["kind"] == "completion"]
    assert {index(r) for r in completions} == set(range(13, 20)) | set(range(999, 1003))  # neither DPO nor held out
    pool = records + [{"text": "t", "label": 1, "lang": "en", "kind": "ood", "side": "ood", "source": "extra-en",
                       "item": "extra-en:0"}]
    for texts in ("prompts", "prompts+completions", "prompts+extra"):
        for band in (None, [1.5, 3.0]):
            design = {**build_judge.BASELINE, "texts": texts, "band": band}
            for i in build_judge.training_rows(pool, design):
                r = pool[i]
                assert r["side"] != "valid" and (r["kind"] != "completion" or texts == "prompts+completions")
                if band and r["kind"] == "prompt":
                    assert not 1.5 < r["score"] < 3.0  # the ambiguous band is dropped


def synthetic_pool(rng, n=12):
    pool = []
    for lang in LANGS:
        for i in range(n):
            for side in ("train", "valid"):
                score = float(rng.choice([1.0, 2.0, 2.67, 3.0, 4.0]))
                pool.append({"text": f"{lang} {side} {i}", "label": int(score >= 3), "score": score, "lang": lang,
                             "item": f"*:{i if side == 'train' else i + 100}", "kind": "prompt", "side": side})
    for source in build_judge.OOD_SOURCES:
        for i in range(n):
            pool.append({"text": f"{source} {i}", "label": i % 2, "lang": source.split("-")[-1], "source": source,
                         "kind": "ood", "side": "ood", "item": f"{source}:{i}"})
    return pool


def test_selection_never_reads_the_labelled_generations(monkeypatch):
    assert genset.HELD_OUT
    params = set(inspect.signature(build_judge.select_design).parameters)
    assert params == {"pool", "fitter", "baseline", "stages", "seed"}  # no path in: it cannot be pointed at them
    held_out = Path(genset.GENSET_DIR).resolve()
    opened = []
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).resolve().is_relative_to(held_out):
            opened.append(file)
            raise AssertionError(f"selection opened {file}")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: guarded_open(self).read())
    rng = np.random.default_rng(0)
    pool = synthetic_pool(rng)
    y, items = np.array([r["label"] for r in pool]), np.array([r["item"] for r in pool])
    feats = rng.normal(size=(len(build_judge.FEATURE_LAYERS), 2, len(pool), 8)).astype(np.float16)
    feats[:, :, :, 0] += 2 * y
    lexicon = np.zeros(len(pool))
    stages = (("label rule", [{"band": None}, {"band": [2.0, 3.0]}]), ("word lists", [{"lexicon": "stack"}]))
    design, table = build_judge.select_design(
        pool, lambda d: build_judge.feature_fitter(d, feats, lexicon, y, items), build_judge.BASELINE, stages)
    assert not opened and len(table) == 3
    first = max(table[:2], key=lambda r: r["select"])["design"]  # each stage builds on the best so far
    assert table[2]["design"] == {**first, "lexicon": "stack"}
    assert design == first  # the word-list stage is measured, not shipped (REPORT_ONLY_STAGES)
    for row in table:  # every unit the protocol chooses by is out of domain; the ood sets carry intervals
        assert set(row["lolo"]) == set(LANGS) and set(row["ood"]) == set(build_judge.OOD_SOURCES)
        assert row["select"] == pytest.approx(np.mean([row["lolo_mean"]] + [row["ood"][s]["auc"] for s in
                                                                            build_judge.SELECT_UNITS[1:]]))


def test_shipped_metrics_record_the_protocol_and_the_chosen_design():
    metrics = json.loads((judge.JUDGE_DIR / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["split"]["select_units"] == list(build_judge.SELECT_UNITS)
    for name in ("feature", "ngram"):
        j = metrics["judges"][name]
        stages = [r["stage"] for r in j["selection"] if r["stage"] not in build_judge.REPORT_ONLY_STAGES]
        last_stage = [r for r in j["selection"] if r["stage"] == stages[-1]]
        best = max(last_stage, key=lambda r: r["select"])["design"]
        assert best == {k: j["design"][k] for k in best}, name  # shipped = what the protocol chose


@pytest.mark.parametrize("kind", ["ngram", "feature"])
def test_shipped_judges_score_empty_and_blank_text_as_not_toxic(kind):
    j = judge.load(kind)
    assert j.score(["", "   \n\t", "fuck you"], ["en", None, "en"])[:2] == [0.0, 0.0]
