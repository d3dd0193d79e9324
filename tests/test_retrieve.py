import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

import model as model_lib
import retrieve
import stats
import tokenizer

# The tiny byte-level BPE of the parity fixtures (vocab 512, adds BOS): the real Tokenizer class.
TOKENIZER = tokenizer.Tokenizer.from_dir(Path(__file__).parent / "fixtures" / "models" / "llama")
V = TOKENIZER.vocab_size


TINY = {
    "llama": {"model_type": "llama", "vocab_size": V, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64},
    "gpt2": {"model_type": "gpt2", "vocab_size": V, "n_embd": 32, "n_layer": 2, "n_head": 4},
    "bloom": {"model_type": "bloom", "vocab_size": V, "hidden_size": 32, "n_layer": 2, "n_head": 4},
}


def tiny_model(family="llama"):
    return model_lib.Transformer.from_config(model_lib.config_from_hf(TINY[family])).eval()


SENTENCES = ["Hello there.", "Ein viel längerer deutscher Satz, mit Umlauten.", "短い", "x", "Bonjour à tous !"]

# ----------------------------------------------------------------------------- representations


@pytest.mark.parametrize("family", sorted(TINY))
def test_sentence_reps_padding_equals_unpadded_runs(family):
    model, tok = tiny_model(family), TOKENIZER
    alone = torch.cat([retrieve.sentence_reps(model, tok, [s]) for s in SENTENCES], dim=1)  # [L+1, N, d]
    assert alone.shape == (model.config.n_layers + 1, len(SENTENCES), 32)
    batched = retrieve.sentence_reps(model, tok, SENTENCES, batch_size=3)  # right padding, length-sorted batches
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_layers_are_embed_resid_posts_and_final_norm():
    """The L + 1 states are HF's output_hidden_states: embeddings, each block's output, the last one normed."""
    model, tok = tiny_model(), TOKENIZER
    ids = torch.tensor(tok.encode_batch(["a short one"]))
    names = ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(model.config.n_layers)]
    _, cache = model.run_with_cache(ids, None, names)
    expected = [cache[n].mean(1) for n in names[:-1]] + [model.final_norm(cache[names[-1]]).mean(1)]
    torch.testing.assert_close(retrieve.sentence_reps(model, tok, ["a short one"]), torch.stack(expected))


# ----------------------------------------------------------------------------- scores


def test_accuracy_is_one_on_identical_inputs():
    reps = torch.randn(3, 40, 16)
    for center in (False, True):
        s = retrieve.retrieval_scores(reps, reps.clone(), center)
        for name in ("accuracy", "accuracy_en2xx", "accuracy_xx2en", "cosine"):
            torch.testing.assert_close(s[name], torch.ones(3))


def test_accuracy_is_chance_on_unrelated_pairs():
    torch.manual_seed(0)
    L, N = 60, 100  # 6,000 retrievals per direction; chance 0.01, std of the mean ~0.0013
    s = retrieve.retrieval_scores(torch.randn(L, N, 16), torch.randn(L, N, 16))
    assert abs(s["accuracy"].mean().item() - 1 / N) < 0.005
    assert abs(s["cosine"].mean().item()) < 0.02
    # shuffling aligned pairs: only the fixed points of the permutation are retrieved (expected count 1)
    reps = torch.randn(L, N, 16)
    shuffled = retrieve.retrieval_scores(reps, reps[:, torch.randperm(N)])
    assert shuffled["accuracy"].mean().item() < 3 / N


