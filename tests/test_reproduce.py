"""reproduce.py: the smoke preset end to end on the real model, and a report whose numbers all come from the run."""
import copy
import json
import re

import pytest

import data
import reproduce
import train_config

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
    """Numbers in the body cells of every Markdown table (header, separator and first column skipped). The
    claims table is left out: its test descriptions and 'k of n languages' counts are structural, and
    test_claims_verdicts_follow_the_numbers checks that its verdicts follow the results."""
    claims = report.split("## The paper's claims, tested here")[1].split("\n## ")[0]
    report = report.replace(claims, "")
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
    for heading in ("## The paper's claims, tested here", "## Data", "## The instruments",
                    "## Toxicity before -> after English-only DPO (seed 0), judged by the feature judge",
                    "## Every run under every instrument", "## Held-out preference margins",
                    "## Bilingual retrieval and transfer", "## Why: toxic value vectors, against random ones",
                    "## Compared with the paper"):
        assert heading in report
    headline = report.split("judged by the feature judge")[1].split("##")[0]
    rows = [line.split("|")[1].strip() for line in headline.splitlines() if line.startswith("| ")]
    assert [r for r in rows if r in data.LANGS] == list(data.LANGS)
    assert any(r.startswith("pooled non-en") for r in rows)
    for name in ("report.md", "commands.sh", "toxprob.svg", "eval/judge_dpo/emt.svg", "pairs/confounds.json",
                 "pairs/placebo_train.jsonl", "probe/intervene_texts.jsonl", "dpo_placebo/metrics.jsonl"):
        assert (smoke_run / name).stat().st_size > 0
    # the same RTP-LX items in every language
    indices = {lang: [json.loads(line)["index"] for line in (smoke_run / "prompts" / f"{lang}.jsonl").open()]
               for lang in data.LANGS}
    assert all(v == indices["en"] for v in indices.values())


def set_all(obj, key, fn):
    """A copy of a results tree with fn applied to the value of every `key`."""
    if isinstance(obj, dict):
        return {k: fn(v) if k == key and isinstance(v, (int, float)) else set_all(v, key, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [set_all(v, key, fn) for v in obj]
    return obj


@pytest.mark.slow
def test_claims_verdicts_follow_the_numbers(smoke_run):
    results = reproduce.collect(smoke_run)
    significant = set_all(results, "p", lambda p: 0.001)
    verdicts = [c["verdict"] for c in reproduce.claims(significant)]
    flipped = [c["verdict"] for c in reproduce.claims(set_all(significant, "diff", lambda d: -d if d else 1.0))]
    undecided = [c["verdict"] for c in reproduce.claims(set_all(results, "p", lambda p: 0.5))]
    assert "inconclusive" not in verdicts[:3] and verdicts[:3] != flipped[:3]
    assert all(v == "inconclusive" for v in undecided[:3])
    assert sum(a != b for a, b in zip(verdicts, flipped)) >= len(verdicts) // 2


@pytest.mark.slow
def test_report_renders_when_no_effect_is_finite(smoke_run):
    """A language with no toxic sample before DPO has no EMT change; a run where none has one still reports."""
    results = set_all(reproduce.collect(smoke_run), "diff", lambda d: None)
    text = reproduce.render_report(results)
    assert "## The paper's claims, tested here" in text and "n/a" in text


def test_verdict_rules():
    assert reproduce.verdict(-0.1, 0.01, -1) == "supported"
    assert reproduce.verdict(0.1, 0.01, -1) == "not supported"
    assert reproduce.verdict(-0.1, 0.2, -1) == "inconclusive"
    assert reproduce.verdict(float("nan"), 0.01, -1) == "inconclusive"
    assert reproduce.verdict_all([(-0.1, 0.01), (-0.2, 0.001)], -1) == "supported"
    assert reproduce.verdict_all([(-0.1, 0.01), (-0.2, 0.3)], -1) == "inconclusive"
    assert reproduce.verdict_all([(-0.1, 0.01), (0.2, 0.01)], -1) == "not supported"


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


@pytest.mark.slow
def test_readme_block_is_replaced_with_the_run_tables(smoke_run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold numbers\n<!-- results:end -->\nafter\n")
    reproduce.write_readme_block(readme, smoke_run, reproduce.collect(smoke_run))
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("intro\n") and text.endswith("<!-- results:end -->\nafter\n")
    assert "| the paper's claim |" in text and "pooled non-en" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no '<!-- results:begin -->'"):
        reproduce.write_readme_block(readme, smoke_run, reproduce.collect(smoke_run))


def test_train_flags_spell_a_recipe_as_train_dpo_flags():
    assert reproduce.train_flags({"max_steps": 60, "lr": 3e-6, "freeze_embeddings": True,
                                  "activation_checkpointing": False}) == \
        ["--max-steps", 60, "--lr", "3e-06", "--freeze-embeddings", "--no-activation-checkpointing"]
    cfg, _ = train_config.resolve_config([str(a) for a in reproduce.train_flags(reproduce.PRESETS["cpu"]["dpo"])]
                                      + ["--model", "org/other"])  # no preset underneath: the flags alone
    assert all(getattr(cfg, k) == v for k, v in train_config.CPU_PRESET.items())


def test_a_run_directory_is_not_resumed_under_another_preset(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"preset": "smoke"}))
    with pytest.raises(ValueError, match="--preset smoke run"):
        reproduce.main(["--preset", "cpu", "--out", str(tmp_path)])
