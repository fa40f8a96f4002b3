"""`tollway prompts ...`: the prompt API's operations from a shell, straight against the database (like
`tollway keys`): push, list, versions, show, diff, render (a dry run with cost), label, rollback, repair."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tollway.cli.common import audited, run_with_conn
from tollway.settings import Settings


async def _tid(conn: Any, tenant: str) -> int:
    from tollway.gateway.tenancy.keys import tenant_id

    return await tenant_id(conn, tenant)


def _split_ref(text: str) -> tuple[str, str | None]:
    name, _, ref = text.partition("@")
    return name, ref or None


def cmd_push(args: argparse.Namespace) -> int:
    from tollway.prompts import parse_prompt, submit

    path = Path(args.file)
    content = path.read_text()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    extra: dict[str, str] = {}
    golden = parse_prompt(name, "new", content).raw.golden_set
    if golden is not None and (path.parent / golden).is_file():
        extra[golden] = (path.parent / golden).read_text()  # the golden set it names travels with it

    async def action(conn: Any, settings: Settings) -> int:
        made = await submit(conn, await _tid(conn, args.tenant), name, content, message=args.message,
                            author=args.author, parent=args.parent, extra_files=extra)
        print(f"{made.name}: new version (author {made.author})", file=sys.stderr)
        print(made.version)
        return 0

    return run_with_conn(args, action)


def cmd_list(args: argparse.Namespace) -> int:
    from tollway.prompts import labels_of, versions_of

    async def action(conn: Any, settings: Settings) -> int:
        tid = await _tid(conn, args.tenant)
        labels = await labels_of(conn, tid)
        seen: set[str] = set()
        for v in await versions_of(conn, tid):
            if v.name in seen:
                continue
            seen.add(v.name)
            tags = ", ".join(f"{lab.label}={lab.version[:12]}" + (f" ({lab.split_percent:g}% {lab.split_version[:12]})"
                                                                   if lab.split_version else "")
                             for lab in labels if lab.name == v.name)
            print(f"{v.name}\t{v.version[:12]}\t{tags}")
        return 0

    return run_with_conn(args, action)


def cmd_versions(args: argparse.Namespace) -> int:
    from tollway.prompts import versions_of

    async def action(conn: Any, settings: Settings) -> int:
        for v in await versions_of(conn, await _tid(conn, args.tenant), args.name):
            print(f"{v.version}\t{v.created_at}\t{v.author}\t{v.message}")
        return 0

    return run_with_conn(args, action)


def cmd_show(args: argparse.Namespace) -> int:
    from tollway.prompts import PRODUCTION, version

    name, ref = _split_ref(args.prompt)

    async def action(conn: Any, settings: Settings) -> int:
        found = await version(conn, await _tid(conn, args.tenant), name, ref or PRODUCTION)
        print(f"# {found.name}@{found.version} by {found.author}: {found.message}", file=sys.stderr)
        print(found.content, end="")
        return 0

    return run_with_conn(args, action)


def cmd_diff(args: argparse.Namespace) -> int:
    from tollway.prompts import version

    async def action(conn: Any, settings: Settings) -> int:
        tid = await _tid(conn, args.tenant)
        a, b = await version(conn, tid, args.name, args.a), await version(conn, tid, args.name, args.b)
        sys.stdout.write(a.diff(b))
        return 0

    return run_with_conn(args, action)


def _var(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--var takes NAME=VALUE, not {text!r}")
    try:
        value = json.loads(raw)  # numbers, booleans, lists, objects; anything else is a string
    except json.JSONDecodeError:
        value = raw
    return key, value


def cmd_render(args: argparse.Namespace) -> int:
    from tollway.app import upstream_configs
    from tollway.gateway.parts.prompting import dry_run, requests_per_day
    from tollway.prompts import PRODUCTION, Registry
    from tollway.routing import (
        build_catalog,
        build_upstream,
        discover,
        load_config,
        new_session,
        resolve_upstream,
    )

    name, ref = _split_ref(args.prompt)

    async def catalog_of(settings: Settings) -> Any:
        """The models the gateway would have: the config's, and those its upstreams list (as `serve` does)."""
        settings = settings.model_copy(update={"upstreams": [*settings.upstreams, *args.upstream]})
        specs = [resolve_upstream(u, timeout_s=5, connect_timeout_s=2) for u in upstream_configs(settings)]
        session = new_session()
        try:
            upstreams = {spec.name: build_upstream(spec, session) for spec in specs}
            discovered = await discover(list(upstreams.values()), 5)
        finally:
            await session.close()
        return build_catalog(load_config(settings.config), discovered, specs)

    async def action(conn: Any, settings: Settings) -> int:
        tid = await _tid(conn, args.tenant)
        catalog = await catalog_of(settings)
        registry = Registry(None)
        await registry.load_with(conn, tid)
        rendered = await registry.render_ref(tid, "cli", name, ref or PRODUCTION, dict(args.var))
        out = dry_run(catalog, rendered.name, rendered.version, list(rendered.messages), rendered.params,
                      await requests_per_day(conn, tid, name))
        if args.json:
            print(json.dumps(out, indent=2))
            return 0
        print(f"{out['prompt']}@{out['version']}")
        for m in out["messages"]:
            print(f"  [{m['role']}] {m['content']}")
        print(f"traffic: {out['requests_per_day_7d']} requests/day over the last 7 days")
        for m in out["models"] or [{"model": "(no models known: give --config or --upstream URL)"}]:
            if "usd_per_request" not in m:
                print(f"  {m['model']}")
                continue
            unpriced = " (unpriced)" if m["price_source"] == "unpriced" else ""
            print(f"  {m['model'] + unpriced:<28} {m['input_tokens']} prompt tokens (+ up to {m['max_output_tokens']} out): "
                  f"${m['usd_per_request']['prompt_only']}-{m['usd_per_request']['at_max_tokens']} per request, "
                  f"${m['usd_per_day']['prompt_only']}-{m['usd_per_day']['at_max_tokens']} per day")
        return 0

    return run_with_conn(args, action)