def brute_force(en, xx, center):
    en, xx = en.numpy().astype(np.float64), xx.numpy().astype(np.float64)
    if center:
        en, xx = en - en.mean(1, keepdims=True), xx - xx.mean(1, keepdims=True)
    L, N, _ = en.shape
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    out = {"cosine": [], "accuracy_en2xx": [], "accuracy_xx2en": []}
    for layer in range(L):
        sim = np.array([[cos(en[layer, i], xx[layer, j]) for j in range(N)] for i in range(N)])
        out["cosine"].append(np.mean([sim[i, i] for i in range(N)]))
        out["accuracy_en2xx"].append(np.mean([max(range(N), key=lambda j: sim[i, j]) == i for i in range(N)]))
        out["accuracy_xx2en"].append(np.mean([max(range(N), key=lambda i: sim[i, j]) == j for j in range(N)]))
    out["accuracy"] = [(a + b) / 2 for a, b in zip(out["accuracy_en2xx"], out["accuracy_xx2en"])]
    return out


@pytest.mark.parametrize("center", [False, True])
def test_scores_match_brute_force(center):
    torch.manual_seed(1)
    en = torch.randn(4, 30, 8) + 2.0  # a shared offset, like decoder states: centering changes the answer
    xx = en + 1.5 * torch.randn(4, 30, 8)  # noisy translations: accuracy strictly between chance and 1
    got, want = retrieve.retrieval_scores(en, xx, center), brute_force(en, xx, center)
    for name in retrieve.SCORES:
        np.testing.assert_allclose(got[name].numpy(), want[name], atol=1e-5, err_msg=name)
    assert 0.05 < float(got["accuracy"].mean()) < 0.95


# ----------------------------------------------------------------------------- statistics


def test_pearson_spearman_known_values():
    x, y = [1, 2, 3, 4, 5], [2, 4, 5, 4, 5]
    # by hand: deviations x (-2,-1,0,1,2), y (-2,0,1,0,1): r = 6 / sqrt(10 * 6)
    assert stats.pearson(x, y) == pytest.approx(6 / math.sqrt(60))
    # ties: y ranks (1, 2.5, 4.5, 2.5, 4.5): r = 7 / sqrt(10 * 9)
    np.testing.assert_allclose(stats.rankdata(y), [1, 2.5, 4.5, 2.5, 4.5])
    assert stats.spearman(x, y) == pytest.approx(7 / math.sqrt(90))
    assert stats.spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert stats.pearson([1, 2, 3], [-1, -2, -3]) == pytest.approx(-1.0)
    assert math.isnan(stats.pearson([1, 1, 1], [1, 2, 3]))


def test_permutation_p_value_stable_and_small_for_perfect_correlation():
    x = np.arange(10.0)
    y = 3 * x + 1
    for method in ("pearson", "spearman"):
        r, p = stats.correlation_test(x, y, method, permutations=10000, seed=0)
        assert r == pytest.approx(1.0)
        assert p < 0.001  # only the identity and the reversal reach |r| = 1: ~2 / 10! of pairings
        assert stats.correlation_test(x, y, method, 10000, seed=0) == (r, p)
    r, p = stats.correlation_test(x, -y, "pearson", 10000, seed=0)  # two-sided: r = -1 is as extreme
    assert r == pytest.approx(-1.0) and p < 0.001
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=10), rng.normal(size=10)
    r, p = stats.correlation_test(a, b, "pearson", 2000, seed=3)
    assert stats.correlation_test(a, b, "pearson", 2000, seed=3) == (r, p) and p > 0.05
    r, p = stats.correlation_test([1, 1, 1], [1, 2, 3])
    assert math.isnan(r) and math.isnan(p)


# ----------------------------------------------------------------------------- files and CLI


def test_permutation_p_value_matches_exact_enumeration():
    import itertools
    x, y = np.array([0.3, 0.9, 0.1, 0.5, 0.7, 0.2]), np.array([1.0, 2.5, 0.8, 0.9, 3.0, 1.1])
    for method in ("pearson", "spearman"):
        r, p = stats.correlation_test(x, y, method, permutations=20000, seed=0)
        stat = stats.pearson if method == "pearson" else stats.spearman
        null = np.array([stat(x, y[list(perm)]) for perm in itertools.permutations(range(6))])
        exact = np.mean(np.abs(null) >= abs(r) - 1e-12)  # all 720 pairings
        assert 0.01 < exact < 0.5 and p == pytest.approx(exact, abs=0.01)


