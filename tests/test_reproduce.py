"""reproduce.py and claims.py: the smoke preset end to end on the real model, and a report whose numbers all
come from the run."""
import copy
import shutil
import json
import re

import pytest

import claims
import data
import reproduce
import train_config

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def perturb(obj, scale=1.0):
    """Every number in a results tree changed (ints by +1, floats to x * scale + 1.13); strings and keys kept.
    scale > 1 also moves numbers the report divides first (seconds shown as minutes)."""
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return obj + 1
    if isinstance(obj, float):
        return obj * scale + 1.13  # moves every float past the report's rounding (0 to 3 decimals)
    if isinstance(obj, dict):
        return {k: perturb(v, scale) for k, v in obj.items()}
    if isinstance(obj, list):
        return [perturb(v, scale) for v in obj]
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
    results = claims.collect(smoke_run)
    assert {c["verdict"] for c in claims.claims(results)} <= {claims.TOO_FEW, "not run", "invalid"}
    results.pop("exact", None)  # as if the run had the minimum sample: the verdicts then follow p and sign
    results = set_all(set_all(results, "items", lambda n: claims.MIN_ITEMS), "n_prompts", lambda n: 16 * claims.MIN_ITEMS)
    results = set_all(set_all(results, "n_sentences", lambda n: claims.MIN_ITEMS), "n_kept", lambda n: claims.MIN_ITEMS)
    significant = set_all(set_all(results, "p", lambda p: 0.001), "p_rank", lambda p: 0.001)  # rank p over sets too
    verdicts = [c["verdict"] for c in claims.claims(significant)]
    flipped = set_all(set_all(significant, "diff", lambda d: -d if d else 1.0), "ppl_ratio", lambda x: 1 / x)
    flipped = [c["verdict"] for c in claims.claims(flipped)]
    undecided = [c["verdict"] for c in claims.claims(set_all(results, "p", lambda p: 0.5))]
    assert "inconclusive" not in verdicts[:3] and verdicts[:3] != flipped[:3]
    assert all(v == "inconclusive" for v in undecided[:3])
    assert sum(a != b for a, b in zip(verdicts, flipped)) >= len(verdicts) // 2


@pytest.mark.slow
def test_report_renders_when_no_effect_is_finite(smoke_run):
    """A language with no toxic sample before DPO has no EMT change; a run where none has one still reports."""
    results = set_all(claims.collect(smoke_run), "diff", lambda d: None)
    text = claims.render_report(results)
    assert "## The paper's claims, tested here" in text and "n/a" in text


def test_verdict_rules():
    assert claims.verdict(-0.1, 0.01, -1) == "supported"
    assert claims.verdict(0.1, 0.01, -1) == "not supported"
    assert claims.verdict(-0.1, 0.2, -1) == "inconclusive"
    assert claims.verdict(float("nan"), 0.01, -1) == "inconclusive"
    assert claims.verdict_all([(-0.1, 0.01), (-0.2, 0.001)], -1) == "supported"
    assert claims.verdict_all([(-0.1, 0.01), (-0.2, 0.3)], -1) == "inconclusive"
    assert claims.verdict_all([(-0.1, 0.01), (0.2, 0.01)], -1) == "not supported"


@pytest.mark.slow
def test_every_number_in_the_report_comes_from_the_run(smoke_run):
    results = claims.collect(smoke_run)
    numbers = table_numbers(claims.render_report(results))
    changed = table_numbers(claims.render_report(perturb(copy.deepcopy(results))))
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
    claims.write_readme_block(readme, smoke_run, claims.collect(smoke_run))
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("intro\n") and text.endswith("<!-- results:end -->\nafter\n")
    assert "| the paper's claim |" in text and "pooled non-en" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no '<!-- results:begin -->'"):
        claims.write_readme_block(readme, smoke_run, claims.collect(smoke_run))


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


# -- the report of the committed cpu run (fast: no stage runs) --------------------------------------------------

