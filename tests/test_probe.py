"""probe.py: the probe, ROC-AUC, value-vector ranking, hooks for activations and interventions, random baselines."""
import json
from pathlib import Path
from types import SimpleNamespace

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


def test_probes_trained_side_by_side_equal_separate_trainings():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g), (torch.rand(60, generator=g) > 0.5).long()
    stacked, _ = probe.train_linear(x, torch.stack([y, 1 - y]), lr=1e-2, epochs=3)
    for row, labels in zip(stacked, (y, 1 - y)):
        torch.testing.assert_close(row, probe.train_linear(x, labels, lr=1e-2, epochs=3)[0])
    shuffled = probe.shuffled_label_probes(x, y, 4, 1e-2, 3, seed=0)
    assert shuffled.shape == (4, 8) and torch.equal(shuffled, probe.shuffled_label_probes(x, y, 4, 1e-2, 3, seed=0))


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
    w, b = probe.load_probe(probe.data_path(*probe.PAPER_PROBE), 2048)
    assert w.shape == (2048,) and torch.isfinite(w).all() and float(b) == 0.0
    with pytest.raises(ValueError, match="d_model is 640"):
        probe.load_probe(probe.data_path(*probe.PAPER_PROBE), 640)


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


def test_matched_random_neurons_match_layers_counts_and_activation_levels():
    # Levels rise with the neuron index; the kept neurons are among the most active of their layer.
    levels = np.stack([np.linspace(-1, 1, 128), np.linspace(-2, 2, 128)])
    kept = [(0, 120), (0, 125), (1, 110), (1, 127)]
    sets = probe.matched_random_neurons(kept, levels, 20, seed=3)
    assert len(sets) == 20
    kept_level = np.mean([levels[l, n] for l, n in kept])
    for s in sets:
        assert [layer for layer, _ in s] == [layer for layer, _ in kept]  # neuron j stands in for kept[j]
        assert len(set(s)) == len(s) and not set(s) & set(kept)
        for (layer, n), (_, k) in zip(s, kept):
            # each stand-in is among the MATCH_POOL neurons of its layer nearest in level (kept and taken ones aside)
            step = levels[layer, 1] - levels[layer, 0]
            assert abs(levels[layer, n] - levels[layer, k]) <= (probe.MATCH_POOL + len(kept)) * step + 1e-9
    match = probe.match_report(kept, sets, levels)
    assert abs(match["random_level"] - kept_level) < 0.1 and match["kept_level"] == pytest.approx(kept_level)
    # Unmatched draws from the same layers sit near the layer mean (0), far below the kept set's level.
    rng = np.random.default_rng(0)
    unmatched = [np.mean([levels[l, rng.integers(128)] for l, _ in kept]) for _ in range(20)]
    assert kept_level - np.mean(unmatched) > 1.0
    assert probe.matched_random_neurons(kept, levels, 20, seed=3) == sets
    assert probe.matched_random_neurons(kept, levels, 20, seed=4) != sets


def test_twenty_sets_let_the_rank_test_reach_p_below_005():
    # The kept value beats every random set: p = 1 / (1 + sets), under 0.05 only from 20 sets on.
    assert probe.rank_p(-1.0, np.zeros(20), -1) == pytest.approx(1 / 21) == probe.p_floor(20)
    assert probe.rank_p(-1.0, np.zeros(20), -1) < 0.05 < probe.rank_p(-1.0, np.zeros(10), -1)
    assert probe.rank_p(1.0, np.zeros(20), +1) < 0.05 and probe.rank_p(1.0, np.zeros(20), -1) == 1.0
    # Through activation_stats: 20 random sets that do not move, the kept neurons drop.
    before, after = np.ones((4, 2 * 21)), np.ones((4, 2 * 21))
    after[:, :2] = 0.0
    s = probe.activation_stats(before, after, n_kept=2, n_sets=20, n_boot=100)
    assert s["p_rank"] == pytest.approx(1 / 21) and s["p_rank"] < 0.05 and s["p_floor"] == pytest.approx(1 / 21)


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


def write_vectors(path, kept, indices=(), random_selected=()):
    """A hand-made vectors.json with its neuron_levels.safetensors (random levels for the 2 x 128 llama fixture)."""
    levels = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    probe.write_safetensors(path.parent / "neuron_levels.safetensors", {"levels": levels})
    path.write_text(json.dumps({"kept": [{"layer": l, "neuron": n} for l, n in kept],
                                "selection": {"indices": list(indices)}, "levels": "neuron_levels.safetensors",
                                "random_selected": {"source": "test", "sets": [list(map(list, s))
                                                                               for s in random_selected]}}))
    return path


