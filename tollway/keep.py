"""``KEEP``: a field a change does not give, so it keeps its value (``None`` would clear it). The API tells
the two apart by the fields a body sets; the CLI by the flags given."""

from __future__ import annotations


class Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP = Keep()
