"""evaluate.py: paper metrics on hand-made tables, conditional perplexity against a hand computation, the
before/after CLI, paired tests, guards, clean-text perplexity and agreement (the scorers: test_scorers.py)."""
import json
import math
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate
import stats
from scorers import LexiconScorer

# ----------------------------------------------------------------------------- metrics


def test_toxicity_metrics_known_answers():
    # prompt maxes 0.9, 0.5, 0.2 -> EMT 1.6/3; 0.9 and 0.5 reach the >= 0.5 threshold; mean of all 7 scores.
    scores = [[0.1, 0.9, 0.3], [0.5, 0.0], [0.2, 0.2]]
    m = evaluate.toxicity_metrics(scores)
    assert m["emt"] == pytest.approx(1.6 / 3)
    assert m["tox_prob"] == pytest.approx(2 / 3)
    assert m["avg_tox"] == pytest.approx(2.2 / 7)


def test_tox_prob_threshold_is_inclusive():
    assert evaluate.toxicity_metrics([[0.5]])["tox_prob"] == 1.0
    assert evaluate.toxicity_metrics([[0.49999]])["tox_prob"] == 0.0


def test_distinct_n_hand_computed():
    # prompt 1 tokens a b a | a b -> unigrams 2 distinct / 5; bigrams (a,b) (b,a) (a,b) -> 2 / 3
    # prompt 2 tokens x y -> 2/2 unigrams, 1/1 bigrams; no trigrams anywhere except "a b a" (1/1)
    samples = [["a b a", "a b"], ["x y"]]
    assert evaluate.distinct_n(samples, 1, "en") == pytest.approx((2 / 5 + 1) / 2)
    assert evaluate.distinct_n(samples, 2, "en") == pytest.approx((2 / 3 + 1) / 2)
    assert evaluate.distinct_n(samples, 3, "en") == pytest.approx(1.0)  # prompt 2 has no trigram: skipped
    assert math.isnan(evaluate.distinct_n([["", " "]], 1, "en"))


def test_distinct_n_uses_characters_for_ja_zh():
    assert evaluate.distinct_n([["你好 你"]], 1, "zh") == pytest.approx(2 / 3)
    assert evaluate.distinct_n([["你好 你"]], 1, "en") == pytest.approx(1.0)  # two whitespace words


def test_median_ppl_drops_huge_and_nan():
    assert evaluate.median_ppl([1.0, 3.0, 1e4, float("nan"), 2.0, 5e4]) == 2.0
    assert math.isnan(evaluate.median_ppl([1e4]))


def row(lang, prompt, i, text, **extra):
    return {"prompt": prompt, "generated_text": text, "lang": lang, "sample_index": i, **extra}


def test_group_prompts_splits_repeated_prompt_text():
    rows = [row("en", "p", 0, "a"), row("en", "p", 1, "b"), row("en", "p", 0, "c"), row("en", "p", 1, "d"),
            row("de", "p", 0, "e")]
    groups = evaluate.group_prompts(rows)
    assert [[r["generated_text"] for r in g] for g in groups["en"]] == [["a", "b"], ["c", "d"]]
    assert len(groups["de"]) == 1
    indexed = [row("en", "p", 0, "a", prompt_index=3), row("en", "p", 0, "b", prompt_index=9)]  # generate.py rows
    assert [len(g) for g in evaluate.group_prompts(indexed)["en"]] == [1, 1]


def test_language_metrics_average_is_mean_over_languages():
    rows = [row("en", "p", 0, "x", toxicity=1.0), row("en", "q", 0, "y", toxicity=0.0),
            row("de", "p", 0, "z", toxicity=0.5)]
    m = evaluate.language_metrics(rows)
    assert list(m) == ["de", "en", "average"]  # paper language order, then the average
    assert m["en"]["emt"] == 0.5 and m["de"]["emt"] == 0.5 and m["average"]["tox_prob"] == pytest.approx(0.75)
    assert m["en"]["n_prompts"] == 2 and "ppl" not in m["en"]


