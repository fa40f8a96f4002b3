"""``/v1/moderations`` answered by the guard engine: OpenAI's shape, Tollway's detectors.

OpenAI's fixed categories (harassment, hate, self-harm, sexual, violence, illicit and their subcategories)
are always present, ``false`` with score 0: Tollway has no detector for them. Tollway's own categories are
extra fields beside them: ``injection`` (the score of the prompt-injection rules, capped at 1), ``pii``,
``secrets`` and, where the tenant's policy lists them, ``terms`` (1 when a span was found). ``flagged`` is
what the tenant's input policy would do to the text as a chat message: true when it would refuse it (block)
or answer it with its fallback; a tenant without an input policy is never flagged, whatever the categories
say. Pure: the gateway's moderations path (``tollway.gateway.chat.moderations``) calls it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tollway.guardrails.detectors import PII, finders, spans_of
from tollway.guardrails.engine import Extra, Outcome, check_input, span_finders
from tollway.guardrails.fold import fold
from tollway.guardrails.injection import THRESHOLD, score
from tollway.guardrails.policy import Resolved

OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
                     "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
                     "sexual/minors", "violence", "violence/graphic")
TOLLWAY_CATEGORIES = ("injection", "pii", "secrets", "terms")


@dataclass(frozen=True, slots=True)
class Moderation:
    flagged: bool
    categories: dict[str, bool]
    scores: dict[str, float]
    outcomes: list[Outcome] = field(default_factory=list)  # the input policy's, as a chat request records them

    def result(self) -> dict[str, object]:
        """One entry of the response's ``results``."""
        applied = {name: ["text"] if name in TOLLWAY_CATEGORIES else [] for name in self.categories}
        return {"flagged": self.flagged, "categories": self.categories, "category_scores": self.scores,
                "category_applied_input_types": applied}


def moderate(policy: Resolved | None, text: str, extras: Mapping[str, Extra] | None = None) -> Moderation:
    categories = dict.fromkeys(OPENAI_CATEGORIES, False)
    scores = dict.fromkeys(OPENAI_CATEGORIES, 0.0)
    verdict = score(text, learned=policy is not None and policy.injection_model)
    threshold = policy.injection_threshold if policy is not None else THRESHOLD
    categories["injection"] = verdict.blocked(threshold)
    scores["injection"] = min(verdict.score, 1.0)
    kinds = policy.pii_kinds if policy is not None else PII
    folded = fold(text)  # once, for every span detector below
    for name, found in (("pii", spans_of(text, finders(kinds), folded)),
                        ("secrets", spans_of(text, finders(("secret",)), folded))):
        categories[name], scores[name] = bool(found), 1.0 if found else 0.0
    if policy is not None and (policy.terms or policy.competitors or policy.topics):
        found = spans_of(text, span_finders(policy, {"terms": "log"}), folded)
        categories["terms"], scores["terms"] = bool(found), 1.0 if found else 0.0
    if policy is None or not policy.input:
        return Moderation(False, categories, scores)
    checked = check_input(policy, [text], extras or {})
    return Moderation(checked.stop is not None, categories, scores, checked.outcomes)

