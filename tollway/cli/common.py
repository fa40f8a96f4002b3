"""What the CLI's commands share: settings from flags, the database (configured or embedded), one
connection for an action, and the audit flags of commands that change something."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
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
    return Settings(**overrides)


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The configured database, or the embedded one in the data directory (stopped again after use
    only if this command started it)."""
    if settings.database_url:
        yield settings.database_url
        return
    from tollway.local.embedded import EmbeddedPostgres

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    pg = EmbeddedPostgres(settings.data_dir / "postgres")
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
