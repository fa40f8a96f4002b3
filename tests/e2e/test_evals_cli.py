"""End to end: `tollway evals run` and `tollway evals compare` (clients of the running gateway) on a golden
set file; the scripted upstream's echo model plants each answer, so the pass rate is known."""

from __future__ import annotations

import json
from pathlib import Path

from support.processes import client_cli


def write_set(path: Path, answers: dict[str, str]) -> Path:
    lines = [json.dumps({"id": item, "messages": [{"role": "user", "content": text}],
                         "checks": [{"type": "contains", "value": "yes"}]}) for item, text in answers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_prints_a_table_and_the_pass_rate_then_compare_reports_the_regressions(gateway, make_tenant,
                                                                                   tmp_path):
    tenant = make_tenant()
    good = write_set(tmp_path / "good.jsonl", {f"q{i}": f"{i}: yes" for i in range(8)})
    worse = write_set(tmp_path / "worse.jsonl", {f"q{i}": f"{i}: {'no' if i < 6 else 'yes'}" for i in range(8)})
    first = client_cli("evals", "run", str(good), "--model", "sim-echo", key=tenant.key, url=gateway.url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.rstrip().endswith("pass rate: 8/8")
    assert "contains" in first.stdout
    assert "q0" in first.stdout
    second = client_cli("evals", "run", str(worse), "--model", "sim-echo", "--concurrency", "3", key=tenant.key,
                         url=gateway.url, cwd=tmp_path)
    assert second.stdout.rstrip().endswith("pass rate: 2/8"), second.stdout
    assert "FAIL" in second.stdout
    assert "missing ['yes']" in second.stdout
    ids = [out.stdout.split()[1].rstrip(":") for out in (first, second)]
    assert all(i.startswith("run_") for i in ids)
    compared = client_cli("evals", "compare", str(ids[0]), str(ids[1]), key=tenant.key, url=gateway.url, cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    assert "regressions (6): q0, q1, q2, q3, q4, q5" in compared.stdout
    assert "pass rate 100% -> 25%" in compared.stdout
    assert ": significant at alpha 0.05" in compared.stdout
    missing = client_cli("evals", "run", str(tmp_path / "nope.jsonl"), "--model", "sim-echo", key=tenant.key,
                          url=gateway.url, cwd=tmp_path)
    assert missing.returncode != 0
    assert "no such file" in missing.stderr


PROMPT = """\
model: sim-echo
messages:
  - {role: user, content: "%s"}
variables:
  country: {type: string}
golden_set: capitals.golden.jsonl
"""
GOLDEN = "\n".join(json.dumps({"id": c, "variables": {"country": c}, "checks": [{"type": "contains", "value": "yes"}]})
                   for c in ("France", "Peru", "Japan", "Kenya", "Chile", "Spain", "Egypt", "Nepal"))


def test_a_production_move_from_the_cli_runs_the_gate_in_the_gateway_and_prints_its_table(gateway, make_tenant,
                                                                                         tmp_path):
    import httpx

    eng = make_tenant(role="prompt_engineer")

    def push(text: str) -> str:
        resp = httpx.post(gateway.url + "/prompts/capitals/versions", headers=eng.headers, timeout=30, json={
            "content": PROMPT % text, "message": "edit", "files": {"capitals.golden.jsonl": GOLDEN}})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["version"])

    good, bad = push("{{ country }}: yes"), push("{{ country }}: no idea")
    label = ("prompts", "label", "capitals", "production")
    first = client_cli(*label, good, "--tenant", eng.name, key=eng.key, url=gateway.url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "gate: passed" in first.stderr
    assert "pass rate" in first.stderr
    refused = client_cli(*label, bad, "--tenant", eng.name, key=eng.key, url=gateway.url, cwd=tmp_path)
    assert refused.returncode == 1
    assert "gate_failed" not in refused.stdout
    assert "The gate refused capitals@" in refused.stderr
    table = refused.stderr
    assert "candidate" in table
    assert "current" in table
    assert "regressions: Chile, Egypt, France" in table
    assert "100%" in table
    assert "0%" in table
