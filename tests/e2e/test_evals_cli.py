"""End to end: `tollway evals run` and `tollway evals compare` (clients of the running gateway) on a golden
set file; the scripted upstream's echo model plants each answer, so the pass rate is known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def gateway(serve, sim, pg, redis_url, helpers, tmp_path_factory):
    config = helpers.write_config(tmp_path_factory.mktemp("cfg") / "tollway.yaml", sim.url)
    return serve("--config", str(config), env={"TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url,
                                               "TOLLWAY_BOOTSTRAP": "false"})


def tollway(*args: str, key: str, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"TOLLWAY_API_KEY": key, "TOLLWAY_BASE_URL": url, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "tollway.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def write_set(path: Path, answers: dict[str, str]) -> Path:
    lines = [json.dumps({"id": item, "messages": [{"role": "user", "content": text}],
                         "checks": [{"type": "contains", "value": "yes"}]}) for item, text in answers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_prints_a_table_and_the_pass_rate_then_compare_reports_the_regressions(gateway, make_tenant, tmp_path):
    tenant = make_tenant()
    good = write_set(tmp_path / "good.jsonl", {f"q{i}": f"{i}: yes" for i in range(8)})
    worse = write_set(tmp_path / "worse.jsonl", {f"q{i}": f"{i}: {'no' if i < 6 else 'yes'}" for i in range(8)})
    first = tollway("evals", "run", str(good), "--model", "sim-echo", key=tenant.key, url=gateway.url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.rstrip().endswith("pass rate: 8/8")
    assert "contains" in first.stdout and "q0" in first.stdout
    second = tollway("evals", "run", str(worse), "--model", "sim-echo", "--concurrency", "3", key=tenant.key,
                     url=gateway.url, cwd=tmp_path)
    assert second.stdout.rstrip().endswith("pass rate: 2/8"), second.stdout
    assert "FAIL" in second.stdout and "missing ['yes']" in second.stdout
    ids = [int(out.stdout.split()[1].rstrip(":")) for out in (first, second)]
    compared = tollway("evals", "compare", str(ids[0]), str(ids[1]), key=tenant.key, url=gateway.url, cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    assert "regressions (6): q0, q1, q2, q3, q4, q5" in compared.stdout
    assert "pass rate 100% -> 25%" in compared.stdout and ": significant at alpha 0.05" in compared.stdout
    missing = tollway("evals", "run", str(tmp_path / "nope.jsonl"), "--model", "sim-echo", key=tenant.key,
                      url=gateway.url, cwd=tmp_path)
    assert missing.returncode != 0 and "no such file" in missing.stderr
