"""reproduce.py: the smoke preset end to end on the real model, and a report whose numbers all come from the run."""
import copy
import re

import pytest

import data
import reproduce

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def perturb(obj):
    """Every number in a results tree changed (ints by +1, floats by +1.13); strings and keys kept."""
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return obj + 1
    if isinstance(obj, float):
        return obj + 1.13  # moves every float past the report's rounding (0 to 3 decimals)
    if isinstance(obj, dict):
        return {k: perturb(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [perturb(v) for v in obj]
    return obj


def table_numbers(report):
    """Numbers in the body cells of every Markdown table (header, separator and first column skipped)."""
    numbers, row_in_table = [], 0
    for i, line in enumerate(report.splitlines()):
        row_in_table = row_in_table + 1 if line.startswith("|") else 0
        if row_in_table > 2:
            cells = [c.strip() for c in line.strip().strip("|").split("|")][1:]
            numbers += [(i, n) for c in cells for n in NUMBER.findall(c)]
    return numbers


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    reproduce.main(["--preset", "smoke", "--out", str(out)])
    return out


@pytest.mark.slow
def test_smoke_preset_writes_a_complete_report(smoke_run):
    report = (smoke_run / "report.md").read_text()
    for heading in ("## Data", "## Toxicity before -> after DPO, per language", "## The learned judge",
                    "## Held-out preference margins", "## Bilingual retrieval and transfer",
                    "## Why: toxic value vectors", "## Full fine-tuning vs LoRA (the paper's Appendix D)",
                    "## Compared with the paper"):
        assert heading in report
    headline = report.split("## Toxicity before -> after DPO, per language")[1].split("##")[0]
    rows = [line.split("|")[1].strip() for line in headline.splitlines() if line.startswith("| ")]
    assert [r for r in rows if r in data.LANGS] == list(data.LANGS)
    assert "average" in rows
    for name in ("report.md", "commands.sh", "eval/lexicon/emt.svg", "margins/margins.svg",
                 "correlation/margins/correlation.svg", "probe/activations.svg", "probe/intervene.svg",
                 "dpo_lora_margins.svg", "dpo_lora/best/adapter_model.safetensors"):
        assert (smoke_run / name).stat().st_size > 0


@pytest.mark.slow
def test_every_number_in_the_report_comes_from_the_run(smoke_run):
    results = reproduce.collect(smoke_run)
    numbers = table_numbers(reproduce.render_report(results))
    changed = table_numbers(reproduce.render_report(perturb(copy.deepcopy(results))))
    assert len(numbers) > 200 and len(numbers) == len(changed)
    constant = [(line, a) for (line, a), (_, b) in zip(numbers, changed) if a == b]
    assert not constant, f"table numbers that did not move with the results: {constant[:10]}"


@pytest.mark.slow
def test_rerun_resumes_without_redoing_stages(smoke_run, capsys):
    reproduce.main(["--preset", "smoke", "--out", str(smoke_run)])
    out = capsys.readouterr().out
    assert out.count("done earlier, skipping") >= 10