COMMITTED = reproduce.Path(__file__).resolve().parent.parent / "results" / "cpu-2026-12-02"
# Numbers the report's text states as design, not as results: alpha, the minimum sample, the guards' margins,
# the paper's figures, the language counts, the confidence level, the judge threshold, the bootstrap-floor
# formula, the paper's sample and pair counts.
DESIGN_NUMBERS = {str(x) for x in (claims.ALPHA, claims.MIN_ITEMS, claims.GUARD_MARGIN, claims.PPL_MARGIN,
                                   *claims.PAPER.values(), len(data.LANGS), len(data.LANGS) - 1)} | \
    {"95", "0.5", "1", "2", "25", "24", "576", "100", "0", "0.05"}
NAMES = ("gemma-3-270m", "mGPT-1.3B", "Appendix D", "2+ scripts", "d_mlp", "-1", "Cohen")


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """A copy of the committed cpu run (the report writes its figures into the run directory)."""
    if not COMMITTED.exists():
        pytest.skip("no committed cpu run")
    out = tmp_path_factory.mktemp("cpu") / "run"
    shutil.copytree(COMMITTED, out, ignore=shutil.ignore_patterns("best", "*.safetensors", "*.pt"))
    return out


def prose_numbers(text):
    """(line, number) for every number of the report outside its Command/Machine lines, names stripped."""
    out = []
    for i, line in enumerate(text.splitlines()):
        if line.startswith(("Command:", "Machine:")):
            continue
        for name in NAMES:
            line = line.replace(name, "")
        # Row labels, offsets (keys), language counts and list lengths come from the run but perturb keeps keys and lengths.
        line = re.sub(r"^\| [^|]*\||offset [-+]?\d+|selected on \d+|of \d+ languages|\d+ coefficients|\d+ RTP-LX items|mean of \d+ sets|judge-\w+:[0-9a-f]+", "", line)
        out.append((i, NUMBER.findall(line)))
    return out


@pytest.mark.parametrize("outputs", ["as committed", "with the current pipeline's outputs"])
def test_every_number_in_prose_and_claims_comes_from_the_run(committed, outputs):
    results = claims.collect(committed)
    if outputs != "as committed":
        results = with_new_outputs(results)
    numbers = prose_numbers(claims.render_report(results))
    changed = prose_numbers(claims.render_report(perturb(copy.deepcopy(results), scale=61.3)))
    assert sum(len(n) for _, n in numbers) > 500 and len(numbers) == len(changed)
    constant = [(line, a) for (line, before), (_, after) in zip(numbers, changed)
                for a, b in (zip(before, after) if len(before) == len(after) else ((a, a) for a in before if a in after))
                if a == b and a not in DESIGN_NUMBERS]
    assert not constant, f"numbers that did not move with the results: {constant[:15]}"


def test_committed_run_report_renders_with_links_and_the_decided_correlation(committed):
    text = claims.write_report(committed)
    svgs = {str(p.relative_to(committed)) for p in committed.rglob("*.svg")}
    assert svgs and all(f"]({f})" in text for f in svgs), [f for f in svgs if f"]({f})" not in text]
    r = claims.collect(committed)
    primary = claims.retrieval_primary(r)
    svg = (committed / "correlation" / "correlation.svg").read_text()
    metric, transfer = claims.PRIMARY_RETRIEVAL
    assert f"Retrieval {metric} vs {transfer}" in svg and f"r = {primary['pearson']['r']:.3f}" in svg
    row = next(c for c in claims.claims(r) if c["by"] == "retrieval")
    assert metric in row["test"] and transfer in row["test"] and signed_in(primary["signed_r"], row["estimate"])
    assert svg.count('class="interval"') == 0  # a scatter; the bars carry the intervals
    assert (committed / "toxprob.svg").read_text().count('class="interval"') >= 3 * 17
    assert "< 0.0002" in text and "pairs seen" in text and "Holm" in text and "Plumbing check" not in text


def signed_in(x, text):
    return f"{x:+.3f}" in text


def test_a_small_run_reads_too_few_to_decide(committed):
    r = claims.collect(committed)
    r["sizes"]["items"] = 2
    text = claims.render_report(r)
    assert text.splitlines()[2].startswith("> **Plumbing check, not evidence.**")
    verdicts = {c["verdict"] for c in claims.claims(r)}
    assert verdicts <= {claims.TOO_FEW, "not run", "invalid"}


