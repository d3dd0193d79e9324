"""Held-out preference margins (evaluate.py margins): hand computation on a fixture model, bootstrap."""
from pathlib import Path

import numpy as np
import torch

import evaluate
from model import load_model, save_model

LLAMA = Path(__file__).parent / "fixtures" / "models" / "llama"
PAIRS = {"de": [{"prompt": "Ich finde", "chosen": " das gut.", "rejected": " dich dumm."},
                {"prompt": "Er sagte", "chosen": " danke schön", "rejected": " halt die Klappe"}],
         "ja": [{"prompt": "彼は", "chosen": "優しい人です。", "rejected": "馬鹿な人です。"}]}


def seq_logp(model, tok, prompt, completion):
    """log p(completion + EOS | prompt) from full logits, the slow obvious way."""
    p_ids = tok.encode(prompt)
    c_ids = tok.encode(completion, add_special=False) + [tok.eos_id]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = model(ids).log_softmax(-1)[0]
    return sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(c_ids)), len(c_ids)


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
            (pb, nb), (pt, nt) = (seq_logp(policy, tok, pair["prompt"], pair[k]) for k in ("chosen", "rejected"))
            (rb, _), (rt, _) = (seq_logp(ref, tok, pair["prompt"], pair[k]) for k in ("chosen", "rejected"))
            assert abs(float(got_pol[lang]["chosen_logps"][i]) - pb) < 1e-4
            assert int(got_pol[lang]["rejected_tokens"][i]) == nt
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
