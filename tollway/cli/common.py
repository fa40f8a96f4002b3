"""What the CLI's commands share: settings from flags, the database (configured or embedded), one
connection for an action, and the audit flags of commands that change something."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from tollway.settings import Settings


def settings_of(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("config", "host", "port", "data_dir", "log_level", "workers"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "upstream", None):
        overrides["upstreams"] = [*Settings().upstreams, *args.upstream]
    settings = Settings(**overrides)
    _legacy_notice(settings, explicit="data_dir" in overrides or bool(os.environ.get("TOLLWAY_DATA_DIR")))
    return settings


def _legacy_notice(settings: Settings, *, explicit: bool) -> None:
    """Earlier versions kept the data directory in ./.tollway of wherever they were started."""
    legacy = Path(".tollway").resolve()
    if not explicit and legacy != settings.data_dir and (legacy / "postgres" / "PG_VERSION").exists():
        print(f"tollway: note: {legacy} holds a data directory from an earlier version; this command uses "
              f"{settings.data_dir}. To keep using the old one: --data-dir {legacy} (or TOLLWAY_DATA_DIR).",
              file=sys.stderr)


class NoStore(Exception):
    """A command that reads or changes a store found none where it looked (it never creates one)."""


@contextlib.contextmanager
def database(settings: Settings, *, create: bool = False, session: bool = True) -> Iterator[str]:
    """The configured database, or the embedded one in the data directory (stopped again after use
    only if this command started it). Only ``create`` commands (serve, migrate, tenants create) make an
    empty one; the others say where they looked and stop. ``session``: a command's own connection, which
    goes straight to PostgreSQL where it is behind a pooler (``TOLLWAY_DATABASE_DIRECT_URL``)."""
    if settings.database_url:
        yield (settings.session_database_url if session else None) or settings.database_url
        return
    from tollway.local.embedded import EmbeddedPostgres

    where = settings.data_dir / "postgres"
    if not create and not (where / "PG_VERSION").exists():
        raise NoStore(f"no Tollway database in {settings.data_dir} (the data directory: --data-dir or "
                      "TOLLWAY_DATA_DIR; or set TOLLWAY_DATABASE_URL). `tollway serve` creates one there.")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    pg = EmbeddedPostgres(where)
    url = pg.start()
    try:
        yield url
    finally:
        if pg.started_here:
            pg.stop()


async def with_conn(url: str, action: Any) -> Any:
    import psycopg

    from tollway.infra.db import migrate

    await migrate(url)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await action(conn)




def run_with_conn(args: argparse.Namespace, action: Callable[[Any, Settings], Awaitable[int]]) -> int:
    """``action(conn, settings)`` on one connection to the configured (or embedded) database."""
    settings = settings_of(args)
    with database(settings) as url:
        return int(asyncio.run(with_conn(url, lambda conn: action(conn, settings))))


def audited(parser: argparse.ArgumentParser) -> None:
    """Flags of a command that changes something: it is recorded in the change channel."""
    from tollway.infra.changes import default_author

    parser.add_argument("--author", default=default_author(),
                        help="who makes this change, for the audit log (default: OS user@host)")
    parser.add_argument("--reason", help="why, for the audit log")


def table(rows: list[dict[str, Any]], columns: Sequence[str], *, right: Collection[str] = (),
          cut: int | None = 40) -> str:
    """Rows as aligned plain-text columns (``right``: aligned right, for numbers); None shows as "-", lists
    comma-joined, cells cut at ``cut`` characters."""
    def cell(value: Any) -> str:
        text = "-" if value is None else ",".join(map(str, value)) if isinstance(value, list) else str(value)
        return text if cut is None else text[:cut]

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if c in right else v.ljust(w)
                         for v, w, c in zip(values, widths, columns, strict=True))

    return "\n".join([line(list(columns)), *(line(row) for row in cells)])


def flag(value: str) -> bool:
    """on/off (true/false, yes/no, 1/0) for a command-line flag."""
    if value.lower() in ("on", "true", "yes", "1"):
        return True
    if value.lower() in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError("use on or off")


class _Once(argparse._StoreAction):
    """A flag that takes one value: given twice, the command stops with an error instead of silently
    keeping the last one."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        seen = namespace.__dict__.setdefault("_given", set())
        if option_string is not None and self.dest in seen:
            parser.error(f"{option_string} was given twice: give it once")
        seen.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
    """The CLI's parser (and its subcommands'): single-value flags refuse repeats; list flags accumulate
    (``action="extend"`` or ``"append"``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _Once)
        self.register("action", "store", _Once)
