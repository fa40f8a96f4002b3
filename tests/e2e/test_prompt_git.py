"""Plain git against `tollway serve`: clone and push over HTTP (Debian's git as the client), a refused bad
push that changes nothing, and the same versions through the API, the CLI's store and git."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git client (Debian's git)")

GREET = """model: sim-large
messages:
  - {role: system, content: "You greet {{ customer }} politely."}
variables:
  customer: {type: string}
"""


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), "GIT_TERMINAL_PROMPT": "0",
           "GIT_CONFIG_NOSYSTEM": "1"}
    out = subprocess.run(["git", "-c", "user.name=Ada", "-c", "user.email=ada@example.com",
                          "-c", "init.defaultBranch=main", *args], cwd=cwd, capture_output=True, text=True,
                         env=env, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def versions(gateway: Any, who: Any) -> list[dict[str, Any]]:
    resp = httpx.get(gateway.url + "/prompts/greet/versions", headers=who.headers)
    return list(resp.json()["data"]) if resp.status_code == 200 else []


def test_clone_push_refuse_and_round_trip(gateway, make_tenant, tmp_path):
    eng = make_tenant(role="prompt_engineer")
    url = gateway.url.replace("http://", f"http://git:{eng.key}@") + "/prompts.git"
    git(tmp_path, "clone", url, "repo")  # an empty repository: nothing pushed yet
    repo = tmp_path / "repo"
    (repo / "greet.yaml").write_text(GREET)
    git(repo, "add", "greet.yaml")
    git(repo, "commit", "-m", "greet customers")
    git(repo, "push", "origin", "HEAD:main")
    head = git(repo, "rev-parse", "HEAD").stdout.strip()
    assert [v["version"] for v in versions(gateway, eng)] == [head]  # the version is the git commit

    (repo / "greet.yaml").write_text(GREET.replace("{{ customer }}", "{{ client }}"))
    git(repo, "commit", "-am", "oops")
    refused = git(repo, "push", "origin", "HEAD:main", check=False)
    assert refused.returncode != 0
    assert "greet.yaml: messages[0].content uses undeclared variable 'client'" in refused.stderr
    assert [v["version"] for v in versions(gateway, eng)] == [head]  # nothing changed
    git(repo, "reset", "--hard", "HEAD~1")

    # a version submitted through the API is what git pulls
    resp = httpx.post(gateway.url + "/prompts/greet/versions", headers=eng.headers,
                      json={"content": GREET.replace("politely", "warmly"), "message": "warmer", "parent": head})
    assert resp.status_code == 201, resp.text
    git(repo, "pull", "--ff-only", "origin", "main")
    assert "warmly" in (repo / "greet.yaml").read_text()
    assert git(repo, "rev-parse", "HEAD").stdout.strip() == resp.json()["version"]

    # a clone made before that push is stale: git refuses it without the server changing anything
    stale = tmp_path / "stale"
    git(tmp_path, "clone", url, "stale")
    git(repo, "commit", "--allow-empty", "-m", "move main on")
    git(repo, "push", "origin", "HEAD:main")
    (stale / "greet.yaml").write_text(GREET.replace("politely", "briskly"))
    git(stale, "commit", "-am", "brisk")
    assert git(stale, "push", "origin", "HEAD:main", check=False).returncode != 0


def test_only_prompt_keys_reach_the_repository(gateway, make_tenant, tmp_path):
    app = make_tenant()
    url = gateway.url.replace("http://", f"http://git:{app.key}@") + "/prompts.git"
    assert git(tmp_path, "clone", url, "nope", check=False).returncode != 0
    challenge = httpx.get(gateway.url + "/prompts.git/info/refs?service=git-upload-pack")
    assert challenge.status_code == 401
    assert challenge.headers["www-authenticate"].startswith("Basic")


def _push_tree(tmp_path: Path, url: str, entries: list[tuple[bytes, int, bytes]]) -> subprocess.CompletedProcess[str]:
    """A commit whose tree holds exactly ``entries`` (name, mode, blob data or a sub-entry's name), made with
    dulwich because git itself will not write such names, pushed with git onto the current main."""
    from dulwich.objects import Blob, Commit, Tree
    from dulwich.repo import Repo

    work = tmp_path / f"crafted-{len(list(tmp_path.iterdir()))}"
    git(tmp_path, "clone", url, work.name)
    repo = Repo(str(work))
    head = repo.head() if b"refs/heads/main" in repo.refs else None
    tree = Tree()
    if head is not None:
        for item in repo[repo[head].tree].iteritems():
            tree.add(item.path, item.mode, item.sha)
    for name, mode, data in entries:
        if mode == 0o040000:
            sub, blob = Tree(), Blob.from_string(b"x")
            repo.object_store.add_object(blob)
            sub.add(data, 0o100644, blob.id)
            repo.object_store.add_object(sub)
            tree.add(name, mode, sub.id)
        else:
            blob = Blob.from_string(data)
            repo.object_store.add_object(blob)
            tree.add(name, mode, blob.id)
    repo.object_store.add_object(tree)
    commit = Commit()
    commit.tree, commit.parents = tree.id, [head] if head is not None else []
    commit.author = commit.committer = b"Ada <ada@example.com>"
    commit.author_time = commit.commit_time = 1_700_000_000
    commit.author_timezone = commit.commit_timezone = 0
    commit.message = b"crafted\n"
    repo.object_store.add_object(commit)
    repo.refs[b"refs/heads/crafted"] = commit.id
    return git(work, "push", "origin", "crafted:main", check=False)


@pytest.mark.parametrize(("name", "mode", "data"), [
    (b"..", 0o100644, b"x"), (b".git", 0o100644, b"x"), (b".gitmodules", 0o100644, b"x"),
    (b"sub", 0o040000, b"dir.txt"), (b"\xff\xfe.yaml", 0o100644, GREET.encode()),
    (b"<img src=x onerror=alert(1)>.yaml", 0o100644, GREET.encode()), (b"two\nlines.yaml", 0o100644, GREET.encode()),
    (b"a" * 300 + b".yaml", 0o100644, GREET.encode()), (b"link", 0o120000, b"/etc/passwd"),
])
def test_pushes_with_bad_names_are_refused_and_clones_keep_working(gateway, make_tenant, tmp_path, name, mode, data):
    eng = make_tenant(role="prompt_engineer")
    url = gateway.url.replace("http://", f"http://git:{eng.key}@") + "/prompts.git"
    pushed = _push_tree(tmp_path, url, [(b"greet.yaml", 0o100644, GREET.encode())])
    assert pushed.returncode == 0, pushed.stderr
    refused = _push_tree(tmp_path, url, [(name, mode, data)])
    assert refused.returncode != 0
    assert "remote rejected" in refused.stderr
    assert git(tmp_path, "clone", url, "after").returncode == 0
    assert sorted(p.name for p in (tmp_path / "after").iterdir() if p.name != ".git") == ["greet.yaml"]


def test_a_push_of_two_megabytes_works_with_git_defaults(gateway, make_tenant, tmp_path):
    import base64

    eng = make_tenant(role="prompt_engineer")
    url = gateway.url.replace("http://", f"http://git:{eng.key}@") + "/prompts.git"
    git(tmp_path, "clone", url, "repo")
    repo = tmp_path / "repo"
    (repo / "greet.yaml").write_text(GREET)
    for i in range(4):  # incompressible: the pack is about 2 MB, so git sends it chunked
        (repo / f"data-{i}.txt").write_text(base64.b64encode(os.urandom(520_000)).decode())
    git(repo, "add", ".")
    git(repo, "commit", "-m", "a large prompt set")
    pushed = git(repo, "push", "origin", "HEAD:main", check=False)
    assert pushed.returncode == 0, pushed.stderr
    assert git(tmp_path, "clone", url, "copy").returncode == 0
    assert (tmp_path / "copy" / "data-3.txt").read_text() == (repo / "data-3.txt").read_text()


def test_a_push_that_inflates_past_the_limits_is_refused_before_it_is_unpacked(gateway, make_tenant, tmp_path):
    """200 MB of zeros pack into well under a megabyte; unpacked whole in memory (as the git library does), a
    push of 300 MB of them took a gateway from 195 to 809 MB. It is refused from the pack's own headers; the
    next push lands."""
    eng = make_tenant(role="prompt_engineer")
    url = gateway.url.replace("http://", f"http://git:{eng.key}@") + "/prompts.git"
    git(tmp_path, "clone", url, "repo")
    repo = tmp_path / "repo"
    (repo / "big.yaml").write_bytes(bytes(200 << 20))
    git(repo, "add", "big.yaml")
    git(repo, "commit", "-m", "zeros")
    refused = git(repo, "push", "origin", "HEAD:main", check=False)
    assert refused.returncode != 0
    assert "[remote rejected] HEAD -> main (an object of the push is 209715200 bytes inflated" in refused.stderr, \
        refused.stderr
    assert "push refused before unpacking" in gateway.log.read_text(errors="replace")
    fresh = tmp_path / "fresh"
    git(tmp_path, "clone", url, "fresh")
    (fresh / "greet.yaml").write_text(GREET)
    git(fresh, "add", "greet.yaml")
    git(fresh, "commit", "-m", "greet")
    assert git(fresh, "push", "origin", "HEAD:main", check=False).returncode == 0
    assert [v["version"] for v in versions(gateway, eng)] == [git(fresh, "rev-parse", "HEAD").stdout.strip()]


def test_a_fetch_from_a_clone_with_hundreds_of_local_commits_works(gateway, make_tenant, tmp_path):
    """git gzips a fetch's negotiation once it passes 1 KiB: a clone holding a few hundred commits the server
    has not seen sends its "have" lines so, and the server answered 400 (git: "RPC failed; HTTP 400")."""
    eng = make_tenant(role="prompt_engineer")
    url = gateway.url.replace("http://", f"http://git:{eng.key}@") + "/prompts.git"
    git(tmp_path, "clone", url, "repo")
    repo = tmp_path / "repo"
    (repo / "greet.yaml").write_text(GREET)
    git(repo, "add", "greet.yaml")
    git(repo, "commit", "-m", "greet")
    git(repo, "push", "origin", "HEAD:main")
    # 400 local commits on top of it, written at once by fast-import; newer than the common commit, so git's
    # negotiation (newest first) sends them all as "have" lines before it reaches that one
    import time

    now = int(time.time())
    stream = "".join(f"commit refs/heads/main\ncommitter Ada <ada@example.com> {now + 60 + i} +0000\n"
                     f"data 9\nlocal {i:03d}\n" + ("from refs/heads/main^0\n" if i == 0 else "")
                     + f"M 644 inline notes-{i % 7}.txt\ndata 4\n{i:03d}\n\n" for i in range(400))
    subprocess.run(["git", "fast-import", "--quiet"], cwd=repo, input=stream, text=True, check=True, timeout=60,
                   env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1"})
    git(tmp_path, "clone", url, "other")
    other = tmp_path / "other"
    (other / "greet.yaml").write_text(GREET.replace("politely", "warmly"))
    git(other, "commit", "-am", "warmer")
    git(other, "push", "origin", "HEAD:main")
    fetched = subprocess.run(["git", "fetch", "origin"], cwd=repo, capture_output=True, text=True, timeout=60,
                             env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1",
                                  "GIT_TERMINAL_PROMPT": "0", "GIT_TRACE_CURL": "1", "GIT_TRACE_CURL_NO_DATA": "1"})
    assert "Content-Encoding: gzip" in fetched.stderr  # the negotiation this test is about
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    assert git(repo, "rev-parse", "origin/main").stdout == git(other, "rev-parse", "HEAD").stdout


def test_an_admin_repairs_a_repository_that_holds_bad_entries(gateway, make_tenant, make_key, pg, tmp_path):
    """A repository written before the path check (entries put in the store directly) is mended by an
    admin's repair: a commit that keeps the valid files; clones work again."""
    import asyncio

    import psycopg

    from tollway.prompts.store import _commit, _land, _lock_head, load_head_tree, memory_repo

    eng = make_tenant(role="prompt_engineer")
    admin_key = make_key(eng.name, "admin")

    async def plant() -> None:
        async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
            async with conn.transaction():
                head = await _lock_head(conn, eng.id)
                repo = memory_repo(head, await load_head_tree(conn, eng.id, head))
                bad = _commit(repo, head, {"greet.yaml": GREET.encode(), "": b"x", "..": b"y"}, "legacy", "old")
                await _land(conn, eng.id, repo, head, bad.id, "old")

    asyncio.run(plant())
    url = gateway.url.replace("http://", f"http://git:{eng.key}@") + "/prompts.git"
    assert git(tmp_path, "clone", url, "broken", check=False).returncode != 0
    repaired = httpx.post(gateway.url + "/prompts/repair", headers={"authorization": f"Bearer {admin_key}"},
                          json={})
    assert repaired.status_code == 200, repaired.text
    assert sorted(repaired.json()["dropped"]) == ["", ".."]
    assert git(tmp_path, "clone", url, "fixed").returncode == 0
    assert (tmp_path / "fixed" / "greet.yaml").read_text() == GREET


def test_hostile_git_requests_get_no_500(gateway, make_tenant):
    eng = make_tenant(role="prompt_engineer")
    auth = ("git", eng.key)
    base = gateway.url + "/prompts.git"
    def post(path: str, body: bytes, **named: str) -> httpx.Response:
        headers = {k.replace("_", "-"): v for k, v in named.items()}
        try:
            return httpx.post(base + path, content=body, auth=auth, headers=headers)
        except httpx.RemoteProtocolError as exc:
            raise AssertionError(f"{path} {body[:20]!r} {headers}: the response broke off ({exc})") from exc

    answers = [
        httpx.get(base + "/info/refs", params={"service": "git-evil-pack"}, auth=auth),
        httpx.get(base + "/info/refs", params={"service": "git-upload-pack\x00"}, auth=auth),
        httpx.get(base + "/../../etc/passwd", auth=auth),
        httpx.get(base + "/objects/../../../etc/passwd", auth=auth),
        post("/git-receive-pack", b"\x00garbage" * 100, content_type="application/x-git-receive-pack-request"),
        post("/git-upload-pack", b"0032want " + b"f" * 40 + b"\n0000",
             content_type="application/x-git-upload-pack-request"),
        post("/git-receive-pack", b"zzzz", content_type="application/x-git-receive-pack-request",
             content_encoding="gzip"),
    ]
    for resp in answers:
        resp.read()
        assert resp.status_code < 500, (resp.request.url, resp.status_code, resp.text[:200])
