"""Hardening catalogue of generate.py and data.py (issue 18): every hostile or careless input ends in one line
naming the file, line or flag at fault, before the model loads where it can, and leaves what was written alone.
Also report.exclusive (one writer per output file) across two processes, and atomic_write's file modes."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import data
import design
import generate as G
import report
from hardening import ROOT, assert_one_line_error, cli, refused

MODEL = ROOT / "tests" / "fixtures" / "models" / "gemma3"  # tiny Gemma 3, 256-token context
FAST = ["--model", MODEL, "--n", "2", "--max-new-tokens", "4", "--device", "cpu"]


def prompts(tmp, name="en.txt", text="hello world\nthe quick brown fox\n"):
    path = tmp / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def outputs(tmp):
    """OUT and every file a run on it may create: none may appear or change when the run is refused."""
    out = tmp / "out.jsonl"
    return out, [out, Path(f"{out}.meta.json"), Path(f"{out}.lock")]


def generate_with(*flags, text="hello world\nthe quick brown fox\n", name="en.txt"):
    """A row: generate.py on a fresh prompt file with FAST settings plus `flags`, nothing written beforehand."""
    def setup(tmp):
        out, keep = outputs(tmp)
        return G.main, ["--prompts", prompts(tmp, name, text), "--out", out, *FAST, *flags], keep
    return setup


def on_a_finished_run(corrupt):
    """A row: generate.py resumed on an output that corrupt(out, meta) damaged after a complete run."""
    def setup(tmp):
        out, keep = outputs(tmp)
        argv = ["--prompts", prompts(tmp), "--out", out, *FAST]
        G.main([str(a) for a in argv])
        corrupt(out, keep[1])
        return G.main, argv, keep
    return setup


def data_py(*argv, files=(), main=data.main):
    """A row: data.py ARGV (design.py's with main=design.main) after writing `files` {name: bytes} into the temp
    folder ({tmp} in argv)."""
    def setup(tmp):
        for name, content in dict(files).items():
            (tmp / name).write_bytes(content)
        return main, [str(a).format(tmp=tmp) for a in argv], [tmp / name for name in dict(files)]
    return setup


def holding_the_lock(tmp):
    """generate.py while this process holds report.exclusive(OUT), as a second generate.py would."""
    out, keep = outputs(tmp)
    held = report.exclusive(out)
    held.__enter__()
    keep.remove(Path(f"{out}.lock"))  # the holder's lock file, pid inside
    return G.main, ["--prompts", prompts(tmp), "--out", out, *FAST], keep, held


def folder_without_prompts(tmp):
    """A folder whose only language-named file is a CSV (and a LICENSE): no prompt file in it."""
    prompts(tmp, "en.csv")
    prompts(tmp, "LICENSE")
    return G.main, ["--prompts", tmp, "--out", tmp / "o" / "out.jsonl", *FAST], [tmp / "o" / "out.jsonl"]


def unwritable_folder(tmp):
    folder = tmp / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return G.main, ["--prompts", prompts(tmp), "--out", folder / "out.jsonl", *FAST], [folder / "out.jsonl"]


BAD_UTF8 = b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n'
NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")

CATALOGUE = [
    # prompt files
    pytest.param(generate_with(text=""), r"en\.txt: no prompts in the file", id="empty-prompt-file"),
    pytest.param(generate_with(name="en.csv", text="prompt,lang\nhello,en\n"),
                 r"en\.csv: not a prompt file; expected \.json, \.jsonl, \.txt", id="csv-prompts"),
    pytest.param(generate_with(name="en.tsv", text="prompt\tlang\nhello\ten\n"),
                 r"en\.tsv: not a prompt file", id="tsv-prompts"),
    pytest.param(lambda tmp: (G.main, ["--prompts", tmp / "missing.txt", "--out", tmp / "out.jsonl", *FAST],
                              outputs(tmp)[1]), r"missing\.txt: No such file", id="missing-prompt-file"),
    pytest.param(folder_without_prompts, r"no prompt file \(\.json, \.jsonl, \.txt\) named by a language code", id="folder-without-prompts"),
    pytest.param(generate_with(name="en.txt", text=b"fine\ncaf\xe9\n"), r"en\.txt:2: not UTF-8 \(byte 0xe9 at column 4",
                 id="non-utf8-txt"),
    pytest.param(generate_with(name="en.jsonl", text=BAD_UTF8), r"en\.jsonl:2: not UTF-8", id="non-utf8-jsonl"),
    pytest.param(generate_with(name="en.jsonl", text='{"prompt": "a"}\n{"text": "b"}\n'),
                 r"en\.jsonl:2: missing field 'prompt'", id="missing-prompt-field"),
    # flags, all refused before the model loads
    pytest.param(generate_with("--temperature", "nan"), r"--temperature must be a finite number > 0, got nan",
                 id="temperature-nan"),
    pytest.param(generate_with("--temperature", "-1"), r"--temperature .* got -1", id="temperature-negative"),
    pytest.param(generate_with("--temperature", "inf", "--greedy"), r"--temperature .* got inf",
                 id="temperature-inf-greedy"),
    pytest.param(generate_with("--top-p", "0"), r"--top-p must be in \(0, 1\], got 0", id="top-p-zero"),
    pytest.param(generate_with("--top-p", "1.5"), r"--top-p must be in \(0, 1\], got 1.5", id="top-p-above-one"),
    pytest.param(generate_with("--top-p", "nan"), r"--top-p .* got nan", id="top-p-nan"),
    pytest.param(generate_with("--top-k", "-1"), r"--top-k must be >= 0", id="top-k-negative"),
    pytest.param(generate_with("--n", "0"), r"--n must be >= 1, got 0", id="n-zero"),
    pytest.param(generate_with("--max-new-tokens", "0"), r"--max-new-tokens must be >= 1", id="max-new-tokens-zero"),
    pytest.param(generate_with("--batch-size", "0"), r"--batch-size must be >= 1", id="batch-size-zero"),
    pytest.param(generate_with("--limit", "0"), r"--limit must be >= 1", id="limit-zero"),
    pytest.param(generate_with("--lang", "english"), r"--lang: unknown language 'english'; expected one of ar cs", id="bad-lang"),
    pytest.param(generate_with("--device", "gpu0"), r"--device 'gpu0': not a device", id="bad-device"),
    # the model and its context
    pytest.param(generate_with("--max-new-tokens", "256"),
                 r"--max-new-tokens 256 leaves no room for a prompt: the context of .*gemma3 is 256 tokens",
                 id="max-new-tokens-fills-context"),
    pytest.param(generate_with("--model", "ai-forever/mGPT"), r"ai-forever/mGPT", id="hub-id-offline"),
    # the output and its settings file
    pytest.param(lambda tmp: (G.main, ["--prompts", prompts(tmp), "--out", tmp, *FAST], []),
                 r"--out .*: is a folder; give a file path", id="out-is-a-folder"),
    pytest.param(on_a_finished_run(lambda out, meta: meta.write_text("{not json")),
                 r"out\.jsonl\.meta\.json: not valid JSON", id="corrupt-settings-file"),
    pytest.param(on_a_finished_run(lambda out, meta: meta.write_text("[1, 2]")),
                 r"out\.jsonl\.meta\.json: expected a JSON object of settings, got list", id="settings-not-object"),
    pytest.param(on_a_finished_run(lambda out, meta: out.write_text("[1]\n[2]\n")),
                 r"out\.jsonl:1: field 'prompt' is \[1\]", id="output-row-not-object"),
    pytest.param(on_a_finished_run(lambda out, meta: out.write_bytes(b"\xff\xfe\n\n")),
                 r"out\.jsonl:1: not a valid JSON row", id="output-row-not-utf8"),
    pytest.param(on_a_finished_run(lambda out, meta: meta.write_text(meta.read_text().replace('"seed": 0', '"seed": 3'))),
                 r"made with seed=3, this run has seed=0", id="output-of-other-settings"),
    pytest.param(lambda tmp: (G.main, ["--prompts", prompts(tmp), "--out", "/proc/h18/out.jsonl", *FAST], []),
                 r"^/proc/h18\S*: ", id="output-folder-cannot-be-made"),
    pytest.param(unwritable_folder, r"ro/out\.jsonl\.lock: Permission denied", id="read-only-output-folder",
                 marks=NOT_ROOT),
    # data.py
    pytest.param(data_py("check-pairs", "{tmp}/pairs.jsonl",
                         files={"pairs.jsonl": b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n\xff\n'}),
                 r"pairs\.jsonl:2: not UTF-8 \(byte 0xff at column 1", id="data-pairs-not-utf8"),
    pytest.param(data_py("check-pairs", "{tmp}/pairs.jsonl",
                         files={"pairs.jsonl": b'{"prompt": "p", "chosen": "c"}\n'}),
                 r"pairs\.jsonl:1: missing field 'rejected'", id="data-pairs-missing-field"),
    pytest.param(data_py("check-pairs", "{tmp}/none.jsonl"), r"none\.jsonl: no such file", id="data-pairs-missing"),
    pytest.param(data_py("check-pairs", "{tmp}", files={"notes.txt": b"x"}), r"directory has no \.jsonl files",
                 id="data-pairs-folder-empty"),
    pytest.param(data_py("split", "--n-valid", "-1", main=design.main), r"--n-valid must be >= 0, got -1", id="data-negative-size"),
    pytest.param(data_py("confounds", "--tokenizer", MODEL, "--max-len", "8", "--max-prompt-len", "8", main=design.main),
                 r"--max-len \(8\) must exceed --max-prompt-len \(8\)", id="data-confounds-no-room"),
]


@pytest.mark.parametrize("setup, pattern", CATALOGUE)
def test_refused(setup, pattern, tmp_path):
    main, argv, keep = setup(tmp_path)
    refused(main, argv, pattern, keep=keep)


def test_a_second_writer_is_refused_and_the_first_finishes(tmp_path):
    main, argv, keep, held = holding_the_lock(tmp_path)
    try:
        refused(main, argv, r"out\.jsonl is being written by another process \(pid %d\)" % os.getpid(), keep=keep)
    finally:
        held.__exit__(None, None, None)
    main([str(a) for a in argv])  # the lock is gone with its holder
    assert len(Path(argv[3]).read_text().splitlines()) == 4 and not Path(f"{argv[3]}.lock").exists()


def test_two_processes_on_one_output(tmp_path):
    out = tmp_path / "out.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, report\n"
                               "with report.exclusive(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)",
                               str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        status, _, stderr = cli("generate.py", "--prompts", prompts(tmp_path), "--out", out, *FAST)
        assert_one_line_error(status, stderr, r"^generate\.py: error: .*out\.jsonl is being written by another "
                                              r"process \(pid %d\)$" % holder.pid)
        assert not out.exists() and not Path(f"{out}.meta.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # A killed holder leaves its lock file; flock went with the process, so the next run goes ahead.
    assert Path(f"{out}.lock").exists()
    G.main([str(a) for a in ["--prompts", prompts(tmp_path), "--out", out, *FAST]])
    assert len(out.read_text().splitlines()) == 4


def test_a_full_disk_names_the_output_and_keeps_the_complete_prompts(tmp_path):
    out = tmp_path / "out.jsonl"
    many = prompts(tmp_path, text="".join(f"prompt number {i}\n" for i in range(40)))

    def small_files():  # every file this process writes stops at 3000 bytes, as on a full disk (EFBIG for ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "generate.py", "--prompts", many, "--out", out, *map(str, FAST)],
                          cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert_one_line_error(proc.returncode, proc.stderr, r"out\.jsonl: File too large$")
    rows = out.read_bytes().split(b"\n")
    assert len(rows) > 2 and all(json.loads(row)["sample_index"] in (0, 1) for row in rows[:-1])
    G.main([str(a) for a in ["--prompts", many, "--out", out, *FAST]])  # the rerun resumes and completes
    assert len(out.read_text().splitlines()) == 80


def test_prompts_longer_than_the_context_are_cut_from_the_left_with_a_warning(tmp_path, capsys):
    long = " ".join(f"word{i}" for i in range(400))  # far more than the fixture's 256 tokens
    out = tmp_path / "out.jsonl"
    G.main([str(a) for a in ["--prompts", prompts(tmp_path, text=f"short one\n{long}\n"), "--out", out, *FAST]])
    assert "warning: 1 of 2 prompts are longer than 252 tokens" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and rows[2]["prompt"] == long  # the row keeps the prompt as given


def test_left_truncate_keeps_bos_and_the_end():
    assert G.left_truncate([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert G.left_truncate([5, 6, 7, 8], 3, bos_id=1) == [6, 7, 8]
    assert G.left_truncate([1, 5, 6], 3, bos_id=1) == [1, 5, 6]
    assert G.left_truncate([1, 5, 6, 7], 2) == [6, 7]


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_write_gives_the_mode_open_would(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        report.write_text(tmp_path / "new.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == expected == (tmp_path / "plain.txt").stat().st_mode & 0o777
    (tmp_path / "new.txt").chmod(0o604)
    report.write_json(tmp_path / "new.txt", {})  # a replaced file keeps its mode
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o604


def test_atomic_write_errors_name_the_file_not_the_temp_file(tmp_path):
    with pytest.raises(OSError) as err:
        report.write_text("/proc/h18.txt", "x")
    assert err.value.filename == "/proc/h18.txt"
    assert list(tmp_path.iterdir()) == []
