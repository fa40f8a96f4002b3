"""Names and paths in a tenant's prompt repository: one check for the API, the CLI and ``git push``.

A repository is flat: every entry is a regular file at the top of the tree whose name starts with a letter
or digit and holds only ``A-Za-z0-9_.-`` (so no ``..``, ``.git``, absolute paths, folders, NUL bytes,
newlines or markup), at most ``MAX_PATH`` bytes; a prompt is ``<name>.yaml`` where ``<name>`` matches
``NAME_PATTERN``. Anything else is refused when it is submitted, naming the entry, so every clone keeps
working. A repository that already holds bad entries (from before this check) is mended by
``tollway prompts repair`` (or ``POST /v1/prompts/repair`` with an admin key): a commit on main that keeps
the valid entries and drops the others, recorded in the change channel.
"""

from __future__ import annotations

import re

from tollway.prompts.spec import NAME_PATTERN, PromptError

MAX_PATH = 100
MAX_FILES = 1000
MAX_FILE_BYTES = 1 << 20
_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NAME = re.compile(NAME_PATTERN)
FILE_MODES = frozenset({0o100644, 0o100755})


def shown(raw: str | bytes) -> str:
    """An entry as a message may quote it: escaped, bounded."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    return ascii(text[:80])[1:-1] + ("..." if len(text) > 80 else "")


def path_problem(raw: str | bytes, mode: int = 0o100644) -> str | None:
    """Why this tree entry may not be in a prompt repository, or None when it may."""
    if isinstance(raw, bytes):
        try:
            path = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "a file name must be UTF-8"
    else:
        path = raw
    if mode not in FILE_MODES:
        return "prompts live at the top of the repository: no folders, links or submodules"
    if not path:
        return "a file needs a name"
    if len(path.encode()) > MAX_PATH:
        return f"a file name is at most {MAX_PATH} bytes"
    if "/" in path or "\\" in path:
        return "prompts live at the top of the repository: no folders"
    if not _PATH.fullmatch(path):
        return "a file name starts with a letter or digit and holds only letters, digits, '_', '.' and '-'"
    if path.endswith(".yaml") and not _NAME.fullmatch(path.removesuffix(".yaml")):
        return "a prompt name is 1-64 characters: letters, digits, '_', '.', '-', starting with a letter or digit"
    return None


def check_path(raw: str | bytes, mode: int = 0o100644, *, param: str = "files") -> None:
    problem = path_problem(raw, mode)
    if problem is not None:
        raise PromptError(f"'{shown(raw)}': {problem}", param=param, code="invalid_path")


def check_name(name: str) -> None:
    """A prompt's name, as the API's path and a request's ``prompt.name`` give it."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PromptError(f"'{shown(str(name))}' is not a valid prompt name: 1-64 characters, letters, digits, "
                          "'_', '.', '-', starting with a letter or digit.", param="name", code="invalid_name")


def check_tree(entries: list[tuple[bytes, int, int]]) -> None:
    """Every entry of a commit's tree: (path, mode, size)."""
    if len(entries) > MAX_FILES:
        raise PromptError(f"a prompt repository holds at most {MAX_FILES} files", param="files")
    for path, mode, size in entries:
        check_path(path, mode)
        if size > MAX_FILE_BYTES:
            raise PromptError(f"'{shown(path)}': a file is at most {MAX_FILE_BYTES >> 10} KiB", param="files")
