"""Held-out preference margins (evaluate.py margins): hand computation on a fixture model, bootstrap."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from loading import load_model, save_model

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
    got_ref = evaluate.pair_logps(LLAMA, PAIRS, 64, 256, 2, "cpu", "fp32")
    got_pol = evaluate.pair_logps(tmp_path / "policy", PAIRS, 64, 256, 2, "cpu", "fp32")
    beta = 0.1
    for lang, pairs in PAIRS.items():
        m = evaluate.margin_metrics(got_pol[lang], got_ref[lang], beta)
        margins, acc_before, acc_after = [], [], []
        for i, pair in enumerate(pairs):
            pb, pt, n = seq_logps(policy, tok, pair)
            rb, rt, _ = seq_logps(ref, tok, pair)
            assert abs(float(got_pol[lang]["chosen_logps"][i]) - pb) < 1e-4
            assert abs(float(got_pol[lang]["rejected_logps"][i]) - pt) < 1e-4
            assert int(got_pol[lang]["chosen_tokens"][i]) == int(got_pol[lang]["rejected_tokens"][i]) == n
            margins.append(beta * ((pb - rb) - (pt - rt)))
            acc_before.append(rb > rt)
            acc_after.append(pb > pt)
        assert abs(m["mean_margin"] - np.mean(margins)) < 1e-5
        assert m["reward_accuracy"] == np.mean([x > 0 for x in margins])
        assert m["prefers_benign_before"] == np.mean(acc_before)
        assert m["prefers_benign_after"] == np.mean(acc_after)
        assert m["n_pairs"] == len(pairs)


def test_bootstrap_is_reproducible_and_covers_the_mean():
    values = np.random.default_rng(1).normal(0.3, 1.0, size=200)
    a, b = evaluate.bootstrap_ci(values, seed=7), evaluate.bootstrap_ci(values, seed=7)
    assert a == b
    assert a[0] < values.mean() < a[1]
    assert evaluate.bootstrap_ci(values, seed=8) != a


def test_margins_take_beta_lengths_and_reference_from_the_run_config(tmp_path, capsys):
    """A run trained at beta 0.5: `margins --policy RUN/best` without --beta uses 0.5, the run's max lengths and
    its starting model as the reference, and says so; an explicit flag still wins."""
    import data
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
    held = {"de": data.default_split()["eval_pairs"]["de"][:3]}
    pol = evaluate.pair_logps(run / "best", held, 20, 40, 8, "cpu", "fp32")
    ref = evaluate.pair_logps(tiny, held, 20, 40, 8, "cpu", "fp32")
    expected = evaluate.margin_metrics(pol["de"], ref["de"], 0.5)["mean_margin"]
    assert result["de"]["mean_margin"] == pytest.approx(expected, rel=1e-5) and expected != 0
    again = evaluate.main(["margins"] + args + ["--out", str(tmp_path / "m2"), "--beta", "0.1"])
    assert again["de"]["mean_margin"] == pytest.approx(expected / 5, rel=1e-5)
