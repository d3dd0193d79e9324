"""generate.py: exact top-p through the prefilter and its fallback, the inverse-CDF sampler, KV-cached decoding
against full recomputation, seed reproducibility independent of batch size, EOS, and resumable output."""

import json
from pathlib import Path

import pytest
import torch

import generate as G
import model as M
from tokenizer import Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "gemma3"  # tiny Gemma 3: sliding window, GQA, 512 vocab


@pytest.fixture(scope="module")
def tiny():
    cfg = M.config_from_hf(json.loads((FIXTURE / "config.json").read_text()))
    return M.Transformer.from_config(cfg, seed=0).eval(), Tokenizer.from_dir(FIXTURE)


def dense_probs(cand_logits, cand_ids, V):
    """The sampling distribution of `filter_logits` candidates as [B, V] probabilities."""
    return torch.zeros(cand_ids.shape[0], V, dtype=torch.float64).scatter_add(
        1, cand_ids, cand_logits.double().softmax(-1))


def reference_probs(logits, temperature, top_k, top_p):
    """transformers' warpers in float64 with a full sort: temperature, top-k, then top-p. [B, V]."""
    x = logits.double() / temperature
    if top_k > 0:
        x = x.masked_fill(x < x.topk(top_k).values[:, -1:], float("-inf"))
    probs = x.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the smallest prefix with mass >= top_p
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def row_generators(seed, rows):
    return [torch.Generator().manual_seed(seed * 1000 + r) for r in range(rows)]


# -----------------------------------------------------------------------------
# filter_logits / sample_next


def test_top_p_keeps_exactly_the_smallest_prefix_and_samples_its_renormalised_distribution():
    probs = torch.tensor([0.05, 0.4, 0.02, 0.15, 0.25, 0.03, 0.1])  # ranked: 1, 4, 3, 6, 0, 5, 2
    logits = probs.log()[None]
    for top_p, kept in [(0.3, {1}), (0.5, {1, 4}), (0.75, {1, 4, 3}), (0.85, {1, 4, 3, 6}), (1.0, set(range(7)))]:
        cand_logits, cand_ids = G.filter_logits(logits, temperature=1.0, top_p=top_p)
        assert set(cand_ids[0][cand_logits[0].isfinite()].tolist()) == kept, top_p

    N = 200_000
    cand_logits, cand_ids = G.filter_logits(logits.expand(N, -1), temperature=1.0, top_p=0.75)
    draws = G.sample_next(cand_logits, cand_ids, torch.rand(N, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(draws, minlength=7).double() / N
    expected = torch.zeros(7, dtype=torch.float64)
    expected[[1, 4, 3]] = torch.tensor([0.4, 0.25, 0.15], dtype=torch.float64) / 0.8
    assert (freq - expected).abs().max() < 0.006  # about 5 standard errors at N = 200k


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 0.9), (0.7, 0, 0.5), (0.9, 0, 0.8),
                                                       (1.3, 10, 0.8), (0.9, 20, 1.0), (0.9, 0, 1.0)])
def test_filter_logits_matches_a_full_sort_reference(temperature, top_k, top_p):
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * 3
    cand_logits, cand_ids = G.filter_logits(logits, temperature, top_k, top_p, prefilter=16)
    got = dense_probs(cand_logits, cand_ids, 300)
    torch.testing.assert_close(got, reference_probs(logits, temperature, top_k, top_p), atol=1e-5, rtol=1e-4)


def test_prefilter_fallback_equals_the_full_sort():
    # Row 0 is peaked (its 16 best tokens hold > top_p); rows 1-3 are flat (16 of 2000 tokens hold ~1%), so only
    # they must be redone with the full sort.
    logits = torch.randn(4, 2000, generator=torch.Generator().manual_seed(2)) * 0.01
    logits[0, :5] = 20.0
    _, _, short = G.prefilter_candidates(logits, 0.9, 0, 0.8, prefilter=16)
    assert short.tolist() == [False, True, True, True]
    fast = dense_probs(*G.filter_logits(logits, 0.9, 0, 0.8, prefilter=16), 2000)
    full = dense_probs(*G.filter_logits(logits, 0.9, 0, 0.8, prefilter=2000), 2000)  # one full sort, no fallback
    torch.testing.assert_close(fast, full)
    torch.testing.assert_close(fast, reference_probs(logits, 0.9, 0, 0.8), atol=1e-6, rtol=1e-5)
    assert 1500 < (fast[1] > 0).sum() < 1700  # the nucleus of a flat row: about 80% of the vocabulary


