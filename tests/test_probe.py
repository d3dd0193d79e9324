"""probe.py: the probe, ROC-AUC, value-vector ranking, hooks for activations and interventions, random baselines."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import probe
import stats
from loading import load_model
from scorers import LexiconScorer

FIXTURES = Path(__file__).parent / "fixtures" / "models"


@pytest.fixture(scope="module")
def llama():
    return load_model(FIXTURES / "llama")


def test_probe_learns_a_separable_task():
    g = torch.Generator().manual_seed(0)
    direction = F.normalize(torch.randn(16, generator=g), dim=0)
    x = torch.randn(400, 16, generator=g)
    y = (x @ direction > 0).long()
    w, b = probe.train_linear(x[:300], y[:300], lr=1e-2, epochs=20)
    report = probe.classification_report(torch.sigmoid(x[300:] @ w + b).numpy(), y[300:].numpy())
    assert report["accuracy"] > 0.95 and report["roc_auc"] > 0.99
    assert float(b) == 0.0  # the paper's probe has no bias
    assert F.cosine_similarity(w, direction, dim=0) > 0.9


def test_roc_auc_matches_hand_computation():
    # positives 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4), (0.9>0.1), (0.4=0.4 -> 1/2), (0.4>0.1) = 3.5/4
    assert probe.roc_auc([0.9, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert probe.roc_auc([0.1, 0.2, 0.3], [1, 0, 0]) == 0.0
    assert np.isnan(probe.roc_auc([0.1, 0.2], [1, 1]))


def test_value_vector_ranking_equals_brute_force(llama):
    model, _ = llama
    w = torch.randn(model.config.d_model, generator=torch.Generator().manual_seed(1))
    ranked = probe.rank_value_vectors(model, w, 5)
    brute = []
    for layer, block in enumerate(model.blocks):
        down = block.mlp.down.weight.detach()  # [d_model, d_mlp]: column j is neuron j's value vector
        for j in range(down.shape[1]):
            brute.append((float(F.cosine_similarity(down[:, j], w, dim=0)), layer, j))
    brute.sort(reverse=True)
    assert [(l, n) for l, n, _ in ranked] == [(l, n) for _, l, n in brute[:5]]
    assert [c for _, _, c in ranked] == pytest.approx([c for c, _, _ in brute[:5]], abs=1e-6)


def test_zero_offset_is_a_no_op_and_a_large_offset_pushes_the_value_vector(llama):
    model, tok = llama
    ids, mask = tok.pad(tok.encode_batch(["Hallo Welt", "こんにちは"]), side="left")
    with torch.no_grad():
        base = model(ids, mask)
        layer, neuron = model.config.n_layers - 1, 3

        def shift(offset):
            return probe.neuron_hooks([(layer, neuron)], lambda l, idx, t: t.index_add(
                -1, idx, torch.full((*t.shape[:-1], len(idx)), offset)))

        with model.hooks(shift(0.0)):
            assert torch.equal(model(ids, mask), base)
        with model.hooks(shift(50.0)):
            pushed = model(ids, mask)
    # In the last layer the neuron's value vector is added to the residual, then the final norm and unembedding:
    # the logits move towards the tokens its projection promotes.
    promoted = model.unembed(model.value_vectors(layer)[neuron].detach()).argsort(descending=True)[:5]
    delta = (pushed - base)[:, -1]  # [B, V]
    assert (delta[:, promoted].mean(-1) > delta.mean(-1)).all()


def test_hooked_activations_equal_a_manual_forward(llama):
    model, tok = llama
    ids, mask = tok.pad(tok.encode_batch(["ein Satz", "another sentence here"]), side="right")
    _, cache = model.run_with_cache(ids, mask, ["blocks.1.mlp.hook_post"])
    block = model.blocks[1]
    with torch.no_grad():
        x = model.embed(ids)
        # recompute the residual stream into block 1 by hand, then its MLP activation
        _, pre = model.run_with_cache(ids, mask, ["blocks.1.hook_resid_pre"])
        h = pre["blocks.1.hook_resid_pre"]
        attn_out = model.run_with_cache(ids, mask, ["blocks.1.attn.hook_attn_out"])[1]["blocks.1.attn.hook_attn_out"]
        mid = h + attn_out
        manual = F.silu(block.mlp.gate(block.mlp_norm(mid))) * block.mlp.up(block.mlp_norm(mid))
    assert x.shape[:2] == ids.shape
    torch.testing.assert_close(cache["blocks.1.mlp.hook_post"], manual)


def test_generation_activations_match_recording_during_decoding(llama):
    from generate import generate

    model, tok = llama
    prompts = ["Das ist", "The quick brown"]
    neurons = [(0, 1), (1, 5), (1, 7)]
    got = probe.generation_activations(model, tok, prompts, neurons, max_new_tokens=4, batch_size=1)
    # Reference: decode one prompt at a time and record the activation of the position producing each token.
    want = torch.zeros(len(prompts), len(neurons))
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok.encode(prompt)])
        new = generate(model, ids, torch.ones_like(ids), 4, greedy=True, eos_id=tok.eos_id)[0]
        seq = torch.cat([ids[0], new])
        _, cache = model.run_with_cache(seq[None], None, ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"])
        P = ids.shape[1]
        eos = (new == tok.eos_id).nonzero()
        n_valid = int(eos[0]) + 1 if len(eos) else 4  # tokens up to and including the first EOS
        for k, (layer, neuron) in enumerate(neurons):
            want[i, k] = cache[f"blocks.{layer}.mlp.hook_post"][0, P - 1:P - 1 + n_valid, neuron].mean()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    batched = probe.generation_activations(model, tok, prompts, neurons, max_new_tokens=4, batch_size=2)
    torch.testing.assert_close(batched, want, atol=1e-5, rtol=1e-4)


def test_paper_probe_loads_without_unpickling_and_checks_the_model_size():
    w, b = probe.load_probe(probe.PAPER_PROBE, 2048)
    assert w.shape == (2048,) and torch.isfinite(w).all() and float(b) == 0.0
    with pytest.raises(ValueError, match="d_model is 640"):
        probe.load_probe(probe.PAPER_PROBE, 640)


def test_probe_round_trip_and_labelled_data_errors(tmp_path, llama):
    model, _ = llama
    model.name_or_path = "tiny"
    w, b = torch.randn(model.config.d_model), torch.tensor(0.5)
    probe.save_probe(tmp_path / "p.safetensors", w, b, model, probe.last_layer(model), {"kind": "probe"})
    w2, b2 = probe.load_probe(tmp_path / "p.safetensors", model.config.d_model)
    assert torch.equal(w, w2) and float(b2) == 0.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n\n{"text": "x", "label": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: field 'label'"):
        probe.load_labelled(bad)


def test_token_script():
    assert probe.token_script("▁Hund") == "LATIN"
    assert probe.token_script("くそ") == "HIRAGANA"
    assert probe.token_script("傻") == "CJK"
    assert probe.token_script("123") is None


# -- random baselines -------------------------------------------------------------------------------------------


def test_random_neurons_match_the_kept_layers_and_sizes_and_are_reproducible():
    kept = [(0, 1), (0, 5), (1, 7)]
    sets = probe.random_neurons(kept, 128, 5, seed=3)
    assert len(sets) == 5
    for s in sets:
        assert sorted(layer for layer, _ in s) == [0, 0, 1]
    drawn = [n for s in sets for n in s]
    assert len(set(drawn)) == len(drawn) and not set(drawn) & set(kept)
    assert probe.random_neurons(kept, 128, 5, seed=3) == sets
    assert probe.random_neurons(kept, 128, 5, seed=4) != sets
    with pytest.raises(ValueError, match="lower --random-sets"):
        probe.random_neurons(kept, 8, 5, seed=0)  # layer 0 has 6 free neurons, 10 needed


def test_compare_to_random_matches_hand_computation():
    out = probe.compare_to_random([1, 1], [0, 0, 0, 1], proportion=True)
    assert out["kept_mean"] == 1.0 and out["random_mean"] == 0.25 and out["diff"] == 0.75
    assert out["p"] == pytest.approx(stats.permutation_test([1, 1], [0, 0, 0, 1]))
    assert out["kept_ci"] == pytest.approx(stats.wilson_interval(2, 2))
    assert out["random_ci"] == pytest.approx(stats.wilson_interval(1, 4))


def test_activation_stats_on_a_toy_case():
    # 3 prompts; 2 kept neurons, then 2 random sets of 2. Kept: 1.0 -> 0.0 on every prompt (change -1).
    # Random set 1: 0.5 -> 0.5 (change 0); set 2: 0.2 -> 0.0 (change -0.2).
    before = np.array([[1, 1, 0.5, 0.5, 0.2, 0.2]] * 3)
    after = np.array([[0, 0, 0.5, 0.5, 0.0, 0.0]] * 3)
    s = probe.activation_stats(before, after, n_kept=2, n_sets=2, n_boot=200)
    assert s["before"]["mean"] == 1.0 and s["after"]["mean"] == 0.0
    assert s["change"]["diff"] == pytest.approx(-1.0) and s["change"]["ci"] == pytest.approx([-1.0, -1.0])
    assert s["random"]["set_changes"] == pytest.approx([0.0, -0.2])
    assert s["random"]["mean_change"] == pytest.approx(-0.1)
    assert s["random"]["sd_change"] == pytest.approx(np.std([0.0, -0.2], ddof=1))
    assert s["kept_minus_random"]["diff"] == pytest.approx(-0.9)
    assert s["p_rank"] == pytest.approx(1 / 3)  # no random set dropped as much: (1 + 0) / (1 + 2)
    assert s["relative_change"] == pytest.approx(-1.0)


def test_selection_and_measurement_prompts_are_disjoint():
    from data import load_rtplx, normalize_prompt

    indices, selection = probe.selection_prompts(0, None)
    info = probe.split_info(0)
    assert set(indices) <= set(info["train_indices"]) and not set(indices) & set(info["heldout_indices"])
    measured = probe.measurement_prompts(["en", "de"], None)
    assert len(measured["en"]) == len(measured["de"]) == 200
    probe.check_disjoint(selection, measured["en"])
    with pytest.raises(ValueError, match="also selected the neurons"):
        probe.check_disjoint(selection[:3], [selection[1]])
    # The probe trains on the train/valid split only: no held-out prompt among its texts.
    heldout = {normalize_prompt(r["prompt"]) for r in load_rtplx("en") if r["index"] in set(info["heldout_indices"])}
    rows = probe.rtplx_probe_data(0)
    assert rows and {label for _, label in rows} == {0, 1}
    assert not {normalize_prompt(t) for t, _ in rows} & heldout


def write_vectors(path, kept, indices=()):
    path.write_text(json.dumps({"kept": [{"layer": l, "neuron": n} for l, n in kept],
                                "selection": {"indices": list(indices)}}))
    return path


def test_project_compares_kept_with_random_vectors_of_the_same_layers(tmp_path):
    vectors = write_vectors(tmp_path / "vectors.json", [(0, 1), (1, 3), (1, 9)])
    probe.main(["project", "--model", str(FIXTURES / "llama"), "--out", str(tmp_path), "--vectors", str(vectors),
                "--random-sets", "4", "--top-tokens", "5", "--judge-kind", "none"])
    out = json.loads((tmp_path / "project.json").read_text())
    rand = out["random"]["vectors"]
    assert len(rand) == 12 and sorted(r["layer"] for r in rand) == [0] * 4 + [1] * 8
    assert set(out["baseline"]) == {"lexicon_toxic_share", "n_scripts", "multiscript"}
    for b in out["baseline"].values():
        assert b["n_kept"] == 3 and b["n_random"] == 12 and 0 < b["p"] <= 1
        assert b["kept_ci"][0] <= b["kept_mean"] <= b["kept_ci"][1]
    assert out["baseline"]["n_scripts"]["kept_mean"] == pytest.approx(np.mean([v["n_scripts"] for v in out["vectors"]]))
    assert all(len(v["top_tokens"]) == 5 for v in out["vectors"])


def test_activations_against_itself_change_nothing(tmp_path):
    indices, _ = probe.selection_prompts(0, 2)
    vectors = write_vectors(tmp_path / "vectors.json", [(0, 1), (1, 3)], indices)
    model = str(FIXTURES / "llama")
    probe.main(["activations", "--model", model, "--dpo-model", model, "--out", str(tmp_path), "--vectors",
                str(vectors), "--langs", "en", "de", "--limit", "3", "--max-new-tokens", "2", "--random-sets", "3",
                "--n-boot", "50"])
    out = json.loads((tmp_path / "activations.json").read_text())
    for lang in ("en", "de"):
        s = out["per_language"][lang]
        assert s["n_prompts"] == 3 and s["change"]["diff"] == 0.0 and s["random"]["set_changes"] == [0.0] * 3
        assert out["pre_dpo"][lang] == out["post_dpo"][lang] == s["before"]["mean"]
    assert out["summary"]["n_lower"] == 0


def test_intervention_writes_its_texts_beside_the_scores(tmp_path):
    vectors = write_vectors(tmp_path / "vectors.json", [(1, 3)])
    probe.main(["intervene", "--model", str(FIXTURES / "llama"), "--out", str(tmp_path), "--vectors", str(vectors),
                "--langs", "en", "de", "--offsets", "0,-2", "--limit", "2", "--n", "2", "--max-new-tokens", "3",
                "--n-boot", "50", "--scorer", "lexicon"])
    out = json.loads((tmp_path / "intervene.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / out["texts"]).read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 * 2  # offsets x langs x prompts x samples
    lexicon = LexiconScorer()
    for r in rows:
        assert isinstance(r["text"], str) and r["score"] == lexicon.score([r["text"]], [r["lang"]])[0]
    for lang in ("en", "de"):
        mean = np.mean([r["score"] for r in rows if r["lang"] == lang and r["offset"] == -2.0])
        assert out["toxicity"]["-2.0"][lang] == pytest.approx(mean)
        lo, hi = out["toxicity_ci"]["-2.0"][lang]
        assert lo <= out["toxicity"]["-2.0"][lang] <= hi
    assert set(out["change_vs_zero"]) == {"-2.0"}
