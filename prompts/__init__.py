"""Git-versioned prompts: files in a per-tenant git repository (objects kept in PostgreSQL, written through
dulwich), versions, labels with traffic splits and rollback, the gate on ``production``, and an
in-memory registry that renders on the request path. Other parts import from here."""

if __name__ != "tollway.prompts":
    raise ImportError("This folder is Tollway's 'tollway.prompts' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'prompts'.")

from tollway.prompts.gate import Gate, GateResult
from tollway.prompts.git import GitServer
from tollway.prompts.labels import (
    PRODUCTION,
    Gated,
    GateRefused,
    Label,
    gate_move,
    labels_of,
    may_override,
    move_label,
    rollback,
)
from tollway.prompts.paths import check_name, check_path
from tollway.prompts.registry import Registry, Rendered
from tollway.prompts.render import RenderPool
from tollway.prompts.rollouts import list_prompt_rollouts, rollout_check, start_prompt_rollout
from tollway.prompts.spec import Prompt, PromptError, parse_prompt
from tollway.prompts.store import (
    StaleParent,
    Version,
    file_at,
    repair,
    submit,
    verify,
    version,
    versions_of,
)

__all__ = [
    "PRODUCTION",
    "Gate",
    "GateRefused",
    "GateResult",
    "Gated",
    "GitServer",
    "Label",
    "Prompt",
    "PromptError",
    "Registry",
    "RenderPool",
    "Rendered",
    "StaleParent",
    "Version",
    "check_name",
    "check_path",
    "file_at",
    "gate_move",
    "labels_of",
    "list_prompt_rollouts",
    "may_override",
    "move_label",
    "parse_prompt",
    "repair",
    "rollback",
    "rollout_check",
    "start_prompt_rollout",
    "submit",
    "verify",
    "version",
    "versions_of",
]