class _OfflineGate:
    """The CLI writes the database directly, with no gateway to run a golden set through: a version that
    names one may take ``production`` only by an override (recorded); the API's move runs the real gate."""

    def __init__(self, conn: Any, tenant_id: int) -> None:
        self.conn, self.tenant_id = conn, tenant_id

    async def check(self, tenant: str, prompt: str, candidate: str, current: str | None, actor: Any = None) -> Any:
        from tollway.prompts import GateResult, parse_prompt, version

        found = await version(self.conn, self.tenant_id, prompt, candidate)
        golden = parse_prompt(prompt, found.version, found.content).raw.golden_set
        if golden is None:
            return GateResult(True, "no golden set: nothing to judge (the move passes)", {"gate": "offline"})
        return GateResult(False, f"version names golden set {golden}, which only the gateway can run: move production "
                                 "through the API (PUT /v1/prompts/NAME/labels/production), or pass --override",
                          {"gate": "offline"})


def print_gate(gate: dict[str, Any], out: Any = sys.stderr) -> None:
    """A gate's verdict and, for the evals gate, its runs side by side."""
    passed = gate.get("passed")
    summary = gate.get("summary")
    print(f"gate: {'passed' if passed else 'FAILED'}{': ' + summary if summary else ''}", file=out)
    report = gate.get("report") or {}
    cand, cur = report.get("candidate"), report.get("current")
    if not cand:
        return
    rows: list[tuple[str, str, Callable[[Any], str]]] = [
            ("version", "version", lambda v: str(v)[:12]), ("run", "run", str), ("items", "items", str),
            ("pass rate", "pass_rate", lambda v: f"{v:.0%}"), ("errors", "errors", str),
            ("mean score", "mean_score", lambda v: "-" if v is None else f"{v:.2f}"),
            ("judge skipped", "judge_skipped", str), ("cost $", "cost_usd", lambda v: f"{v:.6f}")]
    print(f"\n{'':<14} {'candidate':>14} {'current':>14}", file=out)
    for title, key, fmt in rows:
        a = fmt(cand.get(key)) if cand.get(key) is not None or key == "mean_score" else "-"
        b = "-" if not cur else (fmt(cur.get(key)) if cur.get(key) is not None or key == "mean_score" else "-")
        print(f"{title:<14} {a:>14} {b:>14}", file=out)
    comparison = report.get("comparison") or {}
    if comparison:
        passes = comparison["passes"]
        print(f"\nregressions: {', '.join(comparison['regressions']) or 'none'}; improvements: "
              f"{', '.join(comparison['improvements']) or 'none'}; McNemar p = {passes['p_value']:.4g}", file=out)
    t = report.get("thresholds") or {}
    if t:
        print(f"thresholds: pass rate >= {t['min_pass_rate']:.0%}, regression <= {t['max_regression']:.0%} "
              f"at alpha {t['alpha']}", file=out)


