"""A push's pack read before anything is unpacked: made by Debian's git, then judged by ``pack_refusal``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tollway.prompts.packs import MAX_OBJECT_BYTES, pack_refusal, pack_start

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git client (Debian's git)")
ZERO = "0" * 40


def git(cwd: Path, *args: str, stdin: bytes | None = None) -> bytes:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1"}
    out = subprocess.run(["git", "-c", "user.name=Ada", "-c", "user.email=ada@example.com",
                          "-c", "init.defaultBranch=main", *args], cwd=cwd, capture_output=True, env=env,
                         input=stdin, timeout=120, check=True)
    return out.stdout


def push_body(repo: Path) -> bytes:
    """What `git push` sends to receive-pack for the repository's whole history: one command, a flush-pkt, the
    pack."""
    head = git(repo, "rev-parse", "HEAD").strip().decode()
    command = f"{ZERO} {head} refs/heads/main\0report-status\n".encode()
    pack = git(repo, "pack-objects", "--stdout", "--revs", "--delta-base-offset", stdin=b"HEAD\n")
    return f"{len(command) + 4:04x}".encode() + command + b"0000" + pack


def repo_with(tmp_path: Path, files: dict[str, bytes]) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    if not (repo / ".git").exists():
        git(repo, "init", "-q")
    for name, data in files.items():
        (repo / name).write_bytes(data)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "files")
    return repo


def test_a_prompt_repository_s_push_passes(tmp_path):
    repo = repo_with(tmp_path, {"greet.yaml": b"model: sim-large\nmessages: []\n" * 50, "faq.yaml": b"x: 1\n"})
    repo_with(tmp_path, {"greet.yaml": b"model: sim-large\nmessages: []\n" * 51})  # a second commit, a delta
    body = push_body(repo)
    assert pack_start(body) is not None
    assert pack_refusal(body) is None


def test_a_blob_of_zeros_that_inflates_past_a_file_s_limit_is_refused_before_unpacking(tmp_path):
    """20 MB of zeros pack into about 20 KB."""
    body = push_body(repo_with(tmp_path, {"big.yaml": bytes(20 << 20)}))
    assert len(body) < 100_000
    assert "inflated" in (pack_refusal(body) or "")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _header(kind: int, size: int) -> bytes:
    first, size = (kind << 4) | (size & 15), size >> 4
    out = bytearray()
    while size:
        out.append(first | 0x80)
        first, size = size & 0x7F, size >> 7
    out.append(first)
    return bytes(out)


def test_a_delta_that_rebuilds_its_base_over_and_over_is_refused():
    """A delta of a few kilobytes whose copy instructions repeat a 1 KB base 100,000 times (100 MB): git never
    writes one (its heuristics skip deltas much larger than their base), so it is made here by hand."""
    import hashlib
    import zlib

    base = b"x" * 1024
    base_sha = hashlib.sha1(b"blob %d\0" % len(base) + base).digest()
    copy = bytes([0x80 | 0x10 | 0x20, 0x00, 0x04])  # copy 1,024 bytes from offset 0
    delta = _varint(len(base)) + _varint(len(base) * 100_000) + copy * 100_000
    pack = (b"PACK" + (2).to_bytes(4, "big") + (2).to_bytes(4, "big")
            + _header(3, len(base)) + zlib.compress(base)
            + _header(7, len(delta)) + base_sha + zlib.compress(delta))
    pack += hashlib.sha1(pack).digest()
    command = f"{ZERO} {'1' * 40} refs/heads/main\0report-status\n".encode()
    body = f"{len(command) + 4:04x}".encode() + command + b"0000" + pack
    assert len(body) < 10_000
    assert "a delta of the push makes an object of 102400000 bytes" in (pack_refusal(body) or "")


def test_the_whole_push_is_bounded_and_a_cut_pack_is_refused(tmp_path):
    files = {f"p{i}.yaml": os.urandom(50_000) for i in range(10)}
    body = push_body(repo_with(tmp_path, files))
    assert pack_refusal(body) is None
    assert "inflates to over" in (pack_refusal(body, max_total=200_000) or "")
    assert "truncated or corrupt" in (pack_refusal(body[:len(body) // 2]) or "")
    assert pack_refusal(b"0000") is None  # commands only (a push that deletes): no pack to read
    assert MAX_OBJECT_BYTES > 1 << 20