def retrieval_file(path, scores):
    langs = {lang: {"n": 20, "cosine": c, "accuracy": a, "accuracy_en2xx": a, "accuracy_xx2en": a,
                    "per_layer": {k: [v, v] for k, v in (("cosine", c), ("accuracy", a),
                                                        ("accuracy_en2xx", a), ("accuracy_xx2en", a))}}
             for lang, (c, a) in scores.items()}
    path.write_text(json.dumps({"settings": {"model": "tiny", "dataset": "parallel", "data": None, "limit": 20,
                                             "center": False, "dtype": "fp32"},
                                "n_layers": 2, "layers": ["embed", "1"], "languages": langs}))
    return path


RETRIEVAL = {"de": (0.9, 0.8), "fr": (0.85, 0.7), "zh": (0.5, 0.2), "ja": (0.4, 0.1), "ru": (0.7, 0.5)}


def test_correlate_end_to_end_on_evaluate_output(tmp_path):
    retrieval = retrieval_file(tmp_path / "retrieval.json", RETRIEVAL)
    emt_change = {"de": -40.0, "fr": -35.0, "zh": -10.0, "ja": -12.0, "ru": -20.0}
    comparison = {lang: {"emt": {"before": 0.5, "after": 0.4, "change_pct": v},
                         "tox_prob": {"before": 0.5, "after": 0.4, "change_pct": v / 2}}
                  for lang, v in emt_change.items()}
    comparison["en"] = {k: {"before": 0.5, "after": 0.2, "change_pct": -60.0} for k in ("emt", "tox_prob")}
    comparison["average"] = {"emt": {"before": 0.5, "after": 0.3, "change_pct": -30.0}}
    transfer = tmp_path / "compare.json"
    transfer.write_text(json.dumps({"scorer": "lexicon", "before": {}, "after": {}, "comparison": comparison}))
    margins = tmp_path / "margins.json"
    margins.write_text(json.dumps({l: {"mean_margin": -v / 100} for l, v in emt_change.items() if l != "ru"}))
    control = tmp_path / "clean_ppl.json"
    control.write_text(json.dumps({l: {"log_ppl": 2.0 + i * i % 3} for i, l in enumerate(RETRIEVAL)}))
    out = retrieve.main(["correlate", "--retrieval", str(retrieval), "--transfer", f"emt={transfer}:emt",
                         "--transfer", f"margin={margins}:mean_margin", "--transfer", str(transfer),
                         "--control", f"{control}:log_ppl", "--out", str(tmp_path / "out"), "--permutations", "500"])
    # 3 transfers x 2 retrieval metrics x (Pearson, Spearman, 2 partial) = 24 variants, all reported
    assert out["n_variants"] == 24 and len(out["results"]) == 6
    emt = {r["retrieval_metric"]: r for r in out["results"] if r["transfer"] == "emt"}
    langs = emt["cosine"]["langs"]
    assert sorted(langs) == sorted(emt_change) and emt["cosine"]["not_in_both"] == []
    xs, ys = [RETRIEVAL[l][0] for l in langs], [emt_change[l] for l in langs]
    assert emt["cosine"]["pearson"]["r"] == pytest.approx(float(stats.pearson(xs, ys)))
    assert emt["cosine"]["spearman"]["r"] == pytest.approx(-0.9)  # ranks: x (5,4,2,1,3) vs -y (5,4,1,2,3)
    acc = [RETRIEVAL[l][1] for l in langs]
    assert emt["accuracy"]["pearson"]["r"] == pytest.approx(float(stats.pearson(acc, ys)))
    z = [2.0 + i * i % 3 for i, l in enumerate(RETRIEVAL) if l in langs]
    assert emt["cosine"]["partial_pearson"]["r"] == pytest.approx(stats.partial_correlation(xs, ys, z, permutations=1)[0])
    p = emt["cosine"]["pearson"]
    assert p["p_bonferroni"] == pytest.approx(min(1.0, p["p"] * 24))
    assert emt["cosine"]["direction"] == "lower = more detoxification"
    margin = [r for r in out["results"] if r["transfer"] == "margin"][0]
    assert margin["direction"] == "higher = more detoxification" and margin["n"] == 4
    assert {r["transfer"] for r in out["results"]} == {"emt", "margin", "compare"}
    saved = json.loads((tmp_path / "out" / "correlation.json").read_text())
    assert saved["n_variants"] == 24 and "NEGATIVE r" in saved["sign_convention"]
    md = (tmp_path / "out" / "correlation.md").read_text()
    assert "| de |" in md and "Spearman" in md and "24 correlation variants" in md
    svg = ET.parse(tmp_path / "out" / "correlation.svg").getroot()
    labels = {t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")}
    assert set(emt_change) <= labels

    tox = retrieve.main(["correlate", "--retrieval", str(retrieval), "--transfer", f"{transfer}:tox_prob",
                         "--layer", "embed", "--out", str(tmp_path / "o2"), "--permutations", "100"])
    assert tox["languages"]["de"] == {"cosine": 0.9, "accuracy": 0.8, "compare:tox_prob": -20.0}
    assert tox["n_variants"] == 4 and "partial_pearson" not in tox["results"][0]

    # a measure defined in too few languages is skipped with its reason; the others are still computed
    sparse = tmp_path / "sparse.json"
    sparse.write_text(json.dumps({"de": {"mean_margin": 0.1}, "fr": {"mean_margin": 0.2}}))
    out = retrieve.main(["correlate", "--retrieval", str(retrieval), "--transfer", f"few={sparse}:mean_margin",
                         "--transfer", f"emt={transfer}:emt", "--out", str(tmp_path / "o3"), "--permutations", "50"])
    assert [s["transfer"] for s in out["skipped"]] == ["few"] and "only 2 language(s)" in out["skipped"][0]["reason"]
    assert {r["transfer"] for r in out["results"]} == {"emt"}


def test_parse_transfer_spec():
    assert retrieve.parse_transfer_spec("m=runs/a.json:mean_margin") == ("m", "runs/a.json", "mean_margin")
    assert retrieve.parse_transfer_spec("runs/a.json") == ("a", "runs/a.json", None)
    assert retrieve.parse_transfer_spec("runs/a.json:emt") == ("a:emt", "runs/a.json", "emt")


def test_read_transfer_formats_and_errors(tmp_path):
    def write(obj):
        path = tmp_path / "t.json"
        path.write_text(json.dumps(obj))
        return path

    margins = {"de": {"reward_accuracy": 0.9, "mean_margin": 1.5}, "fr": {"reward_accuracy": 0.7, "mean_margin": 0.5}}
    assert retrieve.read_transfer(write(margins), "mean_margin")[0] == {"de": 1.5, "fr": 0.5}
    with pytest.raises(ValueError, match="choose one with --transfer NAME=PATH:KEY"):
        retrieve.read_transfer(write(margins))
    with pytest.raises(ValueError, match=r"t\.json: de: missing field 'acc' \(has: mean_margin, reward_accuracy\)"):
        retrieve.read_transfer(write(margins), "acc")
    assert retrieve.read_transfer(write({"de": 1, "fr": 2.5, "note": "x"}))[0] == {"de": 1.0, "fr": 2.5}
    nested = {"languages": {"de": {"before": {"emt": 0.5}, "after": {"emt": 0.25}, "change_pct": {"emt": -50.0}},
                            "fr": {"change_pct": {"emt": None}}}}
    assert retrieve.read_transfer(write(nested))[0] == {"de": -50.0}  # null (NaN) % change is dropped
    with pytest.raises(ValueError, match=r"de: expected a number"):
        retrieve.read_transfer(write({"de": "high"}))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        retrieve.read_transfer(tmp_path / "missing.json")


def test_data_sources(tmp_path):
    en, de = retrieve.load_pair("de", limit=7)
    assert len(en) == len(de) == 7 and en[0] != de[0]
    assert retrieve.load_pair("fr", limit=7)[0] == en  # one English side for every parallel language
    en_t, de_t = retrieve.load_pair("de", "tatoeba", limit=5)
    assert len(en_t) == len(de_t) == 5 and en_t != en[:5]
    (tmp_path / "en.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "de.txt").write_text("eins\nzwei\ndrei\n")
    (tmp_path / "my_fr_set.jsonl").write_text('{"prompt": "un"}\n{"prompt": "deux"}\n')
    assert retrieve.load_pair("de", data_dir=tmp_path) == (["one", "two", "three"], ["eins", "zwei", "drei"])
    with pytest.raises(ValueError, match="my_fr_set.jsonl: 2 sentences but .*en.txt has 3"):
        retrieve.load_pair("fr", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no file for language 'zh'"):
        retrieve.load_pair("zh", data_dir=tmp_path)


def test_score_resume_and_predict_end_to_end(tmp_path, monkeypatch):
    loads = []

    def fake_load(name, device="cpu", dtype=None):
        loads.append(name)
        return tiny_model(), TOKENIZER

    monkeypatch.setattr(retrieve, "load_model", fake_load)
    out = tmp_path / "run"
    args = ["--model", "tiny", "--limit", "12", "--out", str(out), "--langs", "de", "fr"]
    result = retrieve.main(["score", *args])
    assert loads == ["tiny"] and list(result["languages"]) == ["de", "fr"]
    entry = result["languages"]["de"]
    assert len(entry["per_layer"]["accuracy"]) == 3 and result["layers"] == ["embed", "1", "2"]
    assert entry["cosine"] == pytest.approx(float(np.mean(entry["per_layer"]["cosine"])))
    assert 0 <= entry["accuracy"] <= 1 and entry["n"] == 12
    md = (out / "retrieval.md").read_text()
    assert "| de |" in md and "accuracy per layer" in md

    # Resume: nothing left to do, so the model is not even loaded; the numbers are unchanged.
    again = retrieve.main(["score", *args])
    assert loads == ["tiny"] and again["languages"]["de"] == entry
    # A longer language list scores only the new language (an interrupted run resumes the same way).
    more = retrieve.main(["score", *args, "zh"])
    assert loads == ["tiny", "tiny"] and list(more["languages"]) == ["de", "fr", "zh"]
    assert more["languages"]["de"] == entry  # same "seconds" too: not recomputed
    # Other settings (centering) start over.
    centred = retrieve.main(["score", *args, "--center"])
    assert loads == ["tiny"] * 3 and list(centred["languages"]) == ["de", "fr"]
    en, de = (retrieve.sentence_reps(tiny_model(), TOKENIZER, t) for t in retrieve.load_pair("de", limit=12))
    want = retrieve.retrieval_scores(en, de, center=True)["accuracy"].tolist()
    np.testing.assert_allclose(centred["languages"]["de"]["per_layer"]["accuracy"], want)

    rows = retrieve.main(["predict", "--retrieval", str(out / "retrieval.json"), "--score", "accuracy",
                          "--out", str(out)])
    assert [r[0] for r in rows] == [1, 2] and rows[0][2] >= rows[1][2]
    ranking = json.loads((out / "prediction.json").read_text())["ranking"]
    assert [r["lang"] for r in ranking] == [r[1] for r in rows]
    assert "| 1 |" in (out / "prediction.md").read_text()


def test_cli_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit):
        retrieve.main(["--help"])
    text = capsys.readouterr().out
    assert "released code" in text and "top-1" in text
    with pytest.raises(SystemExit):
        retrieve.main(["score", "--out", "x", "--limit", "1"])
    with pytest.raises(SystemExit):
        retrieve.main(["score", "--out", "x", "--langs", "en"])
