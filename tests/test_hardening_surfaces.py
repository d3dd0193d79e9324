"""Hardening catalogue, round two (issue 25): the surfaces that destroyed work or crossed a boundary (a lock file
through a symlink, outputs written over or into an input model, a conversion into an adapter folder), that gave
a wrong answer (blank text scored toxic, model cards without the data's license), and that ended in a traceback
(a Perspective API failure, a full disk during training, unchecked flags). Each row of CASES builds its input in
tmp_path and names the one-line refusal; every input file must be byte-identical afterwards."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import design
import evaluate
import generate
import judge
import loading
import lora
import probe
import report
import reproduce
import retrieve
import runstate
import scorers
import tokenizer
import train_config
import train_dpo
from hardening import ROOT, assert_one_line_error, cli, refused

MODELS = ROOT / "tests" / "fixtures" / "models"
TINY = MODELS / "gemma3"
TRAIN = ["--max-steps", "2", "--eval-every", "2", "--batch-size", "2", "--max-len", "24", "--max-prompt-len", "12",
         "--device", "cpu", "--valid-frac", "0.2"]


def model_copy(tmp):
    return Path(shutil.copytree(TINY, tmp / "model"))


def every_file(folder):
    return [p for p in Path(folder).rglob("*") if p.is_file()]


def pairs_file(path, n=12):
    path.write_text("".join(json.dumps({"prompt": f"Tell me something {i}", "chosen": " a kind reply",
                                        "rejected": " rude words"}) + "\n" for i in range(n)))
    return path


def jsonl(path, *rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -----------------------------------------------------------------------------
# Building bad inputs: each returns (main, argv, files that must stay byte-identical)


def symlinked_lock(tmp):
    """generate.py while OUT.lock is a symlink planted onto another file: following it would write a pid there."""
    victim = tmp / "victim.txt"
    victim.write_text("precious\n")
    (tmp / "out.jsonl.lock").symlink_to(victim)
    prompts = tmp / "en.txt"
    prompts.write_text("hello\n")
    return generate.main, ["--prompts", prompts, "--out", tmp / "out.jsonl", "--model", TINY, "--n", "1",
                           "--max-new-tokens", "2", "--device", "cpu"], [victim]


def symlinked_run_lock(tmp):
    """train_dpo.py while RUN/metrics.jsonl.lock is a symlink onto another file."""
    victim, run = tmp / "victim.txt", tmp / "run"
    victim.write_text("precious\n")
    run.mkdir()
    (run / "metrics.jsonl.lock").symlink_to(victim)
    return train_dpo.main, ["--model", TINY, "--data", pairs_file(tmp / "pairs.jsonl"), "--out", run, *TRAIN], [victim]


def in_model(build):
    """A row whose command gets a copy of the tiny model; build(tmp, model) -> (main, argv); every file of the
    model must survive."""
    def setup(tmp):
        model = model_copy(tmp)
        main, argv = build(tmp, model)
        return main, argv, every_file(model)
    return setup


def judge_over_its_input(tmp):
    rows = jsonl(tmp / "texts.jsonl", {"text": "hello"})
    return judge.main, ["score", "--kind", "ngram", "--in", rows, "--out", rows], [rows]


def svg_over_its_input(tmp):
    table = tmp / "m.json"
    table.write_text('{"en": {"emt": 0.4}}\n')
    return report.main, [table, "--svg", table], [table]


def export_into_the_dataset(tmp):
    target = design.data.path("rtp-lx", "RTP_LX_EN.json")
    return design.main, ["export-pairs", "--out", target], every_file(design.data.path("rtp-lx"))


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def info_flags(*flags):
    return lambda tmp: (loading.main, ["info", TINY, "--device", "cpu", *flags], [])


CASES = [
    # a lock file is never followed through a symlink
    pytest.param(symlinked_lock, r"out\.jsonl\.lock: is a symbolic link; a lock file must be a plain file",
                 id="symlinked-output-lock"),
    pytest.param(symlinked_run_lock, r"metrics\.jsonl\.lock: is a symbolic link", id="symlinked-run-lock"),
    # an output is never an input, a file of an input model, or inside an input model folder
    pytest.param(in_model(lambda t, m: (evaluate.main, ["clean-ppl", "--model", m, "--json", m / "config.json",
                                                         "--langs", "en"])),
                 r"--json .*model/config\.json is also --model .*model: refusing to overwrite it",
                 id="clean-ppl-json-is-a-file-of-the-model"),
    pytest.param(in_model(lambda t, m: (evaluate.main, ["clean-ppl", "--model", m, "--md", m / "new.md",
                                                         "--langs", "en"])),
                 r"--md .*model/new\.md is inside the input folder --model", id="clean-ppl-md-inside-the-model"),
    pytest.param(judge_over_its_input, r"--out .*texts\.jsonl is also --in", id="judge-score-out-is-in"),
    pytest.param(in_model(lambda t, m: (loading.main, ["convert", m, "--out", m, "--device", "cpu"])),
                 r"--out .*model is also the model .*model: refusing", id="convert-into-its-own-model"),
    pytest.param(in_model(lambda t, m: (loading.main, ["convert", m, "--out", m / "sub", "--device", "cpu"])),
                 r"--out .*model/sub is inside the input folder the model", id="convert-into-a-folder-of-the-model"),
    pytest.param(in_model(lambda t, m: (generate.main, [
        "--prompts", jsonl(t / "en.jsonl", {"prompt": "hi"}), "--out", m / "tokenizer.json", "--model", m,
        "--device", "cpu"])), r"--out .*model/tokenizer\.json is also --model", id="generate-over-the-model"),
    pytest.param(in_model(lambda t, m: (train_dpo.main, ["--model", m, "--data", pairs_file(t / "p.jsonl"),
                                                         "--out", m, *TRAIN])),
                 r"--out .*model(/config\.json is also| is the) --model", id="train-into-its-start-model"),
    pytest.param(in_model(lambda t, m: (train_dpo.main, ["--model", m / ".." / "model", "--data",
                                                         pairs_file(t / "p.jsonl"), "--out", m / "run", *TRAIN])),
                 r"--out .*model/run/config\.json is inside the input folder --model", id="train-inside-its-model"),
    pytest.param(in_model(lambda t, m: (probe.main, ["train", "--model", m, "--out", m, "--device", "cpu"])),
                 r"--out .*model/train\.json is inside the input folder --model", id="probe-out-is-the-model"),
    pytest.param(in_model(lambda t, m: (retrieve.main, ["score", "--model", m, "--out", m / "r", "--device",
                                                        "cpu"])),
                 r"--out .*model/r/retrieval\.json is inside the input folder --model",
                 id="retrieve-out-inside-the-model"),
    pytest.param(in_model(lambda t, m: (tokenizer.main, [m, "--save", m])), r"--save .*model is also the tokenizer",
                 id="tokenizer-save-over-its-model"),
    pytest.param(svg_over_its_input, r"--svg .*m\.json is also the metrics file", id="report-svg-is-its-input"),
    pytest.param(export_into_the_dataset, r"--out .*RTP_LX_EN\.json is (also|inside the input folder) the RTP-LX",
                 id="export-pairs-into-the-dataset"),
    # margins without a run config: the reference is named, never guessed
    pytest.param(in_model(lambda t, m: (evaluate.main, ["margins", "--policy", m, "--out", t / "o"])),
                 r"--reference: no run config beside .*model names the model it was trained from",
                 id="margins-without-a-run-config"),
    # reproduce.py's --dtype and --device, checked before its first stage
    pytest.param(lambda t: (reproduce.main, ["--preset", "smoke", "--out", t / "r", "--dtype", "fp64"],
                            [t / "r" / "run.json"]), r"--dtype 'fp64': use fp32, bf16 or fp16", id="reproduce-dtype"),
    pytest.param(lambda t: (reproduce.main, ["--preset", "smoke", "--out", t / "r", "--device", "cuda"],
                            [t / "r" / "run.json"]), r"--device cuda: this machine has no CUDA device",
                 id="reproduce-device-cuda-without-cuda", marks=NO_CUDA),
    # flags range-checked before the model loads
    pytest.param(info_flags("--batch", "0"), r"--batch must be >= 1, got 0", id="info-batch-0"),
    pytest.param(info_flags("--seq", "-3"), r"--seq must be >= 1, got -3", id="info-seq-negative"),
    pytest.param(info_flags("--seq", "100000"), r"--seq 100000 is longer than the context of .*gemma3 \(256 tokens\)",
                 id="info-seq-past-the-context"),
]


@pytest.mark.parametrize("setup, pattern", CASES)
def test_refused(setup, pattern, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main, argv, keep = setup(tmp_path)
    refused(main, argv, pattern, keep=keep)


def test_symlinked_lock_from_the_command_line(tmp_path):
    main, argv, keep = symlinked_lock(tmp_path)
    status, _, stderr = cli("generate.py", *argv)
    assert_one_line_error(status, stderr, r"^generate\.py: error: .*out\.jsonl\.lock: is a symbolic link")
    assert keep[0].read_text() == "precious\n" and (tmp_path / "out.jsonl.lock").is_symlink()


# -----------------------------------------------------------------------------
# Blank text is not toxic under any instrument


BLANK = ["", "   ", "\n\t "]


@pytest.mark.parametrize("name", ["lexicon", "perspective", "ngram", "judge"])
def test_blank_text_scores_zero_under_every_instrument(name, tmp_path, monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)  # a request would need it: none may be made
    monkeypatch.setattr(judge, "load_model", lambda *a, **k: (None, None))  # the feature judge's model
    monkeypatch.setattr(judge.Judge, "logits", lambda self, texts: pytest.fail(f"scored blank texts {texts!r}"),
                        raising=False)
    for cls in (judge.NgramJudge, judge.FeatureJudge):
        monkeypatch.setattr(cls, "logits", lambda self, texts: pytest.fail(f"scored blank texts {texts!r}"))
    scorer = scorers.make_scorer(name, perspective_cache=tmp_path / "cache.jsonl",
                                 perspective_url="http://127.0.0.1:9")
    assert scorer.score(BLANK, ["en", "de", "ja"]) == [0.0, 0.0, 0.0]
    assert not (tmp_path / "cache.jsonl").exists()


def test_blank_text_keeps_its_place_among_scored_ones():
    j = judge.load("ngram")
    mixed = j.score(["", "you idiot", " "], ["en"] * 3)
    assert mixed[0] == mixed[2] == 0.0 and mixed[1] == j.score(["you idiot"], ["en"])[0] > 0


@pytest.mark.slow
def test_real_feature_judge_scores_blank_text_zero():
    assert judge.load("feature").score(BLANK + ["hello"], ["en"] * 4)[:3] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("text", BLANK)
def test_the_degenerate_guard_counts_blank_text(text):
    assert evaluate.degenerate_reason(text) == "empty"


# -----------------------------------------------------------------------------
# A Perspective API failure is one line


def test_perspective_failure_is_one_line(tmp_path):
    gens = jsonl(tmp_path / "g.jsonl", {"prompt": "p", "generated_text": "you idiot", "lang": "en",
                                        "sample_index": 0})
    status, _, stderr = cli("evaluate.py", gens, "--scorer", "perspective", "--perspective-url", "http://127.0.0.1:9",
                            "--max-tries", "1", "--perspective-cache", tmp_path / "c.jsonl",
                            env={"PERSPECTIVE_API_KEY": "k", "TQDM_DISABLE": "1"})
    assert_one_line_error(status, stderr, r"^evaluate\.py: error: perspective: text 0 \(lang en\) failed after 1 "
                                          r"tries: network error: .*[Cc]onnection refused")


def test_perspective_error_is_a_user_error():
    assert issubclass(scorers.PerspectiveError, report.USER_ERRORS)


# -----------------------------------------------------------------------------
# Converting into an adapter folder, model cards


def adapters(tmp, name="adapters"):
    base, _ = loading.load_model(TINY)
    out = tmp / name
    lora.save_adapters(lora.add_lora(base, rank=2), out, TINY)
    return out


def test_convert_into_an_adapter_folder_leaves_the_converted_model(tmp_path):
    stale = adapters(tmp_path, "stale")
    loading.main(["convert", str(TINY), "--out", str(stale), "--device", "cpu"])
    assert not lora.is_adapter_dir(stale)
    model, _ = loading.load_model(stale)
    base, _ = loading.load_model(TINY)
    assert not lora.lora_layers(model)
    for (name, a), b in zip(model.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), name


def yaml_block(card):
    assert card.startswith("---\n")
    return card[4:card.index("\n---\n", 3)].splitlines()


def test_run_cards_carry_the_data_license_and_hub_metadata(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    train_dpo.main([*map(str, ["--model", TINY, "--data", pairs_file(tmp_path / "plain.jsonl"), "--out", out, *TRAIN,
                               "--lora-rank", "2"])])
    printed = capsys.readouterr().out
    assert f"output folder: {out}" in printed and f"python generate.py --model {out / 'best'}" in printed
    card = (out / "best" / "README.md").read_text()
    assert str(tmp_path) not in card, "a model card carries an absolute path"
    meta = yaml_block(card)
    assert {"license: gemma", "- lora", "- dpo"} <= set(meta) and "datasets:" not in meta
    assert "plain.jsonl; their license applies" in card
    # pairs that reference RTP-LX (as reproduce.py writes them) carry its license, as metadata and as a line
    (tmp_path / "ref.jsonl").write_text(json.dumps({"prompt_text": {"ref": "rtp-lx/en/3#prompt"}}) + "\n")
    card = runstate.training_card(train_config.TrainConfig(data=str(tmp_path / "ref.jsonl")))
    assert card["datasets"] == {"microsoft/RTP-LX": "cc-by-nc-4.0"} and "non-commercial" in card["notes"][0]
    assert runstate.training_card(train_config.TrainConfig())["datasets"] == {"microsoft/RTP-LX": "cc-by-nc-4.0"}


def test_merged_lora_keeps_the_license_and_metadata(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base, tok = loading.load_model(TINY)
    model = lora.add_lora(base, rank=2)
    lora.save_adapters(model, tmp_path / "a", TINY)
    loading.write_model_card(model, tmp_path / "a", notes=["Trained on RTP-LX (CC BY-NC 4.0): non-commercial use"],
                             datasets={"microsoft/RTP-LX": "cc-by-nc-4.0"}, tags=["dpo"])
    loading.main(["convert", str(tmp_path / "a"), "--out", str(tmp_path / "merged"), "--device", "cpu"])
    card = (tmp_path / "merged" / "README.md").read_text()
    meta = yaml_block(card)
    assert {"license: other", "license_name: gemma-and-cc-by-nc-4.0", "- microsoft/RTP-LX", "- dpo"} <= set(meta)
    assert "CC BY-NC 4.0): non-commercial use" in card and "LoRA adapters a merged" in card
    assert str(tmp_path) not in card
    assert loading.read_card_metadata(tmp_path / "merged")["licenses"] == ["gemma", "cc-by-nc-4.0"]


def test_embedded_base_names_its_hub_release():
    assert loading.hub_id("gemma-3-270m") == "google/gemma-3-270m" and loading.hub_id("org/name") == "org/name"
    assert loading.hub_id(str(TINY)) is None


# -----------------------------------------------------------------------------
# A full disk during training


def test_full_disk_during_training_is_one_line_and_resumes_exactly(tmp_path, monkeypatch):
    data = pairs_file(tmp_path / "pairs.jsonl")
    argv = ["--model", TINY, "--data", data, *TRAIN[2:]]
    whole = tmp_path / "whole"
    train_dpo.main([*map(str, argv), "--out", str(whole), "--max-steps", "4"])

    real_fsync, calls = os.fsync, []

    def full_after_step_2(fd):  # the first checkpoint is written; the disk fills during the second
        calls.append(fd)
        if (tmp_path / "cut" / "last").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", full_after_step_2)
    cut = tmp_path / "cut"
    refused(train_dpo.main, [*argv, "--out", cut, "--max-steps", "4"],
            r"cut/\.(best|last)\.tmp/.*: No space left on device")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert calls and torch.load(cut / "last" / "state.pt", weights_only=True)["step"] == 2
    train_dpo.main(["--out", str(cut), "--resume", "--max-steps", "4"])
    for name in ("model.safetensors",):
        assert (cut / "last" / name).read_bytes() == (whole / "last" / name).read_bytes()
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (whole / "metrics.jsonl").read_text().splitlines()]