def test_project_compares_kept_with_the_vectors_random_directions_select(tmp_path):
    sets = [[(0, i), (1, 2 * i)] for i in range(20)] + [[]]  # a set where nothing fired is left out of the rank test
    vectors = write_vectors(tmp_path / "vectors.json", [(0, 1), (1, 3), (1, 9)], random_selected=sets)
    probe.main(["project", "--model", str(FIXTURES / "llama"), "--out", str(tmp_path), "--vectors", str(vectors),
                "--top-tokens", "5", "--judge-kind", "none"])
    out = json.loads((tmp_path / "project.json").read_text())
    assert out["random"]["n_sets"] == 21 and out["random"]["source"] == "test"
    assert set(out["baseline"]) == {"lexicon_toxic_share", "n_scripts", "multiscript"}
    by_neuron = {(r["layer"], r["neuron"]): r for r in out["random"]["vectors"]}
    for b in out["baseline"].values():
        assert b["n_kept"] == 3 and b["n_random"] == 40 and 0 < b["p"] <= 1
        assert b["n_sets"] == 20 and b["p_floor"] == pytest.approx(1 / 21) and b["p_floor"] <= b["p_rank"] <= 1
        assert b["kept_ci"][0] <= b["kept_mean"] <= b["kept_ci"][1]
    # a set's mean is the mean over the vectors that set selected (neuron (0, 1) is also kept, so not listed)
    second = [by_neuron[(0, 2)]["n_scripts"], by_neuron[(1, 4)]["n_scripts"]]
    assert out["baseline"]["n_scripts"]["set_means"][2] == pytest.approx(np.mean(second))
    assert out["baseline"]["n_scripts"]["kept_mean"] == pytest.approx(np.mean([v["n_scripts"] for v in out["vectors"]]))
    assert all(len(v["top_tokens"]) == 5 for v in out["vectors"])


def test_random_value_vectors_go_through_the_same_selection(tmp_path):
    model_dir = str(FIXTURES / "llama")
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": f"text number {i} " + "x" * (i % 7), "label": i % 2}) + "\n"
                            for i in range(40)))
    probe.main(["train", "--model", model_dir, "--out", str(tmp_path), "--data", str(data), "--epochs", "2",
                "--shuffled-probes", "20", "--max-len", "16"])
    probe.main(["vectors", "--model", model_dir, "--out", str(tmp_path), "--probe", str(tmp_path / "probe.safetensors"),
                "--top-k", "12", "--limit", "2", "--max-new-tokens", "3", "--random-sets", "20"])
    out = json.loads((tmp_path / "vectors.json").read_text())
    model, _ = load_model(FIXTURES / "llama")
    levels = probe.load_levels(tmp_path / "vectors.json", model)
    directions, source = probe.baseline_directions(tmp_path / "probe.safetensors", model.config.d_model, 20, 0)
    assert source == out["random_selected"]["source"] == "probes trained on shuffled labels"
    assert out["random_selected"]["n_sets"] == 20
    # Kept and random sets: the same top-k by cosine with their direction, then the same firing filter.
    w, _ = probe.load_probe(tmp_path / "probe.safetensors", model.config.d_model)
    for direction, got in [(w, [[v["layer"], v["neuron"]] for v in out["kept"]])] + list(
            zip(directions, out["random_selected"]["sets"])):
        top = probe.rank_value_vectors(model, direction, 12)
        assert got == [[l, n] for l, n, _ in top if levels[l, n] > 0]
    assert [v["activation"] for v in out["ranked"]] == pytest.approx([float(levels[v["layer"], v["neuron"]])
                                                                      for v in out["ranked"]])
    assert len(json.loads((tmp_path / "train.json").read_text())["shuffled_probes"]["valid_roc_auc"]) == 20


def test_activations_against_itself_change_nothing(tmp_path):
    indices, _ = probe.selection_prompts(0, 2)
    vectors = write_vectors(tmp_path / "vectors.json", [(0, 1), (1, 3)], indices)
    model = str(FIXTURES / "llama")
    probe.main(["activations", "--model", model, "--dpo-model", model, "--out", str(tmp_path), "--vectors",
                str(vectors), "--langs", "en", "de", "--limit", "3", "--max-new-tokens", "2", "--random-sets", "20",
                "--n-boot", "50"])
    out = json.loads((tmp_path / "activations.json").read_text())
    for lang in ("en", "de"):
        s = out["per_language"][lang]
        assert s["n_prompts"] == 3 and s["change"]["diff"] == 0.0 and s["random"]["set_changes"] == [0.0] * 20
        assert out["pre_dpo"][lang] == out["post_dpo"][lang] == s["before"]["mean"]
        assert s["p_rank"] == 1.0  # every random set "dropped" as much (0.0) as the kept one
    assert out["summary"]["n_lower"] == 0 and out["p_floor"] == pytest.approx(1 / 21)
    assert out["matching"]["n_sets"] == 20 and out["matching"]["pool"] == probe.MATCH_POOL


def intervene(tmp_path, offsets, kept=((1, 3),), sets=3, tokens=3, n=2):
    vectors = write_vectors(tmp_path / "vectors.json", list(kept))
    probe.main(["intervene", "--model", str(FIXTURES / "llama"), "--out", str(tmp_path), "--vectors", str(vectors),
                "--langs", "en", "de", "--offsets", offsets, "--limit", "2", "--n", str(n), "--max-new-tokens",
                str(tokens), "--n-boot", "50", "--scorer", "lexicon", "--random-sets", str(sets)])
    out = json.loads((tmp_path / "intervene.json").read_text())
    return out, [json.loads(line) for line in (tmp_path / out["texts"]).read_text().splitlines()]


