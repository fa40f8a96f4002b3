"""A failure said in one line where its cause is outside the program (a store not reachable, a value that does not
fit its column, a file that cannot be read): what the CLI prints, and what `tollway serve` logs when it cannot
start, in place of a traceback."""

from __future__ import annotations

import sys


def one_line(exc: BaseException) -> str | None:
    """What to say when a command (or the gateway's start) could not reach PostgreSQL or Redis, a value did not fit
    its column, or a file it was given cannot be read as text (None: another error, raised as it is).
    Only the drivers a command already imported are asked."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # a driver's message is often a paragraph
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(exc, psycopg.DataError):  # a value out of its column's range
        return f"a value cannot be stored ({first})"
    if psycopg is not None and isinstance(exc, psycopg.OperationalError):
        return (f"cannot reach PostgreSQL ({first}); check TOLLWAY_DATABASE_URL, or --data-dir for the embedded "
                "one (`tollway doctor` checks every dependency)")
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError) and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, UnicodeDecodeError):
        return f"a file given is not UTF-8 text ({exc.reason} at byte {exc.start})"
    redis_errors = sys.modules.get("redis.exceptions")
    if redis_errors is not None and isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError):
        return (f"cannot reach Redis ({exc}); check TOLLWAY_REDIS_URL, or --data-dir for the embedded one "
                "(`tollway doctor` checks every dependency)")
    return None
