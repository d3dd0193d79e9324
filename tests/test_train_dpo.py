"""Tests for dpo.py and train_dpo.py: the loss against its formula and TRL, plain and chunked log-probs against
each other, truncation, and end-to-end runs on a tiny random Gemma 3 checkpoint (learning, exact resume, bad
rows, NaN, DDP)."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dpo
import loading
import model as model_lib
import runstate
import train_config
import train_dpo
from checkpoint import DEFAULT_MODEL
from design import train_valid_pairs
from hardening import cli
from report import exclusive
from dpo import batch_logps, collate, compute_logps, preference_loss, tokenize_pair

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TINY_MODEL = FIXTURES / "models" / "gemma3"  # 3 layers, d 64, vocab 512, tied embeddings, sliding window
TIMING_KEYS = {"ms_per_step", "tok_per_s"}


def hand_made_logps():
    # policy chosen, policy rejected, ref chosen, ref rejected: [5] each, covering both signs of the margin
    return (torch.tensor([-12.5, -30.25, -8.0, -5.0, -40.0]), torch.tensor([-20.0, -25.0, -8.0, -60.0, -9.0]),
            torch.tensor([-14.0, -28.0, -8.0, -20.0, -10.0]), torch.tensor([-18.5, -27.5, -8.0, -22.0, -12.0]))


# -----------------------------------------------------------------------------
# preference_loss


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_sigmoid_loss_is_dpo_formula(label_smoothing):
    pc, pr, rc, rr = hand_made_logps()
    beta = 0.1
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, beta, label_smoothing)
    for i in range(5):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        sig = 1 / (1 + math.exp(-beta * h))
        expected = -(1 - label_smoothing) * math.log(sig) - label_smoothing * math.log(1 - sig)
        assert losses[i].item() == pytest.approx(expected, rel=1e-5)
        assert chosen_rewards[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item(), rel=1e-6)
        assert rejected_rewards[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item(), rel=1e-6)


def test_ipo_loss_formula():
    pc, pr, rc, rr = hand_made_logps()
    beta = 0.5
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta, loss_type="ipo")
    expected = [(((pc[i] - rc[i]) - (pr[i] - rr[i])).item() - 1 / (2 * beta)) ** 2 for i in range(5)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)


def test_rewards_are_detached_and_loss_has_gradient():
    pc, pr, rc, rr = (x.clone().requires_grad_(i < 2) for i, x in enumerate(hand_made_logps()))
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, 0.1)
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen and lowers rejected log-probs


@pytest.mark.skipif(not (FIXTURES / "dpo_loss.json").exists(), reason="TRL fixture not recorded")
def test_preference_loss_matches_trl():
    fx = json.loads((FIXTURES / "dpo_loss.json").read_text())
    rows = fx["rows"]
    pc, pr, rc, rr = (torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in
                      ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"))
    beta = fx["beta"]
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, beta)
    assert losses.tolist() == pytest.approx(fx["loss_per_row"]["sigmoid"], rel=1e-9)
    assert chosen_rewards.tolist() == pytest.approx(fx["rewards_chosen"], rel=1e-9, abs=1e-12)
    assert rejected_rewards.tolist() == pytest.approx(fx["rewards_rejected"], rel=1e-9, abs=1e-12)
    smoothed, _, _ = preference_loss(pc, pr, rc, rr, beta, label_smoothing=fx["label_smoothing"])
    assert smoothed.tolist() == pytest.approx(fx["loss_per_row"]["conservative"], rel=1e-9)
    # TRL's IPO averages log-probs over response tokens, which is what training passes for --loss-type ipo
    nc, nr = (torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in ("chosen_len", "rejected_len"))
    ipo, _, _ = preference_loss(pc / nc, pr / nr, rc / nc, rr / nr, beta, loss_type="ipo")
    assert ipo.tolist() == pytest.approx(fx["loss_per_row"]["ipo"], rel=1e-9)


# -----------------------------------------------------------------------------
# batch_logps, tokenization


def tiny_random_model(vocab=97, tied=True):
    cfg = model_lib.config_from_hf({"model_type": "llama", "vocab_size": vocab, "hidden_size": 32,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "intermediate_size": 64, "tie_word_embeddings": tied})
    return model_lib.Transformer.from_config(cfg, seed=1)


@pytest.mark.parametrize("family", ["gpt2", "bloom", "llama", "gemma3", "cohere"])
@pytest.mark.parametrize("freeze_head", [False, True])
def test_batch_logps_with_head_on_responses_equals_full_logits(family, freeze_head):
    model, _ = loading.load_model(FIXTURES / "models" / family)
    model.train()
    weight, _ = model.unembed_params()
    weight.requires_grad_(not freeze_head)  # frozen: the gradient reaches the body only through the hidden states
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    examples = [dpo._build_example(torch.randint(3, vocab, (p,)).tolist(), torch.randint(3, vocab, (c,)).tolist(),
                                         torch.randint(3, vocab, (r,)).tolist(), None, 8, 20)
                for p, c, r in [(3, 5, 9), (8, 2, 4), (12, 15, 1)]]
    batch = collate(examples, pad_id=0)  # [6, T], right-padded, with truncated and padded rows
    # chunk_size 4: several chunks, the last one partial
    logps, counts = batch_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunked=True,
                                chunk_size=4)
    (logps * torch.linspace(-1, 2, 6)).sum().backward()  # a different upstream gradient per row
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # the direct computation (DPO reference `_get_batch_logps`): full logits, shift, mask, gather, sum
    logits = model(batch["input_ids"], batch["attention_mask"]).double()  # [6, T, V], fp64 softmax
    expected, expected_counts = dpo.sequence_logps(logits, batch["labels"])
    (expected * torch.linspace(-1, 2, 6).double()).sum().backward()
    torch.testing.assert_close(logps, expected.float(), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == expected_counts.tolist() == [sum(x != -100 for x in ex[f"{side}_labels"])
                                                           for side in ("chosen", "rejected") for ex in examples]
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert fast.keys() == reference.keys() and (weight.grad is None) == freeze_head
    # (atol relative to the largest gradient: some true gradients are 0, e.g. of key biases, and both sides
    # then hold only rounding noise)
    scale = max(g.abs().max().item() for g in reference.values())
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_plain_and_chunked_log_probs_agree_in_values_and_gradients(tied):
    """--logps plain (full logits, the reference's) and chunked (ResponseLogProbs) are one function: in fp64 they
    agree to rounding, in the log-probs and in every parameter's gradient."""
    model = tiny_random_model(tied=tied).double().train()
    torch.manual_seed(0)
    examples = [dpo._build_example(torch.randint(3, 97, (p,)).tolist(), torch.randint(3, 97, (c,)).tolist(),
                                   torch.randint(3, 97, (r,)).tolist(), None, 8, 20)
                for p, c, r in [(3, 5, 9), (8, 2, 4), (12, 15, 1)]]
    batch = collate(examples, pad_id=0)
    results = {}
    for chunked in (False, True):
        model.zero_grad()
        logps, counts = batch_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                    chunked=chunked, chunk_size=4)
        (logps * torch.linspace(-1, 2, 6, dtype=torch.float64)).sum().backward()
        results[chunked] = logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}
    (plain, plain_n, plain_grads), (chunked, chunked_n, chunked_grads) = results[False], results[True]
    assert plain.dtype == chunked.dtype == torch.float64 and torch.equal(plain_n, chunked_n)
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-12)
    assert plain_grads.keys() == chunked_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_response_log_probs_gradcheck():
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 20, (13,))
    fn = lambda h, w: dpo.ResponseLogProbs.apply(h, w, targets, 4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))
    expected = (hidden @ weight.T).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(fn(hidden, weight), expected)


