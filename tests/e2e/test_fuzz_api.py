"""A schema-driven fuzz run (schemathesis, on hypothesis) against every operation `/openapi.json` lists, on a
`tollway serve` with a own_pg database: each generated request (valid and schema-violating) is sent with
every role's key, then schemathesis' deterministic coverage phase (each field at its boundaries: null, missing, of
another type); no answer is a 500, and every error is in the OpenAI shape."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import requests
from support.config import write_config
from support.tenants import key_hasher

ROLES = ("app", "finance", "admin", "prompt_engineer")
EXAMPLES = int(os.environ.get("TOLLWAY_FUZZ_EXAMPLES", "12"))
# What may be a 5xx by contract: readiness says 503 while a store is down; the scripted upstream's fault
# models answer 502/503/504 through the gateway like any failing upstream.
NOT_A_BUG = {("GET", "/readyz"): {503}, ("POST", "/v1/chat/completions"): {502, 503, 504},
             ("POST", "/v1/embeddings"): {502, 503, 504}, ("POST", "/v1/evals/runs"): {502, 503, 504},
             **{("POST", path): {502, 503, 504} for path in ("/v1/completions", "/v1/messages", "/v1/responses")}}


async def _keys(url: str) -> dict[str, str]:
    import psycopg

    from tollway.gateway.tenancy.keys import create_key, create_tenant
    from tollway.infra.db import migrate

    await migrate(url)
    hasher = key_hasher()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await create_tenant(conn, "fuzz")
        await create_tenant(conn, "other")
        return {role: (await create_key(conn, "fuzz", hasher=hasher, role=role, ingest=role == "app")).secret
                for role in ROLES}


def _problem(method: str, path: str, resp: requests.Response) -> str | None:
    if resp.status_code >= 500 and resp.status_code not in NOT_A_BUG.get((method, path), set()):
        return f"{resp.status_code}: {resp.text[:300]}"
    if resp.status_code >= 400 and path not in ("/readyz", "/healthz"):
        try:
            error = resp.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{resp.status_code} not in the OpenAI error shape: {resp.text[:300]}"
        if set(error) != {"message", "type", "param", "code"} or not isinstance(error["message"], str):
            return f"{resp.status_code} error fields {sorted(error)}"
    return None


def test_no_operation_answers_a_500_or_an_error_of_another_shape(serve, sim, redis_url, own_pg,
                                                                  tmp_path):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    keys = asyncio.run(_keys(own_pg.url))
    config = write_config(tmp_path / "tollway.yaml", sim.url)
    gateway = serve("--config", str(config), env={"TOLLWAY_DATABASE_URL": own_pg.url,
                                                  "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_BOOTSTRAP": "false"})
    base = gateway.url.removesuffix("/v1")
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    problems: list[str] = []
    statuses: dict[int, int] = {}
    operations = 0
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in schemathesis.GenerationMode:

            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                for role in ROLES:
                    resp = case.call(base_url=base, session=session, timeout=30,
                                     headers={**(case.headers or {}), "authorization": f"Bearer {keys[role]}"})
                    statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                    problem = _problem(case.method.upper(), case.operation.path, resp)
                    if problem is not None:
                        problems.append(f"{role} {case.method.upper()} {case.formatted_path}: {problem}")

            try:
                run()
            except Unsatisfiable:  # nothing to violate (an operation without parameters or body)
                assert mode is schemathesis.GenerationMode.NEGATIVE
    assert operations >= 40
    assert sum(statuses.values()) >= operations * len(ROLES) * EXAMPLES  # the run sent what it says
    covered = _coverage_phase(schema, base, session, keys, problems, _existing(gateway.url, keys))
    assert covered > 1000, covered
    assert sum(n for status, n in statuses.items() if status < 300) > 100, statuses  # not only refusals
    assert problems == []


def _existing(url: str, keys: dict[str, str]) -> dict[str, dict[str, str]]:
    """Things that exist, by path prefix and path parameter: a collection with a document, a prompt with a version,
    a model, a key. A coverage case on such a path is sent once more naming them, so that
    its body reaches the statement it would change instead of a 404."""
    app = {"authorization": f"Bearer {keys['app']}"}
    admin = {"authorization": f"Bearer {keys['admin']}"}
    made = requests.post(url + "/collections", headers=app, json={"name": "kb"}, timeout=30)
    assert made.status_code == 201, made.text
    doc = requests.post(url + "/collections/kb/documents", headers=app, timeout=60,
                        json={"documents": [{"source": "a.md", "text": "# A\n\nWire transfers take a day."}]})
    assert doc.status_code == 200, doc.text
    prompt = requests.post(url + "/prompts/greet/versions", timeout=30,
                           headers={"authorization": f"Bearer {keys['prompt_engineer']}"},
                           json={"message": "first", "content": "variables:\n  name: {type: string}\n"
                                                                "messages:\n  - role: user\n    content: Hello {{ name }}\n"})
    assert prompt.status_code == 201, prompt.text
    key_id = str(requests.get(url + "/admin/keys", headers=admin, timeout=30).json()["data"][0]["id"])
    return {"/v1/collections/": {"name": "kb", "document": "a.md"},
            "/v1/prompts/": {"name": "greet", "label": "production"},
            "/v1/admin/models/": {"model": "sim-small"}, "/v1/admin/rollouts/": {"model": "sim-small"},
            "/v1/models/": {"model": "sim-small"},
            "/v1/admin/keys/": {"key_id": key_id}}


def _coverage_phase(schema: Any, base: str, session: requests.Session, keys: dict[str, str],
                    problems: list[str], existing: dict[str, dict[str, str]]) -> int:
    """Schemathesis' coverage phase: for every operation, deterministic cases at each field's boundaries (each
    property null, missing, of another type, at its bounds), sent with the admin and app keys; a body naming a
    tenant is sent once more naming the fuzz tenant, which exists, and a path with parameters once more naming
    things that exist (``_existing``; not for DELETE, which would remove them), so that a case reaches the
    statement it would change (a null that the database refuses, found this way). Returns the requests sent."""
    from schemathesis import GenerationMode

    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        config = schema.config.generation_for(operation=operation, phase="coverage")
        pinned = next((names for prefix, names in existing.items() if operation.path.startswith(prefix)), {})
        for case in schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode),
                                               generation_config=config):
            variants: list[tuple[Any, dict[str, Any] | None]] = [(case.body, case.path_parameters)]
            if isinstance(case.body, dict) and isinstance(case.body.get("tenant"), str):
                variants.append(({**case.body, "tenant": "fuzz"}, case.path_parameters))
            if case.path_parameters and case.method.upper() != "DELETE" and set(case.path_parameters) & set(pinned):
                variants.append((case.body, {**case.path_parameters,
                                             **{k: v for k, v in pinned.items() if k in case.path_parameters}}))
            for body, path_parameters in variants:
                case.body, case.path_parameters = body, path_parameters
                for role in ("admin", "app"):
                    resp = case.call(base_url=base, session=session, timeout=30,
                                     headers={**(case.headers or {}), "authorization": f"Bearer {keys[role]}"})
                    sent += 1
                    problem = _problem(case.method.upper(), case.operation.path, resp)
                    if problem is not None:
                        problems.append(f"coverage {role} {case.method.upper()} {case.formatted_path} "
                                        f"{str(body)[:200]}: {problem}")
    return sent