def test_exact_tests_replace_the_bootstrap_at_small_n(tmp_path):
    gen = tmp_path / "generations"
    gen.mkdir()
    for name, tox in (("base", 0.9), ("dpo", 0.1)):
        rows = [{"prompt": "p", "generated_text": "x", "lang": lang, "prompt_index": i, "sample_index": s, "toxicity": tox + 0.01 * i}
                for lang in ("en", "de", "fr") for i in range(2) for s in range(2)]
        (gen / f"gen_{name}.judge.scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = {"scorer": "judge-feature:abc", "before_files": ["x/gen_base.jsonl"], "after_files": ["y/gen_dpo.jsonl"]}
    exact = claims.exact_tests(tmp_path, ev)
    assert exact["en"] == 0.5 and exact["pooled"] == 0.5  # 2 items: the exact test cannot go below 0.5


def test_guards_are_non_inferiority_bounds(committed):
    r = claims.collect(committed)
    r["guards"]["dpo"]["degenerate"].update(worse=40, better=30, n=960, p=0.3)  # bound above 2 points
    assert claims.guard_row(r, "degenerate", "x")["verdict"] == "inconclusive"
    r["guards"]["dpo"]["degenerate"].update(worse=0, better=0, n=960, p=1.0)
    assert claims.guard_row(r, "degenerate", "x")["verdict"] == "supported"
    r["guards"]["dpo"]["degenerate"].update(worse=40, better=5, n=960, p=1e-6)
    assert claims.guard_row(r, "degenerate", "x")["verdict"] == "not supported"


def test_instruments_and_placebo_effects_are_stated(committed, monkeypatch):
    r = claims.collect(committed)
    r["genset"] = {"instruments": {"word lists": {"all": {"precision": 0.85, "recall": 0.47, "auc": 0.73}}},
                   "fingerprints": {"word lists": r["scored_by"]["lexicon"]}}
    row = next(c for c in claims.claims(r) if c["by"] == "lexicon")
    assert "precision 0.85" in row["by_text"]
    r["genset"]["fingerprints"]["word lists"] = ["lexicon:another-word-list"]  # not the lists that scored this run
    row = next(c for c in claims.claims(r) if c["by"] == "lexicon")
    assert "precision" not in row["by_text"]


def test_a_judge_is_described_only_by_the_build_that_scored_the_run(committed):
    r = claims.collect(committed)  # the committed run was scored by the judge build before the rebuild
    assert r["scored_by"]["judge"] != [r["shipped"]["judge"]]
    judge_row = lambda: next(c for c in claims.claims(r) if c["by"] == "judge")
    assert "out of domain AUC" not in judge_row()["by_text"] and "not the shipped one" in judge_row()["by_text"]
    assert "has not scored it" in claims.render_report(r)
    r["scored_by"]["judge"] = [r["shipped"]["judge"]]  # as a rerun with the shipped judge records it
    assert "out of domain AUC" in judge_row()["by_text"]
    r["judge"], r["genset"] = None, None  # both files absent: still renders
    text = claims.render_report(r)
    assert "The placebo `dpo_placebo` on its own" in text and "because of toxicity" not in text


def test_default_out_resumes_an_unfinished_run_after_midnight(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "today", lambda: reproduce.datetime.date(2026, 1, 1))
    first = reproduce.default_out("smoke", tmp_path)
    first.mkdir()
    (first / "run.json").write_text(json.dumps({"preset": "smoke"}))
    monkeypatch.setattr(reproduce, "today", lambda: reproduce.datetime.date(2026, 1, 2))  # past midnight
    assert reproduce.default_out("smoke", tmp_path) == first
    assert reproduce.default_out("cpu", tmp_path).name == "cpu-2026-01-02"
    (first / "report.md").write_text("finished")
    assert reproduce.default_out("smoke", tmp_path).name == "smoke-2026-01-02"


def test_plan_lists_the_stages_without_running_any(tmp_path):
    pipe = reproduce.Pipeline(tmp_path, "smoke", "cpu", "fp32")
    names = pipe.plan()
    assert names[:3] == ["split", "gen_base", "dpo"] and "probe_intervene" in names and len(set(names)) == len(names)
    assert not list((tmp_path / "stages").glob("*.json")) and pipe.commands == []


def test_progress_estimate_scales_measured_priors(capsys):
    progress = reproduce.Progress(["a", "gen_dpo", "gen_dpo_seed2"], {"a": 10.0, "gen_dpo": 100.0,
                                                                      "gen_dpo_seed1": 50.0})
    progress.done("a", 20.0)  # twice as slow as the prior: the rest scales by 2
    assert progress.estimate_left() == pytest.approx(2 * (100.0 + 75.0))
    assert "stage 1 of 3" in capsys.readouterr().out
    assert reproduce.Progress(["new"], {}).estimate_left() is None


def test_cpu_preset_has_the_power_and_shares_what_repeats(tmp_path):
    """cpu: >= 4 samples per prompt, 3 DPO seeds, 2 placebo seeds, the gentler recipe point; sampling batches hold
    gen_batch sequences; the base model's clean-text values and reference margins are computed once and shared;
    both sides of every pair are cut to the response budget; the smoke preset stays the smallest."""
    cpu, smoke = reproduce.PRESETS["cpu"], reproduce.PRESETS["smoke"]
    assert cpu["n"] >= 4 and len(cpu["seeds"]) == 3 and len(cpu["placebo_seeds"]) == 2 and cpu["gentle_lr_factor"]
    assert cpu["dpo"]["response_tokens"] == train_config.CPU_PRESET["response_tokens"]
    pipe = reproduce.Pipeline(tmp_path, "cpu", "cpu", "fp32")
    assert pipe.runs == ["dpo", "dpo_seed1", "dpo_seed2", "dpo_placebo", "dpo_placebo_seed1", "dpo_gentle"]
    names = pipe.plan()
    for run in pipe.runs:
        assert {f"{run}", f"gen_{run}", f"clean_ppl_{run}"} <= set(names), run
    assert {n for n in names if n.startswith("margins_")} == {"margins_dpo", "margins_dpo_placebo"}
    assert {"clean_ppl_dpo_vs_placebo", "clean_ppl_dpo_gentle_vs_placebo", "eval_judge_dpo_vs_placebo_seed1",
            "clean_ppl_dpo_vs_placebo_seed1"} <= set(names)
    pipe.progress, pipe.planned, pipe.split = None, [], lambda: None  # record the commands, run nothing
    pipe.all()
    gentle = next(c for c in pipe.commands if "--out " + str(tmp_path / "dpo_gentle") in c)
    assert f"--lr {cpu['gentle_lr_factor'] * train_config.CPU_PRESET['lr']:g}" in gentle and "--seed 0" in gentle
    assert "placebo_seed1_train.jsonl" in next(c for c in pipe.commands if "dpo_placebo_seed1 " in c)
    gens = [c for c in pipe.commands if c.startswith("python generate.py")]
    assert all(f"--batch-size {cpu['gen_batch'] // cpu['n']} " in c for c in gens) and len(gens) == 7
    # the replication runs sample the first replicate_items items; base, main run, main placebo, gentle all of them
    limited = {re.search(r"generations/(\S+)\.jsonl", c)[1] for c in gens if f"--limit {cpu['replicate_items']} " in c}
    assert limited == {"gen_dpo_seed1", "gen_dpo_seed2", "gen_dpo_placebo_seed1"} and cpu["replicate_items"] >= claims.MIN_ITEMS  # a pooled row counts distinct items
    assert len({re.search(r"--model-cache (\S+)", c)[1] for c in pipe.commands if " clean-ppl " in c}) == 1
    assert len({re.search(r"--reference-cache (\S+)", c)[1] for c in pipe.commands if " margins " in c}) == 1
    assert "margins.json:mean_margin_per_token" in next(c for c in pipe.commands if " correlate " in c)
    assert len(reproduce.Pipeline(tmp_path / "s", "smoke", "cpu", "fp32").runs) == 2  # CI: one DPO, one placebo
    assert smoke["n"] <= cpu["n"] and smoke["margin_pairs"] <= cpu["margin_pairs"]


# -- outputs of the pipeline that older runs lack: gentle recipe point, DPO vs placebo perplexity, same-item margins --

def ratio(value, lo, hi, p, n=480):
    return {"ppl_ratio": value, "ppl_ratio_ci": [lo, hi], "p": p, "n_sentences": n}


def with_new_outputs(r):
    """The committed run's results as a run of the current pipeline would give them: the gentler recipe point
    (dpo_gentle, half the learning rate), pooled clean-text ratios vs base and vs the placebo, same-item margins."""
    r = copy.deepcopy(r)
    r["runs"] = sorted(r["runs"] + ["dpo_gentle"], key=claims._run_order)
    for scorer in claims.SCORERS:
        r["eval"][f"{scorer}_dpo_gentle"] = set_all(r["eval"][f"{scorer}_dpo"], "diff", lambda d: d / 2)
    r["dpo"]["dpo_gentle"] = r["dpo"]["dpo"]
    r["dpo_config"]["dpo_gentle"] = {**r["dpo_config"]["dpo"], "lr": r["dpo_config"]["dpo"]["lr"] / 2}
    r["clean_ppl"]["dpo_gentle"] = {**r["clean_ppl"]["dpo"], "pooled": ratio(1.071, 1.05, 1.09, 0.001)}
    r["clean_ppl"]["dpo"]["pooled"] = ratio(1.234, 1.2, 1.27, 0.001)
    r["clean_ppl_vs"] = {"dpo_vs_placebo": {"pooled": ratio(1.083, 1.04, 1.12, 0.002), "settings": {"n_boot": 1000}},
                         "dpo_gentle_vs_placebo": {"pooled": ratio(0.987, 0.95, 1.02, 0.4)}}
    r["margins"]["dpo"]["items"] = {"indices": list(range(30)), "langs_without_pairs": ["ru"]}
    r["margins"]["dpo"]["settings"]["response_tokens"] = 20
    return r


def test_perplexity_cost_against_the_placebo_is_decided_by_its_stated_rule(committed):
    r = with_new_outputs(claims.collect(committed))
    row = claims.ppl_cost_row(r, "dpo_placebo")
    assert row["verdict"] == "supported" and "x1.083 [1.040, 1.120]" in row["estimate"] and "x1.234" in row["estimate"]
    assert row["claim"] in [c["claim"] for c in claims.claims(r)] and "upper 95% bound" in row["test"]
    for value, lo, hi, p, expected in ((1.0, 0.98, 1.02, 0.9, "not supported"),  # bound below x1.05: no extra cost
                                       (0.9, 0.85, 0.95, 0.001, "not supported"),  # the placebo costs more
                                       (1.03, 0.97, 1.09, 0.3, "inconclusive")):
        r["clean_ppl_vs"]["dpo_vs_placebo"]["pooled"] = ratio(value, lo, hi, p)
        assert claims.ppl_cost_row(r, "dpo_placebo")["verdict"] == expected, value
    older = claims.collect(committed)  # a run without clean-ppl-compare has no such row, and still renders
    assert not older["clean_ppl_vs"] and not any("toxic pairs" in c["claim"] for c in claims.claims(older))


def test_tradeoff_table_shows_each_recipe_point(committed):
    r = with_new_outputs(claims.collect(committed))
    text = claims.render_report(r)
    section = text.split("## Choosing a recipe: detoxification against perplexity")[1].split("\n## ")[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| dpo")}
    assert list(rows) == ["dpo_gentle", "dpo", "dpo_placebo"]
    gentle = r["eval"]["judge_dpo_gentle"]["tests"]["pooled"]["emt"]["diff"]
    assert all(x in rows["dpo_gentle"] for x in (claims.signed(gentle), "x1.071", "x0.987"))
    assert "x1.234" in rows["dpo"] and "x1.083" in rows["dpo"]
    assert claims.seed_runs(r) == ["dpo", "dpo_seed1"]  # the gentle point is not a seed of the main recipe
    assert "Choosing a recipe" not in claims.render_report(claims.collect(committed))


def test_margins_state_their_items_and_the_correlation_names_its_strongest_variant(committed):
    r = with_new_outputs(claims.collect(committed))
    text = "\n".join(claims.margins_section(r))
    assert "the same 30 RTP-LX items in all 16 languages with pairs, both sides cut to 20 tokens; ru: no margins" \
        in text
    assert "margin/token" in text and "mean margin (sum)" in text
    assert "first held-out pairs in file order" in "\n".join(claims.margins_section(claims.collect(committed)))
    c = r["correlation"]
    strongest = max(((res, k) for res in c["results"] for k in ("pearson", "spearman")),
                    key=lambda t: abs(t[0][t[1]]["r"]))
    res, kind = strongest
    assert f"{res['retrieval_metric']} vs {res['transfer']}, {kind.title()} r = {res[kind]['r']:+.3f}" \
        in claims.strongest_variant(c)
    res[kind]["r"] = 0.0  # the sentence follows the numbers, not the other way round
    assert f"{res['retrieval_metric']} vs {res['transfer']}, {kind.title()}" not in claims.strongest_variant(c)


def test_stage_kinds_group_seeds_placebos_and_recipe_points():
    for name in ("gen_dpo_gentle", "gen_dpo_placebo_seed1", "gen_dpo_seed2"):
        assert reproduce.stage_kind(name) == "gen_dpo"
    gentle, placebo_seed1 = "clean_ppl_dpo_gentle_vs_placebo", "clean_ppl_dpo_vs_placebo_seed1"
    assert reproduce.stage_kind(gentle) == reproduce.stage_kind(placebo_seed1)
    progress = reproduce.Progress(["gen_dpo_gentle", "clean_ppl_dpo_vs_placebo"], {"gen_dpo": 100.0})
    assert progress.estimate_left() == 100.0 and progress.unestimated() == ["clean_ppl_dpo_vs_placebo"]
    assert "(+ 1 stage(s) never measured)" in progress.left_text()


def test_probe_stages_take_the_presets_random_sets_and_fluent_offsets(tmp_path):
    for preset in ("smoke", "cpu"):
        pipe = reproduce.Pipeline(tmp_path / preset, preset, "cpu", "fp32")
        pipe.progress, pipe.planned, pipe.split = None, [], lambda: None
        pipe.all()
        p = reproduce.PRESETS[preset]
        probe = {c.split()[2]: c for c in pipe.commands if c.startswith("python probe.py")}
        for step in ("vectors", "activations", "intervene"):
            assert f"--random-sets {p['random_sets']} " in probe[step], step
        assert f"--shuffled-probes {p['random_sets']} " in probe["train"]
        offsets = [float(o) for o in re.search(r"--offsets (\S+)", probe["intervene"])[1].split(",")]
        assert 0 in offsets and min(offsets) >= -3 and max(offsets) <= 3  # -5 breaks the text
    assert reproduce.PRESETS["cpu"]["random_sets"] >= 20  # a rank test over the sets can reach p < 0.05
    smoke = reproduce.PRESETS["smoke"]  # CI: the fewest runs that still take every code path
    assert smoke["random_sets"] == 2 and len(smoke["intervene_offsets"].split(",")) == 2


def test_data_root_flag_is_read_by_the_main_command_and_every_reader(tmp_path, monkeypatch):
    import evaluate, generate, margins, probe, retrieve
    monkeypatch.setattr(data, "_root_override", None)  # restored after the test
    missing = tmp_path / "nowhere"
    monkeypatch.setattr(data, "fetch", lambda name: (_ for _ in ()).throw(ValueError("offline")))
    with pytest.raises(ValueError, match="python data.py fetch") as e:
        reproduce.main(["--preset", "smoke", "--data-root", str(missing), "--out", str(tmp_path / "out")])
    assert str(missing) in str(e.value) and data.root() == missing
    for module, argv in ((evaluate, ["clean-ppl"]), (evaluate, ["margins", "--policy", "p", "--out", "o"]),
                         (margins, ["--policy", "p", "--out", "o"]), (generate, ["--prompts", "p", "--out", "o"]),
                         (probe, ["train", "--out", "o"]), (retrieve, ["score", "--out", "o"])):
        data.apply_root_flag(module.build_parser().parse_args(argv + ["--data-root", str(tmp_path / module.__name__)]))
        assert data.root() == tmp_path / module.__name__, module.__name__
    with pytest.raises(data.MissingData, match=str(tmp_path / "evaluate")):
        evaluate.main(["clean-ppl", "--langs", "de", "--data-root", str(tmp_path / "evaluate")])
    # train_dpo: the flag sets the root and stays out of the run's config (where the data is is not the run)
    cfg, _ = train_config.resolve_config(["--out", "o", "--data-root", str(tmp_path / "train")])
    assert data.root() == tmp_path / "train" and not hasattr(cfg, "data_root")