def test_compute_logps_splits_chosen_and_rejected():
    model = tiny_random_model()
    examples = [dpo._build_example([1, 5, 6], [7, 8], [9, 10, 11, 12], 1, 8, 20) for _ in range(3)]
    batches = [collate(examples[:2], 0), collate(examples[2:], 0)]
    out = compute_logps(model, batches, "cpu")
    assert out["chosen_logps"].shape == out["rejected_logps"].shape == (3,)
    # both responses cut to the shorter one's 2 tokens
    assert out["chosen_tokens"].tolist() == [2, 2, 2] and out["rejected_tokens"].tolist() == [2, 2, 2]
    lp, _ = batch_logps(model, **{k: v for k, v in batches[0].items()})
    torch.testing.assert_close(out["chosen_logps"][:2], lp[:2].detach())
    torch.testing.assert_close(out["rejected_logps"][:2], lp[2:].detach())


def test_response_budget_cuts_both_sides_and_drops_short_pairs():
    # prompt [1, 5], responses of 3 / 5 / 4 tokens; a budget of 3 keeps only pairs whose sides both exceed 3
    assert dpo._build_example([1, 5], [7, 8, 9], [9, 10, 11, 12, 13], 1, 8, 20, response_tokens=3) is None
    ex = dpo._build_example([1, 5], [7, 8, 9, 10], [9, 10, 11, 12, 13], 1, 8, 20, response_tokens=3)
    assert ex["chosen_input_ids"] == [1, 5, 7, 8, 9] and ex["rejected_input_ids"] == [1, 5, 9, 10, 11]
    assert ex["chosen_labels"] == [-100, -100, 7, 8, 9]
    assert dpo._build_example([1, 5], [7, 8, 9], [9, 10, 11, 12], 1, 8, 20)["rejected_input_ids"] == [1, 5, 9, 10, 11]
    with pytest.raises(ValueError, match="--response-tokens \\(80\\) must be >= 1 and fit beside the prompt"):
        train_config.resolve_config(["--response-tokens", "80", "--max-len", "96", "--device", "cpu"])


