"""`tollway tenants guards`: a tenant's guard policy from a shell, straight against the database.

Flags change the stored policy one validator or setting at a time (``--output pii=redact`` leaves the
other validators as they are; ``--output pii=off`` switches off what the config's defaults turn on);
``--clear`` removes the policy. Every running gateway applies the change before its next request (the
change channel's notification).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tollway.cli.common import audited, run_with_conn
from tollway.errors import InvalidRequest
from tollway.settings import Settings


def _pair(value: str) -> tuple[str, str]:
    name, sep, action = value.partition("=")
    if not sep or not name or not action:
        raise argparse.ArgumentTypeError("use VALIDATOR=ACTION, e.g. pii=redact")
    return name.strip(), action.strip()


def _topic(value: str) -> tuple[str, list[str]]:
    name, sep, words = value.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError("use NAME=word,phrase,... (an empty list removes the topic)")
    return name.strip(), [w.strip() for w in words.split(",") if w.strip()]


def _list(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError("on or off")
    return value == "on"


def edited(current: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The stored policy with the command's changes (repeated flags add up; one validator given two
    different actions is refused)."""
    policy: dict[str, Any] = json.loads(json.dumps(current))
    for side in ("input", "output"):
        given: dict[str, str] = {}
        for name, action in getattr(args, side) or []:
            if given.setdefault(name, action) != action:
                raise InvalidRequest(f"--{side} gives '{name}' two actions ({given[name]}, {action}): give one",
                                     param=side)
            policy.setdefault(side, {})[name] = action
    for field in ("terms", "competitors"):
        value = getattr(args, field)
        if value is not None:
            policy[field] = value
    for name, words in args.topic or []:
        topics = policy.setdefault("topics", {})
        if words:
            topics[name] = words
        else:
            topics.pop(name, None)
    for field in ("max_input_chars", "max_output_chars", "injection_threshold", "injection_model", "fallback_message"):
        value = getattr(args, field)
        if value is not None:
            policy[field] = value
    for field in args.unset or []:
        policy.pop(field, None)
    return policy


def cmd_guards(args: argparse.Namespace) -> int:
    from tollway.gateway.tenancy.policy import get_guards, set_guards
    from tollway.guardrails import PolicyError, parse_config, resolve
    from tollway.routing import ConfigError, load_config

    async def action(conn: Any, settings: Settings) -> int:
        try:
            config = parse_config(load_config(settings.config).guardrails)
        except PolicyError as exc:
            raise ConfigError(f"{settings.config}: {exc}") from None
        current = await get_guards(conn, args.tenant)
        changing = any(getattr(args, f) for f in ("input", "output", "topic", "unset")) or any(
            getattr(args, f) is not None for f in ("terms", "competitors", "max_input_chars", "max_output_chars",
                                                   "injection_threshold", "injection_model", "fallback_message"))
        if args.clear:
            current = await set_guards(conn, args.tenant, None, author=args.author, reason=args.reason)
        elif changing:
            base = {} if current is None else current.model_dump(exclude_none=True)
            current = await set_guards(conn, args.tenant, edited(base, args), extra=frozenset(config.validators),
                                       author=args.author, reason=args.reason)
        effective = resolve(config, current)
        print(json.dumps({"tenant": args.tenant,
                          "policy": None if current is None else current.model_dump(exclude_none=True),
                          "effective": {"input": effective.input, "output": effective.output}}, indent=2))
        return 0

    return run_with_conn(args, action)


def add_commands(common: Any, tenants: Any) -> None:
    guards = tenants.add_parser(
        "guards", help="a tenant's guard policy: validators on input and output, and what a failure does",
        description="Without changes, print the tenant's guard policy and the one its requests run under. "
                    "Validators: pii, secrets, terms, json, injection, length, leak, tool_injection, "
                    "passage_injection, and any the config adds. Actions: redact, block, fallback, log, off "
                    "(passage_injection: drop, log, off).")
    common(guards)
    guards.add_argument("--tenant", required=True)
    guards.add_argument("--input", nargs="+", action="extend", type=_pair, metavar="VALIDATOR=ACTION",
                        help="input guards, e.g. injection=block pii=redact")
    guards.add_argument("--output", nargs="+", action="extend", type=_pair, metavar="VALIDATOR=ACTION",
                        help="output guards, e.g. pii=redact secrets=block json=block")
    guards.add_argument("--terms", type=_list, help="restricted terms, comma-separated ('' for none)")
    guards.add_argument("--competitors", type=_list, help="competitor names, comma-separated ('' for none)")
    guards.add_argument("--topic", nargs="+", action="extend", type=_topic, metavar="NAME=WORDS",
                        help="a restricted topic and the words that signal it: medical=diagnosis,prescription")
    guards.add_argument("--max-input-chars", type=int)
    guards.add_argument("--max-output-chars", type=int)
    guards.add_argument("--injection-threshold", type=float, help="score at which injection fails (default 0.8)")
    guards.add_argument("--injection-model", type=_on_off, metavar="on|off",
                        help="the learned injection detector beside the rules (default off; docs: guardrails)")
    guards.add_argument("--fallback-message", help="the safe answer a 'fallback' action gives")
    guards.add_argument("--unset", nargs="+", action="extend", metavar="FIELD", help="remove settings (input, output, terms, ...)")
    guards.add_argument("--clear", action="store_true", help="remove the tenant's guard policy")
    audited(guards)
    guards.set_defaults(func=cmd_guards)
