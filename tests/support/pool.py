"""The gateway's PostgreSQL pool as a test reads it."""

from __future__ import annotations

import asyncio
from typing import Any


async def checked_out(pool: Any) -> int:
    """The pool's connections in use, the least of five looks 50 ms apart (one on its way back to the pool
    counts as neither in use nor available for a moment)."""
    seen = []
    for _ in range(5):
        stats = pool.get_stats()
        seen.append(stats.get("pool_size", 0) - stats.get("pool_available", 0))
        await asyncio.sleep(0.05)
    return min(seen)
