"""The gate a move of a prompt's ``production`` label must pass: ``check(tenant, prompt, candidate,
current, actor) -> GateResult``, called with a timeout. The gateway supplies it
(``tollway.gateway.parts.evaluating.EvalGate``: the prompt's golden set run against both versions); without
one every move passes and the audit row says "no gate"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class GateResult:
    passed: bool
    summary: str
    report: dict[str, Any] = field(default_factory=dict)


class Gate(Protocol):
    async def check(self, tenant: str, prompt: str, candidate: str, current: str | None,
                    actor: Any = None) -> GateResult:
        """``actor``: who moves the label (the gateway's principal), whose requests the gate may make."""
        ...