def test_sample_next_never_picks_an_excluded_token_even_at_u_near_one():
    cand_logits = torch.tensor([[2.0, 1.0, float("-inf"), float("-inf")]] * 3)
    cand_ids = torch.tensor([[7, 5, 1, 2]] * 3)
    u = torch.tensor([0.0, 0.5, 1 - 2 ** -24])
    assert G.sample_next(cand_logits, cand_ids, u).tolist() == [7, 7, 5]


# -----------------------------------------------------------------------------
# generate


def full_recompute_greedy(model, input_ids, attention_mask, steps):
    """Greedy decoding without a cache: the whole sequence is rerun for every new token."""
    ids, mask, out = input_ids, attention_mask, []
    for _ in range(steps):
        nxt = model(ids, mask)[:, -1].argmax(-1)  # [B]
        out.append(nxt)
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("hooked", [False, True])
def test_greedy_with_cache_equals_full_recompute_on_a_padded_batch(tiny, hooked):
    model, tok = tiny
    input_ids, mask = tok.pad(tok.encode_batch(["hello world, how are", "a", "the quick brown fox jumps"]))
    assert (mask == 0).any()  # the batch really is padded
    # An intervention hook (as probe.py uses) must act on every cached decoding step too.
    hooks = [("blocks.1.mlp.hook_post", lambda x, hook: x * 3.0)] if hooked else []
    with model.hooks(hooks), torch.inference_mode():
        expected = full_recompute_greedy(model, input_ids, mask, 10)
        got = G.generate(model, input_ids, mask, 10, greedy=True)
        got_n2 = G.generate(model, input_ids, mask, 10, greedy=True, n=2)  # prefill once, cache copied
    assert torch.equal(got, expected)
    assert torch.equal(got_n2, expected.repeat_interleave(2, dim=0))
    if hooked:
        with torch.inference_mode():
            assert not torch.equal(G.generate(model, input_ids, mask, 10, greedy=True), expected)


def test_the_prefilter_and_its_fallback_never_change_a_sample(tiny):
    model, tok = tiny  # a random model is nearly uniform over its 512 tokens: an 8-token prefilter is always short
    input_ids, mask = tok.pad(tok.encode_batch(["hello world", "a", "the quick brown fox"]))
    with torch.inference_mode():
        full = G.generate(model, input_ids, mask, 8, n=2, generator=row_generators(0, 6), prefilter=512)
        fallback = G.generate(model, input_ids, mask, 8, n=2, generator=row_generators(0, 6), prefilter=8)
    assert torch.equal(fallback, full)


