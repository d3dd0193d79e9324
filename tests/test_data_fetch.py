"""The data root, `data.py fetch` against a local HTTP server (checksums, 404, partial downloads, resume), text
references, and that no file in the repository is a copy of a dataset under the root."""

import hashlib
import http.server
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

import data
import evaluate
import generate

REPO = Path(__file__).resolve().parents[1]
# The project's own files that also sit under the data root (shared/ holds a copy of the hand-made supplement).
OWN_FILES = {"data/wordlists/supplement.json"}


class FakeOrigin:
    """A server on 127.0.0.1 holding `files` {url path: bytes}. It honours Range (206), answers 404 for unknown
    paths, and cuts the next `cut` replies off after that many bytes (Content-Length promises the whole file)."""

    def __init__(self, files):
        self.files, self.cut, self.ranges = files, [], []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = origin.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers["Range"] else 0
                origin.ranges.append(start)
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                rest = body[start:]
                self.wfile.write(rest[:origin.cut.pop(0)] if origin.cut else rest)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


BODY = "".join(f"line {i}: some dataset text\n" for i in range(2000)).encode()


@pytest.fixture
def origin(tmp_path, monkeypatch):
    """A one-file dataset 'toy' served locally, fetched into a fresh data root under tmp_path."""
    server = FakeOrigin({"/repo/toy.txt": BODY})
    spec = data.Dataset(folder="toy", what="test", origin=server.url, base=server.url + "repo/", license="MIT",
                        non_commercial=False, citation="nobody", processed=None,
                        files={"toy.txt": ("toy.txt", hashlib.sha256(BODY).hexdigest())})
    monkeypatch.setitem(data.DATASETS, "toy", spec)
    monkeypatch.setattr(data, "_root_override", tmp_path / "root")
    yield server
    server.server.shutdown()


