"""probe.py: the probe, ROC-AUC, value-vector ranking, hooks for activations and interventions."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import probe
from model import load_model

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
    got = probe.generation_activations(model, tok, prompts, neurons, max_new_tokens=4, batch_size=2)
    # Reference: decode one prompt at a time and record the activation of the position producing each token.
    want = torch.zeros(len(neurons))
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt)])
        new = generate(model, ids, torch.ones_like(ids), 4, greedy=True, eos_id=tok.eos_id)[0]
        seq = torch.cat([ids[0], new])
        _, cache = model.run_with_cache(seq[None], None, ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"])
        P = ids.shape[1]
        eos = (new == tok.eos_id).nonzero()
        n_valid = int(eos[0]) + 1 if len(eos) else 4  # tokens up to and including the first EOS
        for k, (layer, neuron) in enumerate(neurons):
            want[k] += cache[f"blocks.{layer}.mlp.hook_post"][0, P - 1:P - 1 + n_valid, neuron].mean()
    torch.testing.assert_close(got, want / len(prompts), atol=1e-5, rtol=1e-4)


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


def test_probe_scorer_reads_its_base_model_from_the_file(tmp_path, llama):
    model, tok = llama
    model.name_or_path = str(FIXTURES / "llama")
    w, b = torch.randn(model.config.d_model), torch.tensor(-0.2)
    probe.save_probe(tmp_path / "judge.safetensors", w, b, model, probe.last_layer(model), {"kind": "judge"})
    scorer = probe.ProbeScorer(tmp_path / "judge.safetensors")
    texts = ["gut gemacht", "du Idiot", "良い"]
    feats = probe.text_features(model, tok, texts)
    assert scorer.score(texts, ["de", "de", "ja"]) == pytest.approx(torch.sigmoid(feats @ w + b).tolist(), abs=1e-6)