class WordTokenizer:
    """Whitespace tokenizer with the project's Tokenizer interface, so truncation rules read in words."""

    bos_id, eos_id, pad_id, add_bos = 1, 2, 0, True

    def encode(self, text, add_special=True):
        return ([self.bos_id] if add_special and self.add_bos else []) + [100 + int(w) for w in text.split()]


def test_truncation_rules():
    tok = WordTokenizer()
    prompt = " ".join(str(i) for i in range(10))  # 10 words + BOS = 11 tokens
    ex = tokenize_pair(tok, prompt, "50 51 52", "60 61 62 63 64 65 66 67 68 69", max_prompt_len=4, max_len=9)
    # prompt: BOS kept, then the LAST max_prompt_len - 1 words (the response continues the end of the prompt)
    assert ex["prompt_input_ids"] == [1, 107, 108, 109]
    # both responses cut to the shorter one's 3 tokens; no EOS on either side
    assert ex["chosen_input_ids"] == [1, 107, 108, 109, 150, 151, 152]
    assert ex["chosen_labels"] == [-100] * 4 + [150, 151, 152]  # loss only on the response
    assert ex["rejected_input_ids"] == [1, 107, 108, 109, 160, 161, 162]
    assert ex["rejected_labels"] == [-100] * 4 + [160, 161, 162]
    # the budget max_len - prompt tokens (9 - 4 = 5) cuts both when both are longer
    long = tokenize_pair(tok, prompt, "50 51 52 53 54 55 56", "60 61 62 63 64 65 66 67", max_prompt_len=4, max_len=9)
    assert long["chosen_labels"][4:] == [150, 151, 152, 153, 154] and long["rejected_labels"][4:] == [160, 161, 162,
                                                                                                      163, 164]
    short = tokenize_pair(tok, "3 4", "5", "6 7", max_prompt_len=4, max_len=9)
    assert short["chosen_input_ids"] == [1, 103, 104, 105] and short["rejected_input_ids"] == [1, 103, 104, 106]
    assert short["chosen_labels"][:3] == [-100] * 3
    tok.add_bos = False  # without BOS, left truncation keeps exactly the last max_prompt_len tokens
    assert tokenize_pair(tok, prompt, "5", "6", max_prompt_len=4, max_len=9)["prompt_input_ids"] == [106, 107, 108, 109]


def test_builder_gives_equal_lengths_and_no_eos_on_real_pairs():
    """On the real English training pairs with the default model's tokenizer: every pair's two responses have the
    same token count and neither ends in (or holds) EOS, at the CPU preset's max_len and the paper's."""
    import design
    tok = design.load_tokenizer_of(DEFAULT_MODEL)
    pairs = design.default_split()["train"]
    for max_len in (96, 256):
        for ex in dpo.tokenize_pairs(tok, pairs, 64, max_len):
            n = len(ex["prompt_input_ids"])
            chosen, rejected = ex["chosen_input_ids"][n:], ex["rejected_input_ids"][n:]
            assert len(chosen) == len(rejected) >= 1 and len(ex["chosen_input_ids"]) <= max_len
            assert tok.eos_id not in chosen and tok.eos_id not in rejected