def test_read_generations_errors_name_file_line_field(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(row("en", "p", 0, "x")) + "\n" + json.dumps({"prompt": "p", "lang": "en",
                                                                             "sample_index": 0}) + "\n")
    with pytest.raises(ValueError, match=r"g\.jsonl:2: missing field 'generated_text'"):
        evaluate.read_generations(path)
    path.write_text(json.dumps(row("en", "p", "0", "x")) + "\n")
    with pytest.raises(ValueError, match=r"g\.jsonl:1: field 'sample_index' must be int"):
        evaluate.read_generations(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"g\.jsonl:1: invalid JSON"):
        evaluate.read_generations(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        evaluate.read_generations(tmp_path / "nope.jsonl")


def test_coverage_cli_lists_every_language(capsys):
    evaluate.main(["coverage"])
    out = capsys.readouterr().out
    for lang in evaluate.LANGS:
        assert f"| {lang} |" in out
    assert all(r[3] > 0 for r in LexiconScorer().coverage())


# ----------------------------------------------------------------------------- perplexity

class CharTokenizer:
    """Stand-in tokenizer: one id per character (a=2, b=3, c=1, ...: ord % 3 + 1), BOS=0, pad=0."""
    bos_id = pad_id = 0

    def encode_batch(self, texts, add_special=True):
        return [([0] if add_special else []) + [ord(c) % 3 + 1 for c in t] for t in texts]

    def pad(self, seqs, side="left"):
        assert side == "right"
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        return ids, mask


class BigramModel(torch.nn.Module):
    """Stand-in LM: logits at each position depend only on the current token via a fixed table."""

    def __init__(self, max_seq_len=64):
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=max_seq_len)  # what load_ppl_scorer reads of a model.Transformer
        self.table = torch.tensor([[0.0, 1.0, 2.0, 0.5], [2.0, 0.0, 1.0, -1.0],
                                   [0.3, 0.3, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])

    def forward(self, input_ids, attention_mask=None, return_hidden=False):
        hidden = torch.nn.functional.one_hot(input_ids, 4).float()  # [B, T, 4]: the token itself
        return hidden if return_hidden else self.unembed(hidden)

    def unembed(self, hidden):
        return hidden @ self.table  # [..., V]

    def unembed_params(self):
        return self.table.T, 1.0  # unembed(h) == h @ weight.T


def hand_ppl(model, prompt_ids, cont_ids):
    seq = prompt_ids + cont_ids
    nll = []
    for t in range(len(prompt_ids), len(seq)):
        row = model.table[seq[t - 1]].tolist()
        nll.append(-(row[seq[t]] - math.log(sum(math.exp(v) for v in row))))
    return math.exp(sum(nll) / len(nll))


def test_perplexities_match_hand_computation():
    model, tok = BigramModel(), CharTokenizer()
    # different lengths: right padding inside a batch, and length-sorted batching must restore input order
    prompts, conts = ["abcab", "c", "ab"], ["ca", "aab", "b"]
    got = evaluate.perplexities(model, tok, prompts, conts, batch_size=2)
    want = [hand_ppl(model, [0] + [ord(c) % 3 + 1 for c in p], [ord(c) % 3 + 1 for c in x]) for p, x in
            zip(prompts, conts)]
    assert got == pytest.approx(want, rel=1e-5)
    assert math.isnan(evaluate.perplexities(model, tok, ["ab"], [""])[0])


# ----------------------------------------------------------------------------- scoring cache and CLI

class CountingScorer:
    name = "count"
    fingerprint = "count:v1"

    def __init__(self):
        self.seen = []

    def score(self, texts, langs):
        self.seen += texts
        return [1.0 if "c" in t else 0.0 for t in texts]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_score_rows_caches_scores_and_ppl_next_to_input(tmp_path):
    path = tmp_path / "gen.jsonl"
    write_rows(path, [row("en", "ab", 0, "abc"), row("en", "ab", 1, "ab"), row("de", "c", 0, "abc")])
    scorer = CountingScorer()
    ppl = evaluate.PplModel(BigramModel(), CharTokenizer(), "bigram", 2, "cpu")
    rows = evaluate.score_rows(path, scorer, ppl)
    assert [r["toxicity"] for r in rows] == [1.0, 0.0, 1.0] and scorer.seen == ["abc", "ab", "abc"]  # per (lang, text)
    assert rows[0]["ppl"] == pytest.approx(hand_ppl(ppl.model, [0, 2, 3], [2, 3, 1]), rel=1e-5)  # "ab" + "abc"
    assert (tmp_path / "gen.count.scored.jsonl").exists()
    again = evaluate.score_rows(path, scorer, None)  # no rescoring; cached ppl kept without a ppl model
    assert len(scorer.seen) == 3 and [r["ppl"] for r in again] == [r["ppl"] for r in rows]
    scorer.fingerprint = "count:v2"  # e.g. edited word lists: cached scores are stale
    evaluate.score_rows(path, scorer)
    assert len(scorer.seen) == 6


def generations(toxic_fraction_by_lang):
    """Two prompts x two samples per language; the given number of samples (of 4) say 'idiot'."""
    rows = []
    for lang, n_toxic in toxic_fraction_by_lang.items():
        for k in range(4):
            text = "you idiot" if k < n_toxic else f"a calm reply number {k}"
            rows.append(row(lang, f"prompt {k // 2}", k % 2, text))
    return rows


def test_before_after_cli_table_json_svg(tmp_path, capsys):
    before, after = tmp_path / "base.jsonl", tmp_path / "dpo.jsonl"
    write_rows(before, generations({"en": 2, "de": 1}))  # en: prompt 0 both toxic; de: prompt 0 one toxic
    write_rows(after, generations({"en": 1, "de": 0}))
    out_json, out_md = tmp_path / "m.json", tmp_path / "t.md"
    evaluate.main(["--before", str(before), "--after", str(after), "--json", str(out_json), "--md", str(out_md)])
    printed = capsys.readouterr().out
    # EMT over 2 prompts with maxes 0.5 and 0: bootstrap means lie in {0, 0.25, 0.5}; equal maxes -> p = 1
    assert "PPL column omitted" in printed and "| en | 0.250 [0.00, 0.50] -> 0.250 [0.00, 0.50] (+0.0%) | 1.00 |" in printed
    result = json.loads(out_json.read_text())
    cmp = result["comparison"]
    # "you idiot" = one hit = 0.5; en before: prompt maxes 0.5, 0 -> EMT 0.25; after: same maxes
    assert cmp["en"]["emt"] == {"before": 0.25, "after": 0.25, "change_pct": 0.0}
    assert cmp["en"]["avg_tox"]["before"] == 0.25 and cmp["en"]["avg_tox"]["after"] == 0.125
    assert cmp["en"]["avg_tox"]["change_pct"] == pytest.approx(-50.0)
    assert cmp["de"]["tox_prob"] == {"before": 0.5, "after": 0.0, "change_pct": -100.0}
    assert cmp["average"]["avg_tox"]["before"] == pytest.approx((0.25 + 0.125) / 2)
    assert list(cmp) == ["de", "en", "average"] and "ppl" not in cmp["en"]
    assert out_md.read_text().startswith("| lang | EMT | p EMT | ToxProb | p ToxProb | AvgTox | Dist-1 | Dist-2 |")
    de = result["tests"]["de"]["tox_prob"]  # prompt 0 toxic -> clean, prompt 1 clean both times
    assert (de["toxic_to_clean"], de["clean_to_toxic"], de["p"]) == (1, 0, 1.0)
    assert de["before_ci"] == pytest.approx(evaluate.wilson_interval(1, 2))
    assert result["tests"]["pooled"]["langs"] == ["de"] and result["tests"]["pooled"]["n_prompts"] == 2
    assert result["guards"]["en"]["before"]["degenerate_rate"] == 0.0
    assert "| pooled (1 non-en, 2 prompts) |" in printed
    svg = ET.parse(tmp_path / "dpo.lexicon.compare_emt.svg").getroot()  # default chart path, next to --after
    bars = {r.find("{http://www.w3.org/2000/svg}title").text: float(r.get("height"))
            for r in svg.iter("{http://www.w3.org/2000/svg}rect") if r.find("{http://www.w3.org/2000/svg}title")
            is not None}
    assert len(bars) == 6 and bars["after de: 0"] == 0.0 and bars["before de: 0.25"] > 0  # 3 rows x 2 runs
    assert (tmp_path / "base.lexicon.scored.jsonl").exists()


def test_before_after_compares_on_the_prompts_both_runs_have(tmp_path):
    """A run sampled on a subset of the prompts (reproduce's replication runs) is compared with the base model on
    that subset: the base's other prompts count as unpaired and enter no number."""
    before, after = tmp_path / "base.jsonl", tmp_path / "dpo.jsonl"
    write_rows(before, generations({"en": 2}))  # prompt 0 toxic in both samples, prompt 1 clean
    write_rows(after, [r for r in generations({"en": 0}) if r["prompt"] == "prompt 0"])
    result = evaluate.main(["--before", str(before), "--after", str(after), "--json", str(tmp_path / "m.json")])
    assert result["before"]["en"]["n_prompts"] == 1 and result["before"]["en"]["emt"] == 0.5  # not 0.25 over 2
    assert result["comparison"]["en"]["tox_prob"] == {"before": 1.0, "after": 0.0, "change_pct": -100.0}
    assert result["tests"]["en"]["unpaired_before"] == 1 and result["tests"]["en"]["n_prompts"] == 1


def test_single_run_cli_pools_files(tmp_path, capsys):
    a, b = tmp_path / "en.jsonl", tmp_path / "de.jsonl"
    write_rows(a, generations({"en": 2}))
    write_rows(b, generations({"de": 0}))
    result = evaluate.main([str(a), str(b), "--json", str(tmp_path / "m.json"), "--svg", str(tmp_path / "c.svg")])
    assert set(result["metrics"]) == {"en", "de", "average"}
    assert result["metrics"]["en"]["tox_prob"] == 0.5 and result["metrics"]["de"]["emt"] == 0.0
    assert "| en | 2 | 4 | 0.250 | 0.500 | 0.250 |" in capsys.readouterr().out
    ET.parse(tmp_path / "c.svg")


def test_cli_ppl_columns_with_ppl_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_model", lambda name, device, dtype: (BigramModel(), CharTokenizer()))
    before, after = tmp_path / "base.jsonl", tmp_path / "dpo.jsonl"
    write_rows(before, generations({"en": 2}))
    write_rows(after, generations({"en": 0}))
    result = evaluate.main(["--before", str(before), "--after", str(after), "--ppl-model", "bigram"])
    ppl = result["comparison"]["en"]["ppl"]
    rows = evaluate.read_generations(tmp_path / "dpo.lexicon.scored.jsonl")
    assert ppl["after"] == pytest.approx(float(np.median([r["ppl"] for r in rows])))
    assert all(r["ppl_model"].startswith("bigram@") for r in rows)  # the model and the tokens kept per text
    assert "| lang | EMT | p EMT | ToxProb | p ToxProb | AvgTox | PPL | Dist-1 |" in capsys.readouterr().out
    # another cut is another measurement: the cached values are recomputed, not reused
    evaluate.main(["--before", str(before), "--after", str(after), "--ppl-model", "bigram", "--ppl-max-len", "4"])
    assert {r["ppl_model"] for r in evaluate.read_generations(tmp_path / "dpo.lexicon.scored.jsonl")} == {"bigram@4"}


def test_cli_rejects_half_a_comparison(tmp_path):
    with pytest.raises(ValueError, match="both --before and --after"):
        evaluate.main(["--before", str(tmp_path / "x.jsonl")])


# ----------------------------------------------------------------------------- paired tests, guards, clean text, agreement

def scored_rows(lang, maxes, k=2):
    """k samples per prompt; the first sample of prompt i scores maxes[i], the others 0."""
    return [row(lang, f"p{i}", j, f"t{i}{j}", prompt_index=i, toxicity=m if j == 0 else 0.0)
            for i, m in enumerate(maxes) for j in range(k)]


def test_paired_tests_by_hand():
    before = scored_rows("de", [0.9, 0.8, 0.6, 0.1]) + scored_rows("en", [0.7, 0.2]) + scored_rows("fr", [0.9, 0.2])
    after = scored_rows("de", [0.1, 0.2, 0.7, 0.1]) + scored_rows("en", [0.1, 0.2]) + scored_rows("fr", [0.3, 0.2])
    after += [row("de", "extra", 0, "x", prompt_index=9, toxicity=0.0)]  # only in the after run
    t = evaluate.paired_tests(before, after, n_boot=2000)
    de = t["de"]
    assert de["n_prompts"] == 4 and de["unpaired_after"] == 1 and de["unpaired_before"] == 0
    assert de["emt"]["before"] == pytest.approx(0.6) and de["emt"]["after"] == pytest.approx(0.275)
    assert de["emt"]["diff"] == pytest.approx(-0.325)
    # toxic at >= 0.5: before T T T F, after F F T F -> b = 2 toxic -> clean, c = 0; p = 2 * 1/4 = 0.5
    assert (de["tox_prob"]["toxic_to_clean"], de["tox_prob"]["clean_to_toxic"]) == (2, 0)
    assert de["tox_prob"]["p"] == 0.5 and de["tox_prob"]["before_ci"] == pytest.approx(stats.wilson_interval(3, 4))
    pooled = t["pooled"]  # de + fr, en left out
    assert pooled["langs"] == ["de", "fr"] and pooled["n_prompts"] == 6
    assert pooled["emt"]["diff"] == pytest.approx((-0.325 + -0.3) / 2)  # unweighted mean over languages
    assert (pooled["tox_prob"]["toxic_to_clean"], pooled["tox_prob"]["p"]) == (3, 0.25)
    with pytest.raises(ValueError, match="share no prompt"):
        evaluate.paired_tests(scored_rows("de", [0.1]), scored_rows("fr", [0.1]))


def test_degenerate_reason():
    assert evaluate.degenerate_reason("  \n") == "empty"
    assert evaluate.degenerate_reason(" ... !!! 😀") == "no_word"
    assert evaluate.degenerate_reason("<div><br/></div> <a href='x'>") == "markup"
    assert evaluate.degenerate_reason("see https://example.com/a/very/long/path ok") == "markup"
    assert evaluate.degenerate_reason("a normal sentence with <b>bold</b>") is None
    assert evaluate.degenerate_reason("42") is None


def test_in_language():
    assert evaluate.in_language("Der Hund ist nicht müde und schläft", "de") is True
    assert evaluate.in_language("The dog is not tired and it sleeps", "de") is False
    assert evaluate.in_language("El perro no está cansado y duerme", "es") is True
    assert evaluate.in_language("Ein Hund", "de") is None          # 2 words: undecidable
    assert evaluate.in_language("Zażółć gęślą jaźń teraz", "pl") is True  # no stop word, but ą ł ż ś ź
    assert evaluate.in_language("Собака не устала", "ru") is True
    assert evaluate.in_language("The dog is tired", "ru") is False
    assert evaluate.in_language("犬は疲れていない", "ja") is True
    assert evaluate.in_language("犬は疲れていない", "zh") is False       # kana: Japanese, not Chinese
    assert evaluate.in_language("...", "ar") is None
    g = evaluate.guard_metrics([row("de", "p", 0, "Der Hund ist nicht müde"), row("de", "p", 1, ""),
                                row("de", "p", 2, "The dog is not tired")])
    assert g["de"]["degenerate_rate"] == pytest.approx(1 / 3) and g["de"]["degenerate_by_reason"]["empty"] == 1
    assert g["de"]["in_language_rate"] == 0.5 and (g["de"]["decidable"], g["de"]["undecidable"]) == (2, 1)


def test_clean_ppl_token_weighted_by_hand():
    lm, tok = BigramModel(), CharTokenizer()
    texts = ["ab", "abc"]
    out = evaluate.clean_ppl(lm, tok, texts, batch_size=1, n_boot=200)
    ids = [[ord(c) % 3 + 1 for c in t] for t in texts]
    nll = [math.log(hand_ppl(lm, [0], i)) * len(i) for i in ids]  # total NLL per sentence after BOS
    assert out["n_tokens"] == 5 and out["tokens"] == [2, 3]
    assert out["ppl"] == pytest.approx(math.exp(sum(nll) / 5), rel=1e-5)
    assert out["ppl_ci"][0] <= out["ppl"] <= out["ppl_ci"][1]
    same = evaluate.compare_clean_ppl(out, out, n_boot=100)
    assert same["ppl_ratio"] == 1.0 and same["p"] == 1.0
    worse = dict(out, nll=[2 * x for x in out["nll"]], log_ppl=2 * out["log_ppl"])
    assert evaluate.compare_clean_ppl(out, worse, n_boot=100)["ppl_ratio"] == pytest.approx(out["ppl"])


def test_clean_ppl_keeps_per_sentence_values_caches_the_base_and_compares_trained_models(tmp_path, monkeypatch):
    """clean-ppl writes each sentence's NLL, measures --model once for many --model2 runs (--model-cache), and
    clean-ppl-compare tests one trained model against another (DPO vs placebo) sentence by sentence."""
    from pathlib import Path
    from loading import load_model, save_model
    llama = Path(__file__).parent / "fixtures" / "models" / "llama"
    lm, tok = load_model(llama)
    with torch.no_grad():
        for param in lm.parameters():
            param.add_(0.05 * torch.randn_like(param))
    save_model(lm, tok, tmp_path / "worse")
    loads = []
    real = evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", lambda name, **kw: loads.append(str(name)) or real(name, **kw))
    common = ["clean-ppl", "--model", str(llama), "--langs", "de", "ja", "--limit", "4", "--n-boot", "50",
              "--model-cache", str(tmp_path / "base.json")]
    same = evaluate.main(common + ["--model2", str(llama), "--json", str(tmp_path / "same.json")])
    worse = evaluate.main(common + ["--model2", str(tmp_path / "worse"), "--json", str(tmp_path / "worse.json")])
    assert loads == [str(llama), str(tmp_path / "worse")]  # the base once (and --model2 = the base: cached too)
    assert same["de"]["nll"] == same["de"]["nll2"] == worse["de"]["nll"] and len(same["de"]["tokens"]) == 4
    assert same["pooled"]["ppl_ratio"] == 1.0 and same["pooled"]["n_sentences"] == 8
    cmp = evaluate.main(["clean-ppl-compare", str(tmp_path / "same.json"), str(tmp_path / "worse.json"),
                         "--n-boot", "50", "--json", str(tmp_path / "cmp.json")])
    for lang in ("de", "ja"):
        assert cmp[lang]["ppl_ratio"] == pytest.approx(worse[lang]["ppl_ratio"]) and cmp[lang]["ppl_ratio"] != 1
    assert cmp["pooled"]["ppl_ratio"] == pytest.approx(worse["pooled"]["ppl_ratio"])
    assert cmp["pooled"]["ppl_ratio_ci"][0] <= cmp["pooled"]["ppl_ratio"] <= cmp["pooled"]["ppl_ratio_ci"][1]
    (tmp_path / "base_only.json").write_text(json.dumps({"de": {"nll": [1.0], "tokens": [1]}}))
    with pytest.raises(ValueError, match="no per-sentence values of a second model"):
        evaluate.compare_trained(tmp_path / "base_only.json", tmp_path / "worse.json")


def test_agreement_from_cached_scores(tmp_path, capsys):
    gen = tmp_path / "gen.jsonl"
    rows = [row("de", f"p{i // 2}", i % 2, f"text {i}", prompt_index=i // 2) for i in range(8)]
    write_rows(gen, rows)
    a = [0.9, 0.8, 0.1, 0.2, 0.7, 0.1, 0.3, 0.6]
    b = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # a's labels 1 1 0 0 1 0 0 1 vs b 1 1 0 0 0 0 0 1
    for name, scores in [("judge", a), ("lexicon", b)]:
        write_rows(evaluate.scored_path(gen, name), [dict(r, toxicity=s) for r, s in zip(rows, scores)])
    out = evaluate.main(["agreement", str(gen), "--scorers", "judge", "lexicon", "--n-boot", "50",
                         "--json", str(tmp_path / "a.json")])
    e = out["langs"]["de"]["judge|lexicon"]
    # 2x2: both yes 3, judge-only 1, neither 4: p_o = 7/8, p_e = (4/8)(3/8) + (4/8)(5/8) = 0.5 -> kappa 0.75
    assert e["kappa"] == pytest.approx(0.75) and e["agreement"] == 0.875
    # judge scores vs lexicon labels: positives 0.9 0.8 0.6 all above every negative (max 0.7 > 0.6: one pair)
    assert e["auc_first_on_second"] == pytest.approx(14 / 15)
    assert out["langs"]["all"]["judge|lexicon"]["kappa"] == pytest.approx(0.75)
    assert "kappa judge/lexicon" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="--scorer ngram"):
        evaluate.main(["agreement", str(gen), "--scorers", "judge", "ngram"])
