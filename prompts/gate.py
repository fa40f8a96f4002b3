"""The gate a move of a prompt's ``production`` label must pass: ``check(tenant, prompt, candidate,
current) -> GateResult``, called with a timeout. The evals issue supplies the real one (the prompt's
golden set run against both versions); until then there is none, every move passes, and the audit row
says "no gate"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class GateResult:
    passed: bool
    summary: str
    report: dict[str, Any] = field(default_factory=dict)


class Gate(Protocol):
    async def check(self, tenant: str, prompt: str, candidate: str, current: str | None) -> GateResult: ...
