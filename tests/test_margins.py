"""Held-out preference margins (margins.py; `evaluate.py margins` too): hand computation on a fixture model."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import margins
from loading import load_model, save_model
from data import LANGS
from stats import bootstrap_ci

LLAMA = Path(__file__).parent / "fixtures" / "models" / "llama"
PAIRS = {"de": [{"prompt": "Ich finde", "chosen": " das gut.", "rejected": " dich dumm."},
                {"prompt": "Er sagte", "chosen": " danke schön", "rejected": " halt die Klappe"}],
         "ja": [{"prompt": "彼は", "chosen": "優しい人です。", "rejected": "馬鹿な人です。"}]}


def seq_logps(model, tok, pair):
    """(log p(chosen | prompt), log p(rejected | prompt), tokens per side) from full logits, the slow obvious
    way: both responses cut to the shorter one's token count, no EOS (train_dpo's pair builder)."""
    p_ids = tok.encode(pair["prompt"])
    sides = [tok.encode(pair[k], add_special=False) for k in ("chosen", "rejected")]
    n = min(len(s) for s in sides)
    out = []
    for c_ids in sides:
        ids = torch.tensor([p_ids + c_ids[:n]])
        with torch.no_grad():
            logp = model(ids).log_softmax(-1)[0]
        out.append(sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(c_ids[:n])))
    return out[0], out[1], n


def test_margins_match_hand_computation(tmp_path):
    ref, tok = load_model(LLAMA)
    policy, _ = load_model(LLAMA)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(policy, tok, tmp_path / "policy")
    got_ref = margins.pair_logps(LLAMA, PAIRS, 64, 256, 2, "cpu", "fp32")
    got_pol = margins.pair_logps(tmp_path / "policy", PAIRS, 64, 256, 2, "cpu", "fp32")
    beta = 0.1
    for lang, pairs in PAIRS.items():
        m = margins.margin_metrics(got_pol[lang], got_ref[lang], beta)
        hand, acc_before, acc_after = [], [], []
        for i, pair in enumerate(pairs):
            pb, pt, n = seq_logps(policy, tok, pair)
            rb, rt, _ = seq_logps(ref, tok, pair)
            assert abs(float(got_pol[lang]["chosen_logps"][i]) - pb) < 1e-4
            assert abs(float(got_pol[lang]["rejected_logps"][i]) - pt) < 1e-4
            assert int(got_pol[lang]["chosen_tokens"][i]) == int(got_pol[lang]["rejected_tokens"][i]) == n
            hand.append(beta * ((pb - rb) - (pt - rt)))
            acc_before.append(rb > rt)
            acc_after.append(pb > pt)
        assert abs(m["mean_margin"] - np.mean(hand)) < 1e-5
        assert m["reward_accuracy"] == np.mean([x > 0 for x in hand])
        assert m["prefers_benign_before"] == np.mean(acc_before)
        assert m["prefers_benign_after"] == np.mean(acc_after)
        assert m["n_pairs"] == len(pairs)


def test_bootstrap_is_reproducible_and_covers_the_mean():
    values = np.random.default_rng(1).normal(0.3, 1.0, size=200)
    a, b = bootstrap_ci(values, seed=7), bootstrap_ci(values, seed=7)
    assert a == b
    assert a[0] < values.mean() < a[1]
    assert bootstrap_ci(values, seed=8) != a


def test_margins_take_beta_lengths_and_reference_from_the_run_config(tmp_path, capsys):
    """A run trained at beta 0.5: `margins --policy RUN/best` without --beta uses 0.5, the run's max lengths and
    its starting model as the reference, and says so; an explicit flag still wins."""
    import design
    import train_dpo
    tiny = Path(__file__).parent / "fixtures" / "models" / "gemma3"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"the day {i} was", "chosen": " calm and kind",
                                         "rejected": " rude and nasty"}) + "\n" for i in range(8)))
    run = tmp_path / "run"
    train_dpo.main(["--model", str(tiny), "--data", str(pairs), "--out", str(run), "--beta", "0.5",
                    "--max-len", "40", "--max-prompt-len", "20", "--optimizer", "adamw", "--lr", "1e-2",
                    "--warmup-steps", "0", "--batch-size", "2", "--max-steps", "2", "--eval-every", "2",
                    "--valid-frac", "0.25"])
    capsys.readouterr()
    args = ["--policy", str(run / "best"), "--langs", "de", "--limit", "3"]
    result = evaluate.main(["margins"] + args + ["--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert "beta = 0.5 (from the run's" in out and f"reference = {tiny} (from the run's" in out
    settings = result["settings"]
    assert (settings["beta"], settings["max_len"], settings["max_prompt_len"]) == (0.5, 40, 20)
    indices, items = margins.margin_items(design.default_split(), design.load_tokenizer_of(tiny), 3, 20, 40)
    assert result["items"] == {"indices": indices, "langs_without_pairs": ["ru"]}
    held = {"de": items["de"]}
    pol = margins.pair_logps(run / "best", held, 20, 40, 8, "cpu", "fp32")
    ref = margins.pair_logps(tiny, held, 20, 40, 8, "cpu", "fp32")
    expected = margins.margin_metrics(pol["de"], ref["de"], 0.5)["mean_margin"]
    assert result["de"]["mean_margin"] == pytest.approx(expected, rel=1e-5) and expected != 0
    again = margins.main(args + ["--out", str(tmp_path / "m2"), "--beta", "0.1"])  # margins.py's own CLI
    assert again["de"]["mean_margin"] == pytest.approx(expected / 5, rel=1e-5)


def test_margins_are_on_the_same_items_in_every_language_with_a_budget(tmp_path, monkeypatch):
    """margin_items: the same RTP-LX indices in all 16 languages with completions, each pair longer than the budget
    on both sides; margins.jsonl holds every pair; the reference pass is computed once and then read back."""
    import design
    tok = design.load_tokenizer_of("gemma-3-270m")
    split = design.default_split()
    indices, items = margins.margin_items(split, tok, 20, 64, 96, response_tokens=20)
    assert len(indices) == 20 and set(items) == set(LANGS) - {"ru"}
    for lang, pairs in items.items():
        assert [p["index"] for p in pairs] == indices, lang
        for side in ("chosen", "rejected"):
            assert all(len(ids) > 20 for ids in tok.encode_batch([p[side] for p in pairs], add_special=False))
    assert margins.margin_items(split, tok, 20, 64, 96, response_tokens=20)[0] == indices  # chosen once
    assert indices != [p["index"] for p in split["eval_pairs"]["ar"][:20]]  # not file order

    tiny = Path(__file__).parent / "fixtures" / "models" / "gemma3"
    calls = []
    real = margins.pair_logps
    monkeypatch.setattr(margins, "pair_logps", lambda name, *a: calls.append(str(name)) or real(name, *a))
    argv = ["--policy", str(tiny), "--reference", str(tiny), "--langs", "de", "ja", "--limit", "3", "--max-len",
            "40", "--max-prompt-len", "16", "--response-tokens", "8", "--reference-cache", str(tmp_path / "ref.pt")]
    first = margins.main(argv + ["--out", str(tmp_path / "a")])
    second = margins.main(argv + ["--out", str(tmp_path / "b")])
    assert calls == [str(tiny)] * 3  # reference + policy, then the policy alone: the reference came from the cache
    rows = [json.loads(line) for line in (tmp_path / "b" / "margins.jsonl").read_text().splitlines()]
    assert [(r["lang"], r["index"]) for r in rows] == [(l, i) for l in ("de", "ja") for i in second["items"]["indices"]]
    assert all(r["chosen_tokens"] == r["rejected_tokens"] == 8 and r["margin"] == 0 for r in rows)  # policy = ref
    assert first["de"]["mean_margin"] == second["de"]["mean_margin"] == 0 and second["de"]["mean_tokens"] == 8
    assert rows[0]["margin_per_token"] == pytest.approx(rows[0]["margin"] / 8)
