"""The `tollway` command as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
from support.config import write_config
from support.processes import ready

REPO = Path(__file__).resolve().parents[2]


def tollway(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "tollway.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, cwd=cwd)


def test_tenants_and_keys(pg, sim, redis_url, serve, tmp_path):
    env = {"TOLLWAY_DATABASE_URL": pg.url}
    created = tollway("tenants", "create", "cli-tenant", env=env)
    assert created.returncode == 0, created.stderr
    again = tollway("tenants", "create", "cli-tenant", env=env)
    assert again.returncode == 2
    assert "already exists" in again.stderr
    key = tollway("keys", "create", "--tenant", "cli-tenant", "--models", "sim-small", env=env)
    assert key.returncode == 0, key.stderr
    secret = key.stdout.strip()
    assert secret.startswith("tw-")
    assert "shown once" in key.stderr
    key_id = key.stderr.split()[1]
    missing = tollway("keys", "create", "--tenant", "nobody", env=env)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr

    config = write_config(tmp_path / "tollway.yaml", sim.url)
    served = serve("--config", str(config), env={**env, "TOLLWAY_REDIS_URL": redis_url,
                                                 "TOLLWAY_AUTH_CACHE_TTL_S": "0.2", "TOLLWAY_BOOTSTRAP": "0"})
    headers = {"authorization": f"Bearer {secret}"}
    assert [m["id"] for m in httpx.get(served.url + "/models", headers=headers).json()["data"]] == ["sim-small", "auto"]
    # the id `keys revoke` needs, found by `keys list` (never the secret); the lookup above marked it used
    listed = json.loads(tollway("keys", "list", "--tenant", "cli-tenant", "--json", env=env).stdout)
    assert [(k["id"], k["role"], k["models"]) for k in listed] == [(int(key_id), "app", ["sim-small"])]
    assert listed[0]["last_used_at"] is not None
    assert secret not in json.dumps(listed)
    table = tollway("keys", "list", "--tenant", "cli-tenant", env=env).stdout
    assert table.splitlines()[0].split()[:4] == ["id", "tenant", "name", "role"]
    assert key_id in table
    limited = tollway("keys", "limits", key_id, "--rpm", "60", "--max-parallel-requests", "2", env=env)
    assert json.loads(limited.stdout) == {"key_id": int(key_id), "rpm": 60, "tpm": None, "max_parallel_requests": 2}
    [listed] = json.loads(tollway("keys", "list", "--tenant", "cli-tenant", "--json", env=env).stdout)
    assert (listed["rpm"], listed["tpm"], listed["max_parallel_requests"]) == (60, None, 2)
    assert "rpm 60, parallel 2" in tollway("keys", "list", "--tenant", "cli-tenant", env=env).stdout
    zero = tollway("keys", "limits", key_id, "--max-parallel-requests", "0", env=env)
    assert zero.returncode == 2 and "at least 1" in zero.stderr and "Traceback" not in zero.stderr
    tenants = tollway("tenants", "list", env=env).stdout
    assert "cli-tenant" in tenants
    revoked = tollway("keys", "revoke", key_id, env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert tollway("keys", "revoke", key_id, env=env).returncode == 1
    import time

    time.sleep(0.3)
    assert httpx.get(served.url + "/models", headers=headers).status_code == 401


def test_unknown_config_key_stops_start_up(tmp_path, pg):
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams:\n  - name: v\n    base_url: http://127.0.0.1:9\n    api_kee: env::X\n")
    result = tollway("serve", "--config", str(bad), env={"TOLLWAY_DATABASE_URL": pg.url})
    assert result.returncode == 2
    assert "upstreams.0.api_kee: Extra inputs are not permitted" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_gateway_that_cannot_start_says_why_in_one_line_and_exits_3(tmp_path, pg, redis_url):
    """An upstream it cannot list, a PostgreSQL it cannot reach, a secret not set: `tollway serve` logged a 10 KB
    traceback, and with --workers it exited 0 (a supervisor saw a clean stop). Now one line says why, and it
    exits 3 either way. The five starts run at once."""
    from concurrent.futures import ThreadPoolExecutor

    from tollway.local.embedded import free_port, wait_until

    nowhere, pages = free_port(), free_port()  # pages: a web server, not an OpenAI-style API
    down = f"http://127.0.0.1:{nowhere}/v1"
    stores = {"TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url}
    (tmp_path / "secret.yaml").write_text(f"upstreams:\n  - name: v\n    base_url: {down}\n"
                                          "    api_key: env::TOLLWAY_TEST_UNSET_SECRET\n    discover_models: true\n")
    cases = {  # what is wrong: (arguments, environment, the line that says so)
        "unreachable": (("--upstream", down), stores,
                        f"could not list models of upstream upstream-1 ({down}): upstream upstream-1 is unreachable"),
        "unreachable, 2 workers": (("--upstream", down, "--workers", "2"), stores,
                                   f"could not list models of upstream upstream-1 ({down})"),
        "no PostgreSQL": (("--upstream", down), {**stores, "TOLLWAY_DATABASE_URL": f"postgresql://x@127.0.0.1:{nowhere}/db"},
                          "cannot reach PostgreSQL"),
        "secret not set": (("--config", str(tmp_path / "secret.yaml")), stores,
                           "secret 'env::TOLLWAY_TEST_UNSET_SECRET': environment variable TOLLWAY_TEST_UNSET_SECRET is "
                           "not set"),
        # its 404 page was quoted as "upstream upstream-1 does not serve this model: <!DOCTYPE HTML>..."
        "not an API": (("--upstream", f"http://127.0.0.1:{pages}/v1"), stores,
                       f"could not list models of upstream upstream-1 (http://127.0.0.1:{pages}/v1): GET "
                       f"http://127.0.0.1:{pages}/v1/models answered 404: is http://127.0.0.1:{pages}/v1 the server's "
                       "OpenAI-compatible base URL"),
    }
    with subprocess.Popen([sys.executable, "-m", "http.server", str(pages), "--bind", "127.0.0.1"], cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as web:
        try:
            wait_until(ready(f"http://127.0.0.1:{pages}/"), 10, "http.server")

            def start(n: int, args: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
                return tollway("serve", *args, "--port", str(free_port()),
                               env={**env, "TOLLWAY_DATA_DIR": str(tmp_path / f"data-{n}")})  # a key secret each

            with ThreadPoolExecutor(len(cases)) as pool:
                started = [pool.submit(start, n, args, env) for n, (args, env, _) in enumerate(cases.values())]
                runs = {name: future.result() for name, future in zip(cases, started, strict=True)}
        finally:
            web.terminate()
    for name, run in runs.items():
        assert run.returncode == 3, (name, run.stderr[-2000:])
        assert f"tollway could not start: {cases[name][2]}" in run.stderr, (name, run.stderr[-2000:])
        assert "Traceback" not in run.stderr and "<html" not in run.stderr.lower(), (name, run.stderr[-2000:])


def test_a_quick_start_upstream_that_wants_a_key_gets_it_from_the_environment(serve, start_sim, pg, redis_url,
                                                                               make_tenant, tmp_path):
    """An --upstream behind vLLM's --api-key could only be reached through a config file; its 401 said 'refused
    Tollway's credentials'. TOLLWAY_UPSTREAM_API_KEY now goes to every --upstream, and the 401 says so."""
    from tollway.local.embedded import free_port

    locked = start_sim("--api-key", "s3cret")
    stores = {"TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_BOOTSTRAP": "false"}
    keyless = tollway("serve", "--upstream", locked.url, "--port", str(free_port()),
                      env={**stores, "TOLLWAY_DATA_DIR": str(tmp_path)})
    assert keyless.returncode == 3, keyless.stderr[-2000:]
    assert f"GET {locked.url}/models answered 401: the upstream wants an API key, or another one " \
        "(TOLLWAY_UPSTREAM_API_KEY" \
        in keyless.stderr, keyless.stderr[-2000:]
    served = serve("--upstream", locked.url, env={**stores, "TOLLWAY_UPSTREAM_API_KEY": "s3cret"})
    tenant = make_tenant()
    answer = httpx.post(served.url + "/chat/completions", headers=tenant.headers, timeout=30,
                        json={"model": "sim-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert answer.status_code == 200, answer.text
    assert "s3cret" not in served.log.read_text()


def test_an_unreachable_store_or_gateway_is_one_line_not_a_traceback(tmp_path, redis_url, pg, make_tenant):
    """A command whose PostgreSQL, Redis or gateway does not answer says which, and how to point it elsewhere."""
    from tollway.local.embedded import free_port

    nowhere = free_port()
    down = tollway("keys", "list", env={"TOLLWAY_DATABASE_URL": f"postgresql://x@127.0.0.1:{nowhere}/db"})
    tenant = make_tenant()
    made = tollway("budgets", "set", "--tenant", tenant.name, "--window", "day", "--usd", "1",
                   env={"TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url})
    assert made.returncode == 0, made.stderr
    no_redis = tollway("budgets", "reset", "--tenant", tenant.name,  # its counters are cleared in Redis
                       env={"TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": f"redis://127.0.0.1:{nowhere}"})
    (tmp_path / "a.md").write_text("# A\n\nhello")
    no_gateway = [tollway(*cmd, "--base-url", f"http://127.0.0.1:{nowhere}/v1", "--api-key", "tw-x")
                  for cmd in (("search", "--collection", "c", "hello"), ("ingest", "--collection", "c", str(tmp_path)))]
    bad_metadata = tollway("ingest", "--collection", "c", "--metadata", "{lang: en}", "--api-key", "tw-x",
                           str(tmp_path))
    (tmp_path / "latin1.yaml").write_bytes(b"messages: [{role: user, content: caf\xe9}]\n")
    unreadable = [tollway("prompts", "push", "--tenant", tenant.name, "-m", "m", str(path), env={"TOLLWAY_DATABASE_URL": pg.url})
                  for path in (tmp_path / "missing.yaml", tmp_path / "latin1.yaml", tmp_path)]
    (tmp_path / "set.jsonl").write_bytes(b"\xff\xfe{}\n")
    binary_set = tollway("evals", "run", "--model", "m", "--api-key", "tw-x", str(tmp_path / "set.jsonl"))
    assert down.returncode == 2 and "cannot reach PostgreSQL" in down.stderr, down.stderr
    assert "TOLLWAY_DATABASE_URL" in down.stderr
    assert no_redis.returncode == 2 and "cannot reach Redis" in no_redis.stderr, no_redis.stderr
    for run in no_gateway:
        assert run.returncode != 0 and "cannot reach the gateway" in run.stderr, run.stderr
    assert bad_metadata.returncode != 0 and "--metadata is not JSON" in bad_metadata.stderr
    assert [run.stderr.strip().split(": ", 2)[-1] for run in unreadable] == [
        "No such file or directory", "a file given is not UTF-8 text (invalid continuation byte at byte 36)",
        "Is a directory"], [run.stderr for run in unreadable]
    assert binary_set.returncode != 0 and "not UTF-8 text" in binary_set.stderr, binary_set.stderr
    for run in (down, no_redis, *no_gateway, bad_metadata, *unreadable, binary_set):
        assert "Traceback" not in run.stderr, run.stderr


def test_doctor(pg, redis_url, sim, tmp_path):
    ok = tollway("doctor", env={"TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url,
                                "TOLLWAY_UPSTREAMS": sim.url, "TOLLWAY_CONFIG": ""})
    assert ok.returncode == 0, ok.stdout
    assert "ok    database: PostgreSQL 18" in ok.stdout
    assert "ok    redis: Redis 6.2" in ok.stdout
    assert "ok    upstream upstream-1" in ok.stdout
    assert "ok    embedder: local/all-MiniLM-L6-v2-int8: 384 dimensions" in ok.stdout
    assert "ok    guardrails: defaults: input none, output none; extra validators: none" in ok.stdout
    config = tmp_path / "guarded.yaml"
    config.write_text("guardrails:\n  output: {pii: redact}\n  validators:\n"
                      "    toxic: {use: 'guardrails.hub:ToxicLanguage'}\n")
    missing = tollway("doctor", env={"TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url,
                                     "TOLLWAY_UPSTREAMS": sim.url, "TOLLWAY_CONFIG": str(config)})
    assert missing.returncode == 1
    assert "FAIL  guardrails" in missing.stdout
    assert "cannot import" in missing.stdout
    broken = tollway("doctor", env={"TOLLWAY_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/x",
                                    "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_UPSTREAMS": "http://127.0.0.1:9",
                                    "TOLLWAY_CONFIG": ""})
    assert broken.returncode == 1
    assert "FAIL  database" in broken.stdout
    assert "FAIL  upstream upstream-1" in broken.stdout


def test_our_guardrails_folder_never_shadows_guardrails_ai(tmp_path):
    # anywhere but the repository root, `guardrails` is guardrails-ai (a dependency)
    elsewhere = subprocess.run([sys.executable, "-c", "import guardrails; print(guardrails.__file__)"], cwd=tmp_path,
                               capture_output=True, text=True)
    assert elsewhere.returncode == 0 and "site-packages" in elsewhere.stdout, elsewhere.stderr
    # at the root (where `python -c` puts the folder first on sys.path) ours says what happened
    result = subprocess.run([sys.executable, "-c", "import guardrails"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert "import it by that name" in result.stderr
    assert "tollway.guardrails" in result.stderr
    from tollway import guardrails

    assert guardrails.__name__ == "tollway.guardrails"


def test_budget_commands(pg, redis_url, make_tenant):
    import json

    tenant = make_tenant()
    env = {"TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url}
    made = tollway("budgets", "set", "--tenant", tenant.name, "--window", "day", "--usd", "2.5", env=env)
    assert made.returncode == 0, made.stderr
    budget = json.loads(made.stdout)
    assert (budget["window"], budget["limit_usd"], budget["scope"]) == ("day", "2.5000000000", "tenant")
    per_user = tollway("budgets", "set", "--tenant", tenant.name, "--user", "*", "--window", "hour",
                       "--tokens", "1000", env=env)
    assert per_user.returncode == 0, per_user.stderr
    policy = tollway("tenants", "policy", "--tenant", tenant.name, "--redis-failure", "open", "--rpm", "60", env=env)
    assert policy.returncode == 0
    assert json.loads(policy.stdout)["redis_failure"] == "open"
    routing = tollway("tenants", "policy", "--tenant", tenant.name, "--route-threshold", "0.3", "--allowed-models",
                      "sim-small,sim-large", "--quality-floor", "large", "--degraded-answers", "on",
                      "--response-cache", "off", env=env)
    assert routing.returncode == 0, routing.stderr
    assert {k: v for k, v in json.loads(routing.stdout).items() if k in (
        "route_threshold", "allowed_models", "quality_floor", "degraded_answers", "response_cache", "rpm")} == {
        "route_threshold": 0.3, "allowed_models": ["sim-small", "sim-large"], "quality_floor": "large",
        "degraded_answers": True, "response_cache": False, "rpm": 60}
    for amount, said in (("NaN", "not an amount in USD"), ("1e999", "stored below"), ("-1", "cannot be negative")):
        odd = tollway("budgets", "set", "--tenant", tenant.name, "--window", "day", "--usd", amount, env=env)
        assert odd.returncode == 2 and said in odd.stderr and "Traceback" not in odd.stderr, odd.stderr
    huge = tollway("budgets", "set", "--tenant", tenant.name, "--window", "day", "--tokens", "9" * 30, env=env)
    assert huge.returncode == 2 and "cannot be stored" in huge.stderr and "Traceback" not in huge.stderr, huge.stderr
    bad = tollway("tenants", "policy", "--tenant", tenant.name, "--route-threshold", "1.5", env=env)
    assert bad.returncode != 0
    assert "route_threshold" in bad.stderr
    typo = tollway("tenants", "policy", "--tenant", tenant.name, "--quality-floor", "lagre", env=env)
    assert typo.returncode != 0
    assert "'lagre' is not a routing tier (tiers: large, small)" in typo.stderr
    cleared = tollway("tenants", "policy", "--tenant", tenant.name, "--rpm", "none", "--quality-floor", "none",
                      "--max-parallel-requests", "8", env=env)
    assert cleared.returncode == 0, cleared.stderr
    assert {k: v for k, v in json.loads(cleared.stdout).items() if k in (
        "rpm", "quality_floor", "max_parallel_requests", "route_threshold")} == {
        "rpm": None, "quality_floor": None, "max_parallel_requests": 8, "route_threshold": 0.3}  # the rest kept
    assert json.loads(cleared.stdout)["effective"] == {"max_parallel_requests": 8}
    unset = tollway("tenants", "policy", "--tenant", tenant.name, "--max-parallel-requests", "none",
                    env={**env, "TOLLWAY_DEFAULT_MAX_PARALLEL_REQUESTS": "5"})
    assert json.loads(unset.stdout)["effective"] == {"max_parallel_requests": 5}, unset.stderr  # as the API says
    assert tollway("tenants", "policy", "--tenant", tenant.name, "--rpm", "0", env=env).returncode == 2
    assert tollway("tenants", "policy", "--tenant", tenant.name, "--rpm", "60", env=env).returncode == 0
    limits = tollway("keys", "limits", str(tenant.key_id), "--rpm", "10", env=env)
    assert limits.returncode == 0, limits.stderr
    shown = json.loads(tollway("budgets", "show", "--tenant", tenant.name, env=env).stdout)
    assert [(b["scope"], b["subject"], b["window"]) for b in shown["budgets"]] == [
        ("tenant", "", "day"), ("user", "*", "hour")]
    assert (shown["policy"]["rpm"], shown["policy"]["effective"]) == (60, {"max_parallel_requests": None})
    reset = tollway("budgets", "reset", "--tenant", tenant.name, "--id", str(budget["id"]), env=env)
    assert reset.returncode == 0
    assert json.loads(reset.stdout)["reset"] == [budget["id"]]
    reconciled = tollway("budgets", "reconcile", env=env)
    assert reconciled.returncode == 0, reconciled.stderr
    assert json.loads(reconciled.stdout)["checked"] >= 1
    bad = tollway("budgets", "set", "--tenant", tenant.name, "--window", "day", env=env)
    assert bad.returncode == 2
    assert "give a USD limit" in bad.stderr
    negative = tollway("budgets", "set", "--tenant", tenant.name, "--window", "day", "--usd", "-1", env=env)
    assert negative.returncode == 2
    assert "negative" in negative.stderr


def test_sigterm_stops_the_embedded_services_too(serve, sim):
    import time

    served = serve("--upstream", sim.url, env={"TOLLWAY_DATABASE_URL": "", "TOLLWAY_REDIS_URL": "",
                                              "TOLLWAY_CONFIG": ""})
    data = Path(served.env["TOLLWAY_DATA_DIR"])
    assert (data / "postgres" / "postmaster.pid").exists()
    served.stop()  # SIGTERM, as Kubernetes or systemd would send
    assert served.process.returncode == 0
    deadline = time.monotonic() + 10
    while (data / "postgres" / "postmaster.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (data / "postgres" / "postmaster.pid").exists()


def test_workers_share_one_port_and_the_embedded_services(serve, sim):
    """`--workers 2`: embedded PostgreSQL and Redis are started once by the parent; both workers answer;
    the bootstrap key is created once; SIGTERM stops the workers, then the embedded services."""
    import subprocess
    import time
    from concurrent.futures import ThreadPoolExecutor

    served = serve("--upstream", sim.url, "--workers", "2", env={
        "TOLLWAY_DATABASE_URL": "", "TOLLWAY_REDIS_URL": "", "TOLLWAY_CONFIG": ""})
    data = Path(served.env["TOLLWAY_DATA_DIR"])
    log = served.log.read_text()
    keys = set(re.findall(r"tw-[A-Za-z0-9_-]{20,}", log))
    deadline = time.monotonic() + 30
    while not keys and time.monotonic() < deadline:  # the worker that bootstrapped may print a moment later
        time.sleep(0.2)
        keys = set(re.findall(r"tw-[A-Za-z0-9_-]{20,}", served.log.read_text()))
    assert len(keys) == 1, "exactly one worker creates and prints the bootstrap key"
    key = keys.pop()
    # -ww: without a terminal ps cuts each line at 80 columns, which drops `spawn_main` under a long checkout path
    children = subprocess.run(["ps", "-ww", "-o", "args=", "--ppid", str(served.process.pid)], capture_output=True,
                              text=True).stdout.splitlines()
    workers = [c for c in children if "multiprocessing.spawn" in c and "spawn_main" in c]
    assert len(workers) == 2, children
    assert sorted(p.name for p in (data).iterdir() if p.name in ("postgres", "redis")) == ["postgres", "redis"]

    def ask(i: int) -> int:
        return httpx.post(served.url + "/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                          json={"model": "sim-small", "messages": [{"role": "user", "content": f"worker {i}"}],
                                "max_tokens": 4}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(40))) == [200] * 40
    served.stop()
    assert served.process.returncode == 0
    deadline = time.monotonic() + 10
    while (data / "postgres" / "postmaster.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (data / "postgres" / "postmaster.pid").exists()


def test_sigterm_with_a_drain_pause_leaves_the_balancer_before_the_port_closes(serve, sim, pg, redis_url, make_tenant,
                                                                              tmp_path):
    """`TOLLWAY_DRAIN_PAUSE_S`: on SIGTERM every worker answers /readyz 503 ``draining`` and still serves for the
    pause (a balancer checking readiness takes the replica out meanwhile); then the graceful stop."""
    import signal
    import time

    tenant = make_tenant()
    served = serve("--config", str(write_config(tmp_path / "tollway.yaml", sim.url)), "--workers", "2", env={
        "TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_BOOTSTRAP": "0",
        "TOLLWAY_DRAIN_PAUSE_S": "3"})
    base = served.url.removesuffix("/v1")
    assert httpx.get(base + "/readyz").status_code == 200
    served.process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    time.sleep(0.5)  # (the supervisor passes the signal on to its workers)
    with httpx.Client(timeout=10) as client:  # a connection per request: both workers are asked
        readiness = [client.get(base + "/readyz", headers={"connection": "close"}) for _ in range(8)]
        answered = client.post(served.url + "/chat/completions", headers={"authorization": f"Bearer {tenant.key}"},
                               json={"model": "sim-small", "max_tokens": 4,
                                     "messages": [{"role": "user", "content": "still there?"}]})
    assert time.monotonic() - sent < 3, "the checks above ran inside the pause"
    assert [(r.status_code, r.json()["status"]) for r in readiness] == [(503, "draining")] * 8
    assert answered.status_code == 200, answered.text
    assert served.process.wait(30) == 0
    assert time.monotonic() - sent >= 3, "the port stayed open for the pause"