def test_root_order(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_root_override", None)
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert data.root() == tmp_path / "env"
    monkeypatch.delenv(data.DATA_ENV)
    shared = data.REPO_DATA.parent.parent / "shared" / "data"
    if shared.is_dir():
        assert data.root() == shared
    data.set_root(tmp_path / "flag")
    assert data.path("ldnoobw", "en.txt") == tmp_path / "flag" / "wordlists" / "ldnoobw" / "en.txt"


def test_cache_root_honours_xdg(tmp_path):
    """Without a flag, variable or ../shared/data, the root is the user cache under $XDG_CACHE_HOME."""
    env = {k: v for k, v in os.environ.items() if k != data.DATA_ENV} | {"XDG_CACHE_HOME": str(tmp_path)}
    code = "import sys; sys.path.insert(0, sys.argv[1]); import data; data.REPO_DATA = data.Path('/nowhere/x/data'); print(data.root())"
    out = subprocess.run(["python", "-c", code, str(REPO)], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "dpo-multilingual" / "data")


def test_fetch_downloads_checks_and_prints_license(origin, capsys):
    data.fetch("toy")
    assert data.path("toy", "toy.txt").read_bytes() == BODY
    assert not list(data.path("toy").glob("*.part"))
    out = capsys.readouterr().out
    assert "License: MIT" in out and "Content warning" in out
    data.fetch("toy")  # already there and verified: nothing downloaded
    assert origin.ranges == [0]


def test_checksum_mismatch_deletes_the_download(origin):
    origin.files["/repo/toy.txt"] = BODY.replace(b"line 7", b"LINE 7")
    with pytest.raises(ValueError, match=r"toy\.txt: sha256 [0-9a-f]{64} is not the pinned"):
        data.fetch("toy")
    assert not data.path("toy", "toy.txt").exists() and not list(data.path("toy").glob("*"))


def test_404_is_one_line(origin):
    origin.files.clear()
    with pytest.raises(ValueError, match=r"repo/toy\.txt: HTTP 404"):
        data.fetch("toy")
    assert not data.path("toy", "toy.txt").exists()


def test_partial_download_is_kept_and_resumed(origin):
    origin.cut = [1000]  # the connection drops after 1000 bytes
    with pytest.raises(ValueError, match=r"download interrupted .*1000 bytes kept .*run the fetch again"):
        data.fetch("toy")
    part = data.path("toy", "toy.txt.part")
    assert part.stat().st_size == 1000 and not data.path("toy", "toy.txt").exists()
    data.fetch("toy")
    assert origin.ranges == [0, 1000]  # the second request asked only for the rest
    assert data.path("toy", "toy.txt").read_bytes() == BODY and not part.exists()


def test_resume_from_a_partial_file_left_on_disk(origin):
    part = data.path("toy", "toy.txt.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(BODY[:5000])
    data.fetch("toy")
    assert origin.ranges == [5000] and data.path("toy", "toy.txt").read_bytes() == BODY


def test_missing_data_is_one_line_with_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_root_override", tmp_path)
    with pytest.raises(data.MissingData, match=r"^rtp-lx: \d+ file\(s\) missing under .*python data\.py fetch rtp-lx"):
        data.load_rtplx("en")
    # processed at the origin: fetch says how to get the folder instead of downloading something else
    with pytest.raises(ValueError, match=r"rtp-lx: cannot fetch .*cut to 600 characters.*Copy the folder rtp-lx/"):
        data.fetch("rtp-lx")
    with pytest.raises(ValueError, match=r"^rtp-lx is missing under .* could not be fetched .*python data\.py fetch rtp-lx"):
        data.fetch_missing(("rtp-lx",))


# -----------------------------------------------------------------------------
# Text references


def test_text_refs_resolve_and_check_their_hash(tmp_path):
    pair = data.rtplx_pairs("en")[0]
    refs = data.pair_refs(pair)
    assert [data.resolve_ref(r, "x:1") for r in refs] == [pair["prompt"], pair["chosen"], pair["rejected"]]
    assert refs[0]["ref"] == f"rtp-lx/en/{pair['index']}#prompt" and len(refs[0]["sha"]) == 16
    with pytest.raises(ValueError, match=r"^f\.jsonl:3: rtp-lx/en/\d+#prompt: the text under .* hashes to"):
        data.resolve_ref({**refs[0], "sha": "0" * 16}, "f.jsonl:3")
    with pytest.raises(ValueError, match=r"f\.jsonl:4: not a text reference"):
        data.resolve_ref({"ref": "rtp-lx/xx/1#prompt", "sha": "0"}, "f.jsonl:4")
    # pair files written as references read back as the same pairs
    data.write_toxicity_pairwise([pair], tmp_path / "pairs.jsonl", refs=True)
    assert pair["prompt"] not in (tmp_path / "pairs.jsonl").read_text(encoding="utf-8")
    (back,), _ = data.load_pairs(tmp_path / "pairs.jsonl")
    assert (back["prompt"], back["chosen"], back["rejected"]) == (pair["prompt"], pair["chosen"], pair["rejected"])


def test_generation_rows_keep_the_reference(tmp_path):
    row = data.load_rtplx("de")[0]
    ref = data.text_ref("de", row["index"], "prompt", row["prompt"])
    (tmp_path / "de.jsonl").write_text(json.dumps({"prompt": ref, "lang": "de", "index": row["index"]}) + "\n")
    (job,) = generate.load_jobs([tmp_path])
    assert job["prompt"] == row["prompt"] and job["prompt_ref"] == ref
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": ref, "generated_text": " x", "lang": "de", "prompt_index": 0,
                               "sample_index": 0}) + "\n")
    (read,) = evaluate.read_generations(gen)
    assert read["prompt"] == row["prompt"]
    evaluate.write_jsonl(tmp_path / "out.jsonl", [read])
    assert json.loads((tmp_path / "out.jsonl").read_text())["prompt"] == ref


# -----------------------------------------------------------------------------
# No copies of other people's data in the repository


def repo_files():
    """Every file in the working tree (tracked or not, .git and caches aside)."""
    skip = {".git", "__pycache__", ".pytest_cache"}
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".venv")]
        for name in filenames:
            yield Path(dirpath) / name


def test_no_file_in_the_repo_is_a_copy_of_a_dataset_file():
    under_root = {}
    for path in data.root().rglob("*"):
        if path.is_file():
            under_root.setdefault(path.stat().st_size, []).append(path)
    copies = []
    for path in repo_files():
        rel = path.relative_to(REPO).as_posix()
        same_size = under_root.get(path.stat().st_size) if path.is_file() else None
        if not same_size or rel in OWN_FILES:
            continue
        digest = data.sha256_of(path)
        copies += [f"{rel} == {other}" for other in same_size if data.sha256_of(other) == digest]
    assert not copies, "copies of third-party data in the repo:\n" + "\n".join(copies)