def test_sampling_is_reproducible_and_independent_of_batch_size(tiny):
    model, tok = tiny
    prompts = ["hello world", "a", "the quick brown fox", "one more prompt here"]
    runs = [G.generate_text(model, tok, prompts, n=3, max_new_tokens=8, seed=0, batch_size=b) for b in (1, 2, 3, 4)]
    assert len(runs[0]) == 12 and all(run == runs[0] for run in runs)
    assert G.generate_text(model, tok, prompts, n=3, max_new_tokens=8, seed=1) != runs[0]
    assert len(set(runs[0][:3])) == 3  # the n samples of a prompt differ
    same_prompt_twice = G.generate_text(model, tok, ["hello", "hello"], n=2, max_new_tokens=8)
    assert len(set(same_prompt_twice)) == 4  # every (prompt index, sample index) has its own random stream

    input_ids, mask = tok.pad(tok.encode_batch(prompts))
    with torch.inference_mode():
        a = G.generate(model, input_ids, mask, 8, generator=torch.Generator().manual_seed(5))
        b = G.generate(model, input_ids, mask, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_generate_runs_under_autocast(tiny):
    model, tok = tiny
    input_ids, mask = tok.pad(tok.encode_batch(["hello world", "a"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = G.generate(model, input_ids, mask, 5, n=2, generator=row_generators(0, 4))
    assert out.shape == (4, 5) and out.dtype == torch.long and 0 <= out.min() and out.max() < 512


def test_eos_stops_a_row_and_fills_it(tiny):
    model, tok = tiny
    input_ids, mask = tok.pad(tok.encode_batch(["hello world", "a", "the quick brown fox"]))
    with torch.inference_mode():
        free = G.generate(model, input_ids, mask, 12, top_p=0.9, generator=row_generators(0, 3))
        eos = int(free[0, 2])
        stopped = G.generate(model, input_ids, mask, 12, top_p=0.9, eos_id=eos, generator=row_generators(0, 3))
    for row_free, row_stopped in zip(free.tolist(), stopped.tolist()):
        k = row_free.index(eos) + 1 if eos in row_free else len(row_free)
        assert row_stopped == row_free[:k] + [eos] * (len(row_free) - k)
    assert stopped[0, 3:].eq(eos).all()


def test_generation_ends_early_once_every_row_has_ended(tiny):
    model, tok = tiny
    input_ids, mask = tok.pad(tok.encode_batch(["hello world", "a"]))
    forwards = []
    with torch.inference_mode():
        first = G.generate(model, input_ids, mask, 1, greedy=True)[:, 0].tolist()
        with model.hooks([("hook_embed", lambda x, hook: forwards.append(x.shape))]):
            out = G.generate(model, input_ids, mask, 20, greedy=True, eos_id=first)
    assert out[:, 0].tolist() == first and out[:, 1:].eq(first[0]).all()
    assert len(forwards) == 2  # the prefill, then one step that sees every row ended


# -----------------------------------------------------------------------------
# CLI: prompt files, resumable output


@pytest.fixture
def cli(tiny, tmp_path, monkeypatch):
    """Run `python generate.py ...` in-process with the tiny model, on 5 prompts in a text file."""
    monkeypatch.setattr(G, "load_model", lambda *args, **kwargs: tiny)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\na\nthe quick brown fox\none more prompt here\nlast one\n")

    def run(out, *flags):
        G.main(["--prompts", str(prompts), "--lang", "en", "--out", str(tmp_path / out), "--n", "3",
                "--max-new-tokens", "6", "--device", "cpu", *flags])
        return tmp_path / out
    return run


def test_cli_writes_official_rows_and_resumes_a_killed_run_exactly(cli, capsys):
    ref = cli("ref.jsonl", "--batch-size", "2")
    lines = ref.read_text().splitlines(keepends=True)
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 15
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, j) for i in range(5) for j in range(3)]
    assert rows[0]["prompt"] == "hello world" and {r["lang"] for r in rows} == {"en"}
    assert all(isinstance(r["generated_text"], str) for r in rows)
    assert "tokens/s" in capsys.readouterr().out

    # A run killed while writing prompt 2: two complete prompts, one row of the third, half of the next line.
    killed = ref.with_name("killed.jsonl")
    killed.write_text("".join(lines[:7]) + lines[7][:20])
    Path(f"{killed}.meta.json").write_text(Path(f"{ref}.meta.json").read_text())
    cli("killed.jsonl", "--batch-size", "3")
    assert "resuming after 2 of 5 prompts" in capsys.readouterr().out
    assert killed.read_text() == ref.read_text()  # same rows, none lost, none duplicated

    cli("killed.jsonl", "--batch-size", "3")  # a finished file is left as it is
    assert "already done" in capsys.readouterr().out and killed.read_text() == ref.read_text()


def test_cli_refuses_to_resume_with_other_settings_or_a_foreign_file(cli, tmp_path):
    out = cli("out.jsonl")
    with pytest.raises(ValueError, match="seed=0.*seed=1"):
        cli("out.jsonl", "--seed", "1")
    (tmp_path / "nometa.jsonl").write_text(out.read_text())
    with pytest.raises(ValueError, match="without its settings file"):
        cli("nometa.jsonl")
    lines = out.read_text().splitlines(keepends=True)
    lines[4] = lines[4].replace('"prompt_index": 1', '"prompt_index": 7')
    out.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"out.jsonl:5: field 'prompt_index' is 7"):
        cli("out.jsonl")


def test_load_jobs_from_a_directory_of_language_files(tmp_path):
    (tmp_path / "de.txt").write_text("Hallo Welt\nzwei\ndrei\n")
    (tmp_path / "en.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "two"}\n')
    (tmp_path / "LICENSE").write_text("not prompts\n")
    jobs = G.load_jobs([tmp_path], limit=2)
    assert [(j["lang"], j["prompt_index"], j["prompt"]) for j in jobs] == [
        ("de", 0, "Hallo Welt"), ("de", 1, "zwei"), ("en", 0, "hello"), ("en", 1, "two")]
    assert {j["lang"] for j in G.load_jobs([tmp_path / "en.jsonl"], lang="xx")} == {"xx"}