def _label_through_gateway(args: argparse.Namespace, split_version: str | None, split_percent: float) -> int:
    """With an API key the move goes through the running gateway, which runs the gate (the golden set)."""
    from tollway.cli.retrieval import ApiError, Client

    base = args.base_url or os.environ.get("TOLLWAY_BASE_URL") or "http://127.0.0.1:8080/v1"
    client = Client(base, args.api_key or os.environ["TOLLWAY_API_KEY"])
    body: dict[str, Any] = {"version": args.version, "override": args.override, "tenant": args.tenant,
                            "reason": args.reason, "split_percent": split_percent}
    if split_version:
        body["split_version"] = split_version
    try:
        moved = client.call("PUT", f"/prompts/{args.name}/labels/{args.label}", body)
    except ApiError as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        if exc.code == "gate_failed":
            print_gate({"passed": False, "summary": "", "report": exc.body.get("error", {}).get("report")})
        return 1
    gate = moved.pop("gate", None)
    if gate is not None:
        print_gate(gate)
    print(json.dumps(moved))
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from tollway.prompts import move_label

    split_version, split_percent = None, 0.0
    if args.split:
        split_version, _, pct = args.split.rpartition(":")
        split_percent = float(pct)
    if not args.offline and (args.api_key or os.environ.get("TOLLWAY_API_KEY")):
        return _label_through_gateway(args, split_version or None, split_percent)

    async def action(conn: Any, settings: Settings) -> int:
        tid = await _tid(conn, args.tenant)
        moved, gate = await move_label(conn, tid, args.tenant, args.name, args.label,
                                       args.version, author=args.author, reason=args.reason,
                                       split_version=split_version or None, split_percent=split_percent,
                                       gate=_OfflineGate(conn, tid), admin=True, override=args.override)
        if gate is not None:
            print(f"gate: {'passed' if gate.passed else 'FAILED (overridden)'}: {gate.summary}", file=sys.stderr)
        print(json.dumps(moved.as_json()))
        return 0

    return run_with_conn(args, action)


def cmd_rollback(args: argparse.Namespace) -> int:
    from tollway.prompts import rollback

    async def action(conn: Any, settings: Settings) -> int:
        moved = await rollback(conn, await _tid(conn, args.tenant), args.tenant, args.name, args.label,
                               author=args.author, reason=args.reason)
        print(json.dumps(moved.as_json()))
        return 0

    return run_with_conn(args, action)


def cmd_repair(args: argparse.Namespace) -> int:
    from tollway.prompts import repair

    async def action(conn: Any, settings: Settings) -> int:
        dropped = await repair(conn, await _tid(conn, args.tenant), args.author)
        for path in dropped:
            print(f"dropped {path!a}", file=sys.stderr)
        print(json.dumps({"dropped": dropped}))
        return 0

    return run_with_conn(args, action)


def add_commands(sub: Any, common: Any) -> None:
    prompts = sub.add_parser("prompts", help="git-versioned prompts").add_subparsers(dest="action", required=True)

    def command(name: str, help_text: str, func: Any, *, changes: bool = False) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = prompts.add_parser(name, help=help_text)
        common(parser)
        parser.add_argument("--tenant", required=True)
        if changes:
            audited(parser)
        parser.set_defaults(func=func)
        return parser

    push = command("push", "submit FILE (NAME.yaml) as a new version; prints the version id last", cmd_push,
                   changes=True)
    push.add_argument("file")
    push.add_argument("-m", "--message", required=True)
    push.add_argument("--parent", help="the version this edit is based on (refused if the prompt moved on)")
    command("list", "prompts with their latest version and labels", cmd_list)
    versions = command("versions", "a prompt's versions, newest first", cmd_versions)
    versions.add_argument("name")
    show = command("show", "print NAME[@VERSION|LABEL] (default: production)", cmd_show)
    show.add_argument("prompt")
    diff = command("diff", "unified diff between two versions or labels", cmd_diff)
    diff.add_argument("name")
    diff.add_argument("a")
    diff.add_argument("b")
    render = command("render", "dry run: rendered messages, tokens and cost per model, per request and per day",
                     cmd_render)
    render.add_argument("prompt", help="NAME[@VERSION|LABEL]")
    render.add_argument("--var", type=_var, action="append", default=[], help="NAME=VALUE (JSON or text)")
    render.add_argument("--json", action="store_true")
    render.add_argument("--upstream", action="append", default=[], metavar="URL",
                        help="an upstream whose /v1/models lists models to price (as `tollway serve --upstream`)")
    label = command("label", "point LABEL at VERSION (production: through the gate)", cmd_label, changes=True)
    label.add_argument("name")
    label.add_argument("label")
    label.add_argument("version")
    label.add_argument("--split", help="VERSION:PERCENT of end users get another version")
    label.add_argument("--override", action="store_true", help="move production even if the gate fails (recorded)")
    label.add_argument("--api-key", help="TOLLWAY_API_KEY: move through the running gateway, which runs the gate "
                                         "(the golden set, candidate against current)")
    label.add_argument("--base-url", help="the gateway's /v1 URL; TOLLWAY_BASE_URL (default http://127.0.0.1:8080/v1)")
    label.add_argument("--offline", action="store_true",
                       help="write the database directly even with an API key (production then needs --override "
                            "when the version names a golden set)")
    command("repair", "drop entries a prompt repository may not hold (bad names or paths from before the "
            "check): a commit on main keeping the rest", cmd_repair, changes=True)
    rollback = command("rollback", "move LABEL back to its previous version", cmd_rollback, changes=True)
    rollback.add_argument("name")
    rollback.add_argument("label")