def test_real_tokenizer_encodes_prompt_with_bos_and_responses_without():
    from tokenizer import Tokenizer
    tok = Tokenizer.from_dir(TINY_MODEL)
    ex = tokenize_pair(tok, "Hello there", " general", " general kenobi", max_prompt_len=64, max_len=256)
    assert ex["prompt_input_ids"] == tok.encode("Hello there")
    response = tok.encode(" general", add_special=False)  # no EOS; the longer rejected side is cut to this length
    assert ex["chosen_input_ids"] == tok.encode("Hello there") + response
    assert ex["rejected_input_ids"] == tok.encode("Hello there") + tok.encode(" general kenobi", add_special=False)[
        :len(response)]
    assert ex["chosen_input_ids"].count(tok.bos_id) == (1 if tok.add_bos else 0)


# -----------------------------------------------------------------------------
# configuration


def pretend_cuda(monkeypatch):
    """resolve_config refuses a --device this machine lacks; the default rules for CUDA are tested anyway."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_cpu_preset_applies_only_to_unset_flags_of_the_default_model(monkeypatch):
    pretend_cuda(monkeypatch)
    cfg, source = train_config.resolve_config([])
    for k, v in train_config.CPU_PRESET.items():
        assert getattr(cfg, k) == v and source[k] == "CPU preset"
    assert cfg.optimizer == "rmsprop" and cfg.batch_size == 4 and cfg.patience == 10
    cfg, source = train_config.resolve_config(["--lr", "1e-5", "--no-freeze-embeddings"])
    assert cfg.lr == 1e-5 and source["lr"] == "flag" and cfg.freeze_embeddings is False and cfg.max_len == 96
    cfg, _ = train_config.resolve_config(["--model", "other"])
    assert (cfg.lr, cfg.warmup_steps, cfg.max_len, cfg.max_steps, cfg.freeze_embeddings, cfg.eval_every) == \
        (1e-5, 150, 256, None, False, 25)
    cfg, _ = train_config.resolve_config(["--device", "cuda"])
    assert cfg.lr == 1e-5
    with pytest.raises(ValueError, match="max-len"):
        train_config.resolve_config(["--max-len", "32", "--max-prompt-len", "64"])
    assert "CPU PRESET" in train_config.build_parser().format_help()
    status, out, _ = cli("train_dpo.py", "--help")  # the script's own docstring teaches its use
    assert status == 0 and "Direct Preference Optimization" in out and "--resume" in out


def test_log_prob_path_and_compute_dtype_defaults(monkeypatch):
    pretend_cuda(monkeypatch)
    cfg, _ = train_config.resolve_config(["--model", "other", "--device", "cpu"])
    assert (cfg.logps, cfg.dtype) == ("plain", "fp32")  # the reference's log-probs; fp32 on CPU
    cfg, source = train_config.resolve_config(["--device", "cpu"])
    assert cfg.logps == "chunked" and source["logps"] == "CPU preset"  # 262k vocabulary: no full logits
    cfg, _ = train_config.resolve_config(["--model", "other", "--device", "cuda"])
    assert cfg.dtype == "bf16"
    cfg, _ = train_config.resolve_config(["--device", "cpu", "--dtype", "bf16", "--logps", "plain"])
    assert (cfg.logps, cfg.dtype) == ("plain", "bf16")
    key = runstate.reference_key  # the cached reference log-probs are keyed by the path (it moves the last bits)
    assert key(cfg, [], []) != key(dataclasses.replace(cfg, logps="chunked"), [], [])


# -----------------------------------------------------------------------------
# end to end on a tiny checkpoint

PROMPTS = ["the cat sat on", "we went to the", "my friend said", "a long day at", "they told me that",
           "after the game", "in the morning", "she looked at", "he wrote a", "our neighbours are",
           "at the station", "this weekend I", "the teacher said", "last night we", "the old house",
           "before dinner", "on the radio", "down the road", "at the market", "during the trip"]


def write_pairs(path, n=20, bad_line=None):
    rows = [json.dumps({"prompt": PROMPTS[i % len(PROMPTS)] + f" {i}", "chosen": " a kind and calm reply",
                        "rejected": " rude nasty words words words"}) for i in range(n)]
    if bad_line is not None:
        rows.insert(bad_line - 1, json.dumps({"prompt": "oops", "chosen": "fine"}))  # no 'rejected'
    path.write_text("\n".join(rows) + "\n")
    return path


def run_args(tmp_path, out, *extra):
    return ["--model", str(TINY_MODEL), "--data", str(write_pairs(tmp_path / "pairs.jsonl")), "--out", str(out),
            "--optimizer", "adamw", "--lr", "1e-3", "--warmup-steps", "0", "--batch-size", "4",
            "--eval-every", "4", "--log-every", "1", "--eval-batch-size", "4", "--valid-frac", "0.2",
            "--max-len", "24", "--max-prompt-len", "12", *extra]


def read_metrics(run_dir, drop_timing=True):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (drop_timing and k in TIMING_KEYS)} for r in rows]


def pair_loss(model_dir, tmp_path):
    """Mean DPO loss and reward accuracy of a checkpoint on the training pairs, vs the starting model."""
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    policy, tok = loading.load_model(model_dir)
    start, _ = loading.load_model(TINY_MODEL)
    examples = [tokenize_pair(tok, p["prompt"], p["chosen"], p["rejected"], 12, 24) for p in pairs]
    batches = [collate(examples[i:i + 4], tok.pad_id) for i in range(0, len(examples), 4)]
    pol, ref = compute_logps(policy, batches, "cpu"), compute_logps(start, batches, "cpu")
    losses, cr, rr = preference_loss(pol["chosen_logps"], pol["rejected_logps"], ref["chosen_logps"],
                                     ref["rejected_logps"], beta=0.1)
    return losses.mean().item(), (cr > rr).float().mean().item()


def test_training_lowers_loss_and_raises_reward_accuracy(tmp_path):
    out = tmp_path / "run"
    result = train_dpo.main(run_args(tmp_path, out, "--max-steps", "12"))
    assert result["step"] == 12
    loss, accuracy = pair_loss(out / "last", tmp_path)
    assert loss < 0.5 * math.log(2) and accuracy >= 0.9
    metrics = read_metrics(out)
    train = [m for m in metrics if m["split"] == "train"]
    valid = [m for m in metrics if m["split"] == "valid"]
    assert [m["step"] for m in train] == list(range(1, 13)) and [m["step"] for m in valid] == [4, 8, 12]
    assert train[-1]["loss"] < train[0]["loss"] and valid[-1]["reward_accuracy"] > 0.5
    for m in metrics:
        assert {"step", "split", "loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
                "logps_chosen", "logps_rejected"} <= set(m)
    # best/ is the lowest validation loss, loadable by load_model; last/ has the resume state
    best = min(valid, key=lambda m: m["loss"])
    assert valid[-1]["best_val_loss"] == best["loss"]
    assert (out / "best" / "config.json").exists() and (out / "last" / "state.pt").exists()
    state = torch.load(out / "last" / "state.pt", weights_only=True)
    assert state["step"] == 12 and state["best_step"] == best["step"]
    assert (out / "ref_logps.pt").exists() and json.loads((out / "config.json").read_text())["lr"] == 1e-3


def test_valid_data_file_is_the_validation_set(tmp_path):
    pairs = [json.loads(line) for line in write_pairs(tmp_path / "pairs.jsonl").read_text().splitlines()]
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(json.dumps(p) + "\n" for p in pairs[:3]))
    train, held, _ = train_valid_pairs(tmp_path / "pairs.jsonl", valid)
    assert len(train) == len(pairs) and [p["prompt"] for p in held] == [p["prompt"] for p in pairs[:3]]
    with pytest.raises(ValueError, match="--valid-data needs --data"):
        train_config.check_config(train_config.TrainConfig(valid_data=str(valid)))


def test_seed_sets_data_order_and_lora_init(tmp_path):
    assert torch.equal(train_dpo.epoch_order(20, 7, 0), train_dpo.epoch_order(20, 7, 0))
    assert not torch.equal(train_dpo.epoch_order(20, 7, 0), train_dpo.epoch_order(20, 8, 0))
    assert not torch.equal(train_dpo.epoch_order(20, 7, 0), train_dpo.epoch_order(20, 7, 1))  # epochs differ too
    # end to end, with LoRA (random A init, dropout): the same seed repeats the run, another seed does not
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        train_dpo.main(run_args(tmp_path, tmp_path / name, "--max-steps", "2", "--lora-rank", "2",
                                "--lora-dropout", "0.5", "--seed", seed))
        runs[name] = read_metrics(tmp_path / name)
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    full, parts = tmp_path / "full", tmp_path / "parts"
    train_dpo.main(run_args(tmp_path, full, "--max-steps", "10", "--log-every", "2"))
    # interrupted twice, at steps that are neither evaluation nor log points (the metric sums of the open log
    # window travel in state.pt): 3 steps, then resumed to 7 (the reference cache is extended with the
    # starting model), then to 10 (the cache is reused)
    train_dpo.main(run_args(tmp_path, parts, "--max-steps", "3", "--log-every", "2"))
    # a killed run may have logged past its checkpoint: those lines must be dropped on resume
    with open(parts / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 99, "split": "train", "loss": 0.0}) + "\n")
    train_dpo.main(["--out", str(parts), "--resume", "--max-steps", "7"])
    calls = []
    monkeypatch.setattr(runstate, "compute_logps", lambda *a, **k: calls.append(1))
    capsys.readouterr()
    train_dpo.main(["--out", str(parts), "--resume", "--max-steps", "10"])
    assert calls == [] and "reusing" in capsys.readouterr().out  # the cached reference log-probs were reused
    assert read_metrics(parts) == read_metrics(full)
    state = torch.load(parts / "last" / "state.pt", weights_only=True)
    assert state["step"] == 10
    for name, t in torch.load(full / "last" / "state.pt", weights_only=True)["optimizer"]["state"].items():
        torch.testing.assert_close(state["optimizer"]["state"][name]["exp_avg"], t["exp_avg"], rtol=0, atol=0)


def test_resume_refuses_a_changed_run_and_fresh_run_refuses_a_used_dir(tmp_path):
    out = tmp_path / "run"
    train_dpo.main(run_args(tmp_path, out, "--max-steps", "1"))
    with pytest.raises(ValueError, match="already holds a run"):
        train_dpo.main(run_args(tmp_path, out, "--max-steps", "1"))
    with pytest.raises(ValueError, match="--beta"):
        train_dpo.main(["--out", str(out), "--resume", "--beta", "0.5"])


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    # lr 0: the validation loss never gets lower than at the first evaluation, so patience runs out
    out = tmp_path / "run"
    result = train_dpo.main(run_args(tmp_path, out, "--max-steps", "40", "--lr", "0", "--patience", "2",
                                     "--eval-every", "2"))
    assert result["step"] == 6 and "early stopping" in result["stop_reason"] and result["best_step"] == 2
    assert [m["step"] for m in read_metrics(out) if m["split"] == "valid"] == [2, 4, 6]
    assert (out / "best" / "config.json").exists()


@pytest.mark.parametrize("logps", ["plain", "chunked"])
def test_frozen_reference_model_matches_cached_log_probs(tmp_path, logps):
    train_dpo.main(run_args(tmp_path, tmp_path / "cache", "--max-steps", "4", "--logps", logps))
    train_dpo.main(run_args(tmp_path, tmp_path / "frozen", "--max-steps", "4", "--ref-model", "frozen",
                            "--logps", logps))
    cached, frozen = read_metrics(tmp_path / "cache"), read_metrics(tmp_path / "frozen")
    assert [m["step"] for m in cached] == [m["step"] for m in frozen]
    for a, b in zip(cached, frozen):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert not (tmp_path / "frozen" / "ref_logps.pt").exists()


def test_activation_checkpointing_gives_the_same_run(tmp_path, monkeypatch):
    train_dpo.main(run_args(tmp_path, tmp_path / "plain", "--max-steps", "3"))
    real, calls = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    train_dpo.main(run_args(tmp_path, tmp_path / "ckpt", "--max-steps", "3", "--activation-checkpointing"))
    assert len(calls) == 3 * 3  # 3 blocks per training forward, none in the no-grad reference/eval passes
    for a, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ckpt"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)


def test_bad_rows_stop_the_run_unless_skipped(tmp_path, capsys):
    data = write_pairs(tmp_path / "bad.jsonl", bad_line=3)
    args = run_args(tmp_path, tmp_path / "run", "--max-steps", "1")
    args[args.index("--data") + 1] = str(data)
    with pytest.raises(ValueError, match=r"bad.jsonl:3.*rejected"):
        train_dpo.main(args)
    train_dpo.main(args + ["--skip-bad"])
    assert "skipped 1 bad row" in capsys.readouterr().out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = dpo.preference_loss, []

    def poisoned(*args, **kwargs):
        losses, chosen, rejected = real_loss(*args, **kwargs)
        calls.append(1)
        # training forwards: 1 per step; evaluation at step 4 adds 1 (4 valid pairs, eval batch 4)
        return (losses * float("nan") if len(calls) == 7 else losses), chosen, rejected

    monkeypatch.setattr(dpo, "preference_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"step 6\b.*last good checkpoint is .*last"):
        train_dpo.main(run_args(tmp_path, out, "--max-steps", "12"))
    state = torch.load(out / "last" / "state.pt", weights_only=True)
    assert state["step"] == 4
    weights, _ = loading.load_model(out / "last")
    assert all(torch.isfinite(p).all() for p in weights.parameters())
    assert max(m["step"] for m in read_metrics(out)) == 5  # nothing logged from the poisoned step on


def test_an_overflowing_update_is_not_saved(tmp_path):
    """The loss of step 1 is finite (computed before the update); the weights after it are not: RMSprop's first
    step moves each weight by lr * g / sqrt(0.01 g^2) = 10 lr, past float32's 3.4e38."""
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="non-finite weights after step 1"):
        train_dpo.main(run_args(tmp_path, out, "--max-steps", "1", "--optimizer", "rmsprop", "--lr", "1e38"))
    assert not (out / "last").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
    (["--warmup-steps", "-5"], "--warmup-steps must be >= 0"),
])
def test_flags_that_would_train_silently_wrong_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        train_config.resolve_config(["--model", "org/other", *flags])


