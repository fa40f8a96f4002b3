"""``tollway evals run|show|compare``: clients of a running gateway's eval API, like any OpenAI client
(``--base-url`` ending in /v1 or TOLLWAY_BASE_URL, ``--api-key`` or TOLLWAY_API_KEY). The gateway runs
the set through its own chat path, so an eval is metered, budgeted and guarded like live traffic."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tollway.cli.retrieval import ApiError, client_of


def _set_of(arg: str) -> dict[str, Any]:
    """A local JSONL file (sent inline), or ``@PROMPT[@REF]``: the golden set that prompt version names."""
    if arg.startswith("@"):
        return {"prompt": arg[1:]}
    path = Path(arg)
    if not path.is_file():
        raise SystemExit(f"tollway: {arg}: no such file (give a JSONL golden set, or @PROMPT for a prompt's own)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SystemExit(f"tollway: {arg}: not UTF-8 text (byte {exc.start}); a golden set is JSON lines") from None
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except ValueError:
                raise SystemExit(f"tollway: {arg}:{number}: not valid JSON") from None
    return {"name": path.name, "items": items}


def _cell(value: Any, width: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def print_run(run: dict[str, Any], out: Any = sys.stdout) -> None:
    summary = run.get("summary") or {}
    print(f"run {run['id']}: {run['set_name']} -> prompt {run.get('prompt_version') or run.get('prompt') or '-'}, "
          f"model {', '.join(run.get('models') or []) or run.get('model') or '-'}"
          f"{', index ' + run['index_version'] if run.get('index_version') else ''} ({run['status']})", file=out)
    checks = summary.get("checks") or {}
    if checks:
        print(f"\n{'check':<24} {'passed':>7} {'failed':>7} {'skipped':>8}", file=out)
        for name, c in sorted(checks.items()):
            print(f"{_cell(name, 24):<24} {c['passed']:>7} {c['failed']:>7} {c['skipped']:>8}", file=out)
    results = run.get("results") or []
    if results:
        print(f"\n{'item':<20} {'result':<7} {'score':>6}  detail", file=out)
        for r in results:
            failed = [c for c in r["checks"] if c["passed"] is False]
            skipped = [c for c in r["checks"] if c["passed"] is None]
            detail = r.get("error") or "; ".join(f"{c['name']}: {c['detail']}" for c in failed or skipped)
            score = "" if r.get("score") is None else f"{r['score']:.2f}"
            print(f"{_cell(r['item_id'], 20):<20} {'pass' if r['passed'] else 'FAIL':<7} {score:>6}  "
                  f"{_cell(detail, 90)}", file=out)
    if summary.get("judge_skipped"):
        print(f"\njudge skipped on {summary['judge_skipped']} item(s): its model gave no score (a weak judge; "
              "name a capable model in the check's 'model')", file=out)
    if summary:
        print(f"\ncost: ${summary.get('cost_usd', 0):.6f}", file=out)
    print(f"pass rate: {run.get('passed', 0)}/{run['items']}", file=out)


def cmd_run(args: argparse.Namespace) -> int:
    client = client_of(args)
    body: dict[str, Any] = {"set": _set_of(args.set), "prompt": args.prompt, "model": args.model,
                            "concurrency": args.concurrency}
    if args.tenant:
        body["tenant"] = args.tenant
    try:
        run = client.call("POST", "/evals/runs", {k: v for k, v in body.items() if v is not None})
        query = f"?tenant={args.tenant}" if args.tenant else ""
        progress = None
        if not args.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            progress = tqdm(total=run["items"], desc=f"eval {run['set_name']}", unit="item")
        while run["status"] == "running":
            time.sleep(0.3)
            run = client.call("GET", f"/evals/runs/{run['id']}{query}{'&' if query else '?'}results=false")
            if progress is not None:
                progress.update(run["done"] - progress.n)
        if progress is not None:
            progress.close()
        run = client.call("GET", f"/evals/runs/{run['id']}{query}")
    except ApiError as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        return 1
    _show(run, args.json)
    if run["status"] != "done":
        print(f"tollway: the run {run['status']}: {run.get('error')}", file=sys.stderr)
        return 1
    return 0


def _show(run: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(run, indent=2))
    else:
        print_run(run)


def _get(args: argparse.Namespace, path: str) -> dict[str, Any] | None:
    """One GET of the eval API (the tenant named for admin keys); None after printing the error."""
    tenant = f"{'&' if '?' in path else '?'}tenant={args.tenant}" if args.tenant else ""
    try:
        return client_of(args).call("GET", path + tenant)
    except ApiError as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        return None


def cmd_show(args: argparse.Namespace) -> int:
    run = _get(args, f"/evals/runs/{args.run}")
    if run is None:
        return 1
    _show(run, args.json)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    report = _get(args, f"/evals/compare?a={args.a}&b={args.b}" + (f"&alpha={args.alpha}" if args.alpha else ""))
    if report is None:
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    a, b = report["a"], report["b"]
    print(f"A: run {a['id']} ({a.get('prompt_version') or a.get('prompt') or '-'}, "
          f"{', '.join(a.get('models') or []) or a.get('model')})")
    print(f"B: run {b['id']} ({b.get('prompt_version') or b.get('prompt') or '-'}, "
          f"{', '.join(b.get('models') or []) or b.get('model')})")
    rate = report["pass_rate"]
    passes = report["passes"]
    print(f"\n{report['items']} items paired; pass rate {rate['a']:.0%} -> {rate['b']:.0%} "
          f"({passes['difference']:+.0%}); McNemar exact p = {passes['p_value']:.4g}: "
          f"{'significant' if passes['significant'] else 'not significant'} at alpha {report['alpha']}")
    scores = report.get("scores")
    if scores:
        low, high = scores["ci95"]
        print(f"mean score {scores['difference']:+.3f} (95% CI {low:+.3f} .. {high:+.3f}), paired bootstrap "
              f"p = {scores['p_value']:.4g}: {'significant' if scores['significant'] else 'not significant'}")
    if report["regressions"]:
        print(f"\nregressions ({len(report['regressions'])}): {', '.join(report['regressions'])}")
    if report["improvements"]:
        print(f"improvements ({len(report['improvements'])}): {', '.join(report['improvements'])}")
    return 0


def add_commands(sub: Any) -> None:
    evals = sub.add_parser("evals", help="run golden sets through a running gateway, and compare runs")
    actions = evals.add_subparsers(dest="action", required=True)

    def client_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--base-url", help="the gateway's /v1 URL; TOLLWAY_BASE_URL (default "
                                               "http://127.0.0.1:8080/v1)")
        parser.add_argument("--api-key", help="TOLLWAY_API_KEY")
        parser.add_argument("--tenant", help="the tenant (admin keys name it)")
        parser.add_argument("--json", action="store_true")

    run = actions.add_parser("run", help="run a golden set; prints a table per check and item, then the pass rate")
    run.add_argument("set", metavar="SET", help="a JSONL golden set, or @PROMPT[@VERSION|LABEL] for a prompt's own")
    run.add_argument("--prompt", help="NAME, NAME@VERSION or NAME@LABEL")
    run.add_argument("--model", help="a model or routing alias (with --prompt: instead of the prompt's)")
    run.add_argument("--concurrency", type=int)
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    client_flags(run)
    run.set_defaults(func=cmd_run)

    show = actions.add_parser("show", help="one run, with its items' results")
    show.add_argument("run", help="a run id (run_...)")
    client_flags(show)
    show.set_defaults(func=cmd_show)

    compare = actions.add_parser("compare", help="two runs paired item by item: regressions and significance")
    compare.add_argument("a", metavar="RUN_A")
    compare.add_argument("b", metavar="RUN_B")
    compare.add_argument("--alpha", type=float)
    client_flags(compare)
    compare.set_defaults(func=cmd_compare)
