"""What every hardening catalogue (tests/test_hardening_*.py) checks, one row per case.

A hostile or careless input must end in ONE line naming the file, line, field or flag at fault, with a non-zero
exit status, and must not touch what was already written. `refused` checks that in-process (fast: the script's
main raises the error that report.exit_on_error turns into that line); `cli` runs a script for real, to check
the line and the status themselves."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from report import USER_ERRORS

ROOT = Path(__file__).resolve().parents[1]


def snapshot(paths):
    """{path: bytes or None} of files that must survive a refused command unchanged."""
    return {Path(p): Path(p).read_bytes() if Path(p).is_file() else None for p in paths}


def refused(main, argv, pattern, keep=()):
    """main(argv) raises a user error whose one-line message matches `pattern`; the files in `keep` are unchanged.
    Returns the message."""
    before = snapshot(keep)
    with pytest.raises(USER_ERRORS) as err:
        main([str(a) for a in argv])
    message = " ".join(str(err.value).split()) if not isinstance(err.value, OSError) or not err.value.filename \
        else f"{err.value.filename}: {err.value.strerror}"
    assert re.search(pattern, message), f"{message!r} does not match {pattern!r}"
    assert snapshot(keep) == before, "a refused command changed files it should not have touched"
    return message


def cli(script, *argv, env=None):
    """(status, stdout, stderr) of `python script argv` run from the repository root."""
    proc = subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(status, stderr, pattern):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 1, f"exit status {status}; stderr: {stderr[-2000:]}"
    assert len(lines) == 1 and "Traceback" not in stderr, f"not one line: {stderr[-2000:]}"
    assert re.search(pattern, lines[0]), f"{lines[0]!r} does not match {pattern!r}"