def test_intervention_writes_its_texts_beside_the_scores(tmp_path):
    out, rows = intervene(tmp_path, "0,-2")
    assert len(rows) == (1 + 1 * (1 + 3)) * 2 * 2 * 2  # (offset 0 + one offset x (kept + 3 sets)) x langs x prompts x n
    assert {r["condition"] for r in rows} == {"none", "kept", "random0", "random1", "random2"}
    lexicon = LexiconScorer()
    for r in rows:
        assert isinstance(r["text"], str) and r["score"] == lexicon.score([r["text"]], [r["lang"]])[0]
    for lang in ("en", "de"):
        mean = np.mean([r["score"] for r in rows if r["lang"] == lang and r["offset"] == -2.0
                        and r["condition"] == "kept"])
        assert out["toxicity"]["-2.0"][lang] == pytest.approx(mean)
        lo, hi = out["toxicity_ci"]["-2.0"][lang]
        assert lo <= out["toxicity"]["-2.0"][lang] <= hi
    assert set(out["change_vs_zero"]) == set(out["per_offset"]) == set(out["verdicts"]) == {"-2.0"}
    report = out["per_offset"]["-2.0"]
    assert len(report["vs_random"]["all"]["random_changes"]) == 3 and set(report["vs_random"]["per_language"]) == {"en", "de"}
    assert set(probe.GUARDS) <= set(report["guards"]) and report["ppl_ratio"] > 0


def test_guards_mark_an_offset_that_breaks_the_model_invalid(tmp_path):
    # A huge offset on a quarter of a tiny model's neurons: its texts leave every language and become ~2x less
    # likely under the unshifted model (a random model's texts are noise at any offset; this is as broken as they get).
    kept = [(layer, n) for layer in (0, 1) for n in range(0, 128, 4)]
    out, rows = intervene(tmp_path, "0,1000,0.000001", kept=kept, sets=2, tokens=8, n=1)
    broken = out["per_offset"]["1000.0"]
    assert broken["verdict"] == "invalid" and broken["failed_guards"]
    assert broken["ppl_ratio"] > out["bounds"]["max_ppl_ratio"] and broken["guards"]["off_language"] == 1.0
    # A negligible offset leaves the texts as they were: no guard fails, and random sets doing the same give the
    # rank test nothing to find.
    same = out["per_offset"]["1e-06"]
    assert same["failed_guards"] == [] and same["verdict"] == "not supported"
    assert same["vs_random"]["all"]["p_rank"] == 1.0 and same["ppl_ratio"] == pytest.approx(1.0)
    texts = {(r["offset"], r["condition"], r["lang"], r["prompt_index"]): r["text"] for r in rows}
    assert all(texts[(1e-06, "kept", l, i)] == texts[(0.0, "none", l, i)] for l in ("en", "de") for i in (0, 1))


def test_text_guards_flag_degenerate_repetitive_and_off_language_texts(llama):
    _, tok = llama
    fluent = ["the cat sat on the mat and looked at the birds outside", "Der Hund ist nicht zu Hause, er ist mit dem"]
    broken = ["Connectivity Connectivity Connectivity Connectivity Connectivity Connectivity", "... !!! ???",
              "the cat sat on the mat and looked at the birds outside"]
    base = probe.text_guards(fluent, ["en", "de"], tok)
    assert base == {"n": 2, "degenerate": 0.0, "repetitive": 0.0, "off_language": 0.0}
    # repetitive: the first text; degenerate (no word): the second; off-language: English text as Russian (the
    # only text whose language the test decides: no stop word in the first, too few letters in the second)
    g = probe.text_guards(broken, ["en", "en", "ru"], tok)
    assert g["degenerate"] == pytest.approx(1 / 3) and g["repetitive"] > 0 and g["off_language"] == 1.0
    assert probe.repetitive(list(range(10))) is False and probe.repetitive([7] * 10) is True
    assert probe.repetitive([1, 2, 3]) is None  # too short to tell
    args = SimpleNamespace(max_guard_increase=0.1, max_ppl_ratio=1.5)
    assert probe.guard_failures(base, base, 1.0, args) == []
    failed = probe.guard_failures(g, base, 2.0, args)
    assert [f.split()[0] for f in failed] == ["degenerate", "repetitive", "off_language", "perplexity"]
    vs = {"direction": -1.0, "p_rank": 0.01, "kept_minus_random": {"diff": -0.2, "p": 0.01}}
    assert probe.offset_verdict(vs, failed) == "invalid" and probe.offset_verdict(vs, []) == "supported"
    assert probe.offset_verdict({**vs, "p_rank": 0.09}, []) == "not supported"
    with pytest.raises(ValueError, match="include 0"):
        probe.parse_offsets("-1,-2")
