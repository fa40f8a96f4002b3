"""Who may write what: the ledger row only through the tally (``tollway.gateway.metering``), the chat
exchange only in the chat stages, an embeddings request only in its stages. Parts get frozen views and
hand back verdicts (``tollway.gateway.chat.exchange``); this test fails when any other module assigns one
of these objects' fields, assigns into them, or calls a mutating method on them."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from tollway.gateway.chat.embeddings import Embedding
from tollway.gateway.chat.exchange import Exchange
from tollway.gateway.metering.ledger import LedgerRow

ROOT = Path(__file__).resolve().parents[3]
SOURCES = ("gateway", "tollway", "routing", "retrieval", "guardrails", "prompts", "evals")
MUTATORS = frozenset({"append", "extend", "insert", "pop", "remove", "clear", "update", "setdefault", "sort",
                      "add", "discard", "popitem"})
# what is owned: its fields, the names a value of it goes by, the files that may write it
OWNED = (
    ("the ledger row", {f.name for f in dataclasses.fields(LedgerRow)}, {"row"},
     {"gateway/metering/accounting.py", "gateway/metering/ledger.py"}),
    ("the chat exchange", {f.name for f in dataclasses.fields(Exchange)}, {"ex", "exchange"},
     {"gateway/chat/stages.py", "gateway/chat/exchange.py"}),
    ("the embeddings request", {f.name for f in dataclasses.fields(Embedding)}, {"em"},
     {"gateway/chat/embeddings.py"}),
)


def _owned_field(node: ast.expr) -> tuple[str, str] | None:
    """(what, field) when ``node`` is ``<name>.<field>`` (or ``<...>.<name>.<field>``) of an owned object."""
    if not isinstance(node, ast.Attribute):
        return None
    base = node.value
    name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
    for what, fields, names, _ in OWNED:
        if name in names and node.attr in fields:
            return what, node.attr
    return None


def _written(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, what, field) for every write into an owned object's field in ``tree``."""
    out = []

    def target(t: ast.expr, line: int) -> None:
        if isinstance(t, ast.Tuple | ast.List):
            for e in t.elts:
                target(e, line)
            return
        if isinstance(t, ast.Subscript):  # ex.messages[i] = ...
            t = t.value
        if (hit := _owned_field(t)) is not None:
            out.append((line, *hit))

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                target(t, node.lineno)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            target(node.target, node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            if (hit := _owned_field(node.func.value)) is not None:
                out.append((node.lineno, *hit))
    return sorted(out)


def writes_outside_owners() -> list[str]:
    wrong = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for line, what, field in _written(ast.parse(path.read_text(), rel)):
                owners = next(o for w, _, _, o in OWNED if w == what)
                if rel not in owners:
                    wrong.append(f"{rel}:{line} writes {what}'s '{field}' (only {', '.join(sorted(owners))} may)")
    return wrong


def test_only_the_owners_write_the_ledger_row_and_the_exchanges() -> None:
    wrong = writes_outside_owners()
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_each_kind_of_write() -> None:
    probe = ast.parse(
        "ex.tally.row.model = 'x'\n"
        "row.route_reason, row.degraded = 'r', True\n"
        "ex.messages[0] = {}\n"
        "ex.guards += ()\n"
        "ex.filters.append(f)\n"
        "em.answer = {}\n"
        "ex.tally.row.tags.append('t')\n"
        "view.messages = ()\n"  # not an owned object
        "ex.unrelated = 1\n")  # not one of its fields
    assert [(line, field) for line, _, field in _written(probe)] == [
        (1, "model"), (2, "degraded"), (2, "route_reason"), (3, "messages"), (4, "guards"), (5, "filters"),
        (6, "answer"), (7, "tags")]
