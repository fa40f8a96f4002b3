"""Docs that run: every shell and Python block of every page of docs/ runs against a real gateway on the
scripted upstream, in order, one working folder per page; each `# expect: REGEX` comment of a block must
match what the block printed. A block preceded by a line starting `*Not run in CI` is skipped (the page
shows that line and its reason). A block with a title (```` ```yaml title="greet.yaml" ````, shown as the
file's name above it) is written to that file in the page's folder when the runner reaches it. Each page's
folder starts as a clone's would for what the docs read: the repository's README.md and docs/. The guides
run as a tenant of their own; the other pages as the quick start's tenant `default`. The site itself builds
in strict mode (`make docs`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
GUIDES = sorted(p for p in (DOCS / "guides").glob("*.md") if p.name != "index.md")
PAGES = sorted(p for p in DOCS.rglob("*.md") if p.parent.name != "guides")
FENCE = re.compile(r'^```(\w*)(?: title="([\w.-]+)")?\n(.*?)^```', re.M | re.S)
SKIP = "*Not run in CI"


def steps(page: Path) -> list[tuple[str, str, int]]:
    """(language or "file:NAME", code, line) of each block that runs or is written, in page order."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        language, title, code = m.groups()
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.startswith(SKIP) or not (title or language in ("sh", "python")):
            continue
        out.append((f"file:{title}" if title else language, code, text[:m.start()].count("\n") + 1))
    return out


def blocks(page: Path) -> list[tuple[str, str, int]]:
    """(language, code, line) of each block that runs."""
    return [step for step in steps(page) if not step[0].startswith("file:")]


def expectations(code: str) -> list[str]:
    return re.findall(r"#\s*expect:\s*(.+?)\s*$", code, re.M)


def test_every_guide_has_blocks_that_run_and_check_something() -> None:
    assert GUIDES
    for page in GUIDES:
        runnable = blocks(page)
        assert runnable, f"{page.name} has no block that runs"
        assert any(expectations(code) for _, code, _ in runnable), f"{page.name} checks nothing"


def run_page(page: Path, tenant: str, key: str, admin: Any, gateway: Any, pg: Any, redis_url: str,
             cwd: Path) -> None:
    env = {**os.environ, "TOLLWAY_BASE_URL": gateway.url, "TOLLWAY_API_KEY": key,
           "TOLLWAY_TENANT": tenant, "TOLLWAY_ADMIN_KEY": admin.key, "TOLLWAY_MODEL": "sim-large",
           "TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_CONFIG": "",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    (cwd / "README.md").symlink_to(ROOT / "README.md")
    (cwd / "docs").symlink_to(DOCS, target_is_directory=True)
    for language, code, line in steps(page):
        if language.startswith("file:"):
            (cwd / language.removeprefix("file:")).write_text(code)
            continue
        argv = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" else [sys.executable, "-c", code]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
        where = f"{page.name}:{line} ({language})"
        assert done.returncode == 0, f"{where} failed:\n{done.stdout}\n{done.stderr}"
        for pattern in expectations(code):
            assert re.search(pattern, done.stdout, re.M), f"{where}: no line matches {pattern!r} in:\n{done.stdout}"


@pytest.mark.parametrize("page", GUIDES, ids=lambda p: p.stem)
def test_a_guide_runs_as_written(page: Path, gateway: Any, make_tenant: Any, make_key: Any, admin: Any, pg: Any,
                                 redis_url: str, tmp_path: Path) -> None:
    tenant = make_tenant(ingest=True)
    key = make_key(tenant.name, role="prompt_engineer") if page.stem == "prompt-engineer" else tenant.key
    run_page(page, tenant.name, key, admin, gateway, pg, redis_url, tmp_path)


@pytest.fixture(scope="module")
def default_tenant(pg: Any, make_key: Any) -> str:
    """The quick start's tenant 'default', which the reference pages name (made here if missing)."""
    with psycopg.connect(pg.url) as conn:
        exists = conn.execute("SELECT 1 FROM tenants WHERE name = 'default'").fetchone() is not None
    if not exists:
        made = subprocess.run([sys.executable, "-m", "tollway.cli", "tenants", "create", "default"],
                              capture_output=True, text=True, env={**os.environ, "TOLLWAY_DATABASE_URL": pg.url},
                              timeout=120)
        assert made.returncode == 0, made.stderr
    return str(make_key("default", role="app", ingest=True))  # as the quick start's bootstrap key


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.stem)
def test_a_page_runs_as_written(page: Path, default_tenant: str, gateway: Any, admin: Any, pg: Any,
                                redis_url: str, tmp_path: Path) -> None:
    run_page(page, "default", default_tenant, admin, gateway, pg, redis_url, tmp_path)