def test_the_run_directory_may_not_be_the_model_directory(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(ValueError, match="is the --model directory"):
        train_config.resolve_config(["--model", str(model_dir), "--out", str(model_dir)])


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    with exclusive(out / "metrics.jsonl"):  # as a first train_dpo.py on this --out holds it
        with pytest.raises(BlockingIOError, match="metrics.jsonl is being written by another process"):
            train_dpo.main(run_args(tmp_path, out, "--max-steps", "1"))
    assert not (out / "config.json").exists()


def test_corrupted_resume_state_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    train_dpo.main(run_args(tmp_path, out, "--max-steps", "1"))
    (out / "last" / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="state.pt: corrupted resume state"):
        train_dpo.main(["--out", str(out), "--resume"])
    proc = subprocess.run([sys.executable, "train_dpo.py", "--out", str(out), "--resume"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "corrupted resume state" in proc.stderr
    # a good state next to truncated weights
    (out / "last").rename(out / "broken")
    train_dpo.main(run_args(tmp_path, out, "--max-steps", "1"))
    weights = out / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="last: corrupted checkpoint"):
        train_dpo.main(["--out", str(out), "--resume"])


# LoRA without dropout: dropout masks come from each process's own RNG stream, so they differ from one process's
@pytest.mark.parametrize("extra", [[], ["--lora-rank", "4", "--lora-dropout", "0", "--lr", "1e-2"]], ids=["full", "lora"])
def test_ddp_two_processes_match_one_process(tmp_path, extra):
    single = tmp_path / "single"
    train_dpo.main(run_args(tmp_path, single, "--max-steps", "4", "--batch-size", "4", *extra))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", "train_dpo.py",
                           *run_args(tmp_path, tmp_path / "ddp", "--max-steps", "4", "--batch-size", "4", *extra)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_metrics(single), read_metrics(tmp_path / "ddp")
    assert [(m["step"], m["split"]) for m in one] == [(m["step"], m["split"]) for m in two]
    for a, b in zip(one, two):
        for key in ("loss", "reward_accuracy", "reward_margin", "logps_chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_train_dpo_response_budget_drops_and_counts_short_pairs(tmp_path, capsys):
    tiny = Path(__file__).parent / "fixtures" / "models" / "gemma3"
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"the day {i} was", "chosen": " calm and kind and quiet", "rejected": " rude and nasty and loud"}
            for i in range(6)] + [{"prompt": "x", "chosen": " ok", "rejected": " rude and nasty and loud"}] * 2
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = train_dpo.main(["--model", str(tiny), "--data", str(pairs), "--out", str(tmp_path / "run"),
                              "--response-tokens", "3", "--max-len", "40", "--max-prompt-len", "20", "--batch-size",
                              "2", "--max-steps", "1", "--eval-every", "1", "--valid-frac", "0.25", "--device", "cpu"])
    kept = summary["pairs_kept"]
    assert kept["train"][1] + kept["valid"][1] == 8 and kept["train"][0] + kept["valid"][0] == 6
    assert f"--response-tokens 3: kept {kept['train'][0]} of {kept['train'][1]} train" in capsys.readouterr().out
