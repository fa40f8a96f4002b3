"""`tollway rollouts ...` and `tollway content erase`: the live quality loop from a shell, straight against
the database (each change recorded in the change channel, whose notification reaches every replica)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from tollway.cli.common import audited, flag, run_with_conn, table
from tollway.settings import Settings


def cmd_set(args: argparse.Namespace) -> int:
    from tollway.config import parse_steps
    from tollway.routing import set_rollout

    async def action(conn: Any, settings: Settings) -> int:
        rollout = await set_rollout(conn, None, args.model, candidate=args.candidate, percent=args.percent,
                                    shadow_percent=args.shadow_percent, steps=parse_steps(args.steps),
                                    min_samples=args.min_samples, auto_rollback=args.auto_rollback,
                                    author=args.author, reason=args.reason)
        print(json.dumps(rollout.as_json(), indent=2))
        return 0

    return run_with_conn(args, action)


def cmd_list(args: argparse.Namespace) -> int:
    from tollway.routing import list_rollouts

    async def action(conn: Any, settings: Settings) -> int:
        rows = [r.as_json() for r in await list_rollouts(conn)]
        print(json.dumps(rows, indent=2) if args.json else table(
            rows, ["model", "candidate", "canary_percent", "shadow_percent", "steps", "step", "min_samples",
                   "auto_rollback", "state", "updated_at"]))
        return 0

    return run_with_conn(args, action)


def cmd_delete(args: argparse.Namespace) -> int:
    from tollway.routing import delete_rollout

    async def action(conn: Any, settings: Settings) -> int:
        rollout = await delete_rollout(conn, args.model, author=args.author, reason=args.reason)
        print(json.dumps({**rollout.as_json(), "deleted": True}, indent=2))
        return 0

    return run_with_conn(args, action)


def cmd_prompt(args: argparse.Namespace) -> int:
    from tollway.config import parse_steps
    from tollway.gateway.tenancy.keys import tenant_id
    from tollway.prompts import start_prompt_rollout

    async def action(conn: Any, settings: Settings) -> int:
        tid = await tenant_id(conn, args.tenant)
        if args.label == "production" and not args.skip_gate:
            print("tollway: a rollout of production runs the eval gate, which needs the gateway: use "
                  "POST /v1/admin/prompt-rollouts, or --skip-gate (recorded) to roll out ungated")
            return 2
        out = await start_prompt_rollout(conn, tid, args.tenant, args.prompt, args.label, args.version,
                                         parse_steps(args.steps), min_samples=args.min_samples, author=args.author,
                                         reason=args.reason or ("ungated rollout" if args.skip_gate else None))
        print(json.dumps(out, indent=2))
        return 0

    return run_with_conn(args, action)


def cmd_erase(args: argparse.Namespace) -> int:
    from tollway.gateway.quality.sampling import erase
    from tollway.gateway.tenancy.keys import tenant_id

    async def action(conn: Any, settings: Settings) -> int:
        tid = await tenant_id(conn, args.tenant)
        erased = await erase(conn, tid, args.user, author=args.author, subject=args.user or args.tenant,
                             reason=args.reason)
        print(json.dumps({"tenant": args.tenant, "user": args.user, "erased": erased}, indent=2))
        return 0

    return run_with_conn(args, action)


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    rollouts = sub.add_parser("rollouts", help="model canaries and shadows, prompt rollouts (changeable at run "
                              "time)").add_subparsers(dest="action", required=True)
    rset = rollouts.add_parser("set", help="create or change the rollout of MODEL")
    common(rset)
    rset.add_argument("model")
    rset.add_argument("--candidate", required=True, help="the model that stands in for MODEL")
    rset.add_argument("--percent", type=float, help="canary share of end users (default: the first step, or 0)")
    rset.add_argument("--shadow-percent", type=float, help="share of answers copied to the candidate, not returned")
    rset.add_argument("--steps", help="progressive canary steps, e.g. 5,20,50,100")
    rset.add_argument("--min-samples", type=int, help="scored samples a step needs before it moves on (200)")
    rset.add_argument("--auto-rollback", type=flag, help="on/off: a quality breach sets the canary to 0%% (on)")
    audited(rset)
    rset.set_defaults(func=cmd_set)
    rlist = rollouts.add_parser("list", help="model rollouts with their step and state")
    common(rlist)
    rlist.add_argument("--json", action="store_true")
    rlist.set_defaults(func=cmd_list)
    rdel = rollouts.add_parser("delete", help="end the rollout of MODEL")
    common(rdel)
    rdel.add_argument("model")
    audited(rdel)
    rdel.set_defaults(func=cmd_delete)
    rprompt = rollouts.add_parser("prompt", help="roll a prompt version out to a label in steps")
    common(rprompt)
    rprompt.add_argument("prompt")
    rprompt.add_argument("--tenant", required=True)
    rprompt.add_argument("--label", default="production")
    rprompt.add_argument("--version", required=True, help="the version to roll out")
    rprompt.add_argument("--steps", required=True, help="split percentages, e.g. 5,20,50,100")
    rprompt.add_argument("--min-samples", type=int, default=200)
    rprompt.add_argument("--skip-gate", action="store_true", help="roll production out without the eval gate")
    audited(rprompt)
    rprompt.set_defaults(func=cmd_prompt)

    content = sub.add_parser("content", help="stored prompts and answers (the content policy)").add_subparsers(
        dest="action", required=True)
    cerase = content.add_parser("erase", help="erase a tenant's (or one end user's) stored content")
    common(cerase)
    cerase.add_argument("--tenant", required=True)
    cerase.add_argument("--user", help="one end user's content only")
    audited(cerase)
    cerase.set_defaults(func=cmd_erase)
