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


@pytest.fixture(scope="module")
def gateway(serve, sim, pg, redis_url, helpers, tmp_path_factory):
    config = helpers.write_config(tmp_path_factory.mktemp("cfg") / "tollway.yaml", sim.url)
    return serve("--config", str(config), env={"TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url,
                                               "TOLLWAY_BOOTSTRAP": "false"})


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
    assert challenge.status_code == 401 and challenge.headers["www-authenticate"].startswith("Basic")
