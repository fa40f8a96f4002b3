"""Rendering a tenant's template without letting it stall or starve anyone else.

A template is the tenant's code. Three bounds hold for every render:

- **Size.** ``BoundedSandbox`` (jinja2's sandbox) refuses a repetition (``*``, ``**``) or a ``range`` whose
  result would pass the limits, and the output is counted as it is produced; past ``MAX_OUTPUT`` characters
  the render stops with a 400.
- **Time.** A template whose work cannot be bounded by looking at it (loops, macros, calls, filters outside
  a short list) renders in a small process pool (``RenderPool``): a thread would still hold the event loop's
  GIL. The worker stops itself at ``time_limit_s`` (a timer signal raises inside the render) and runs under a
  memory limit; the gateway's event loop only awaits it. A plain template (variables, conditions, safe
  filters) renders in process when its output, at most its text plus each variable's size times its uses
  (``plain_bound``), is within the size limit, so its time is bounded too; a larger one goes to the pool.
- **YAML.** Prompt files are parsed with aliases refused (``NoAliasLoader``): a 423-byte alias bomb would
  otherwise expand to megabytes before any size check.

Every refusal is a ``PromptError`` (400, code ``prompt_render_limit``) naming the limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import operator
import signal
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import jinja2
import orjson
import yaml
from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment

MAX_OUTPUT = 256 * 1024  # characters of one render, all messages together
MAX_RANGE = 10_000  # items of one range()
MAX_REPEAT = 64 * 1024  # characters (or items) a repetition may produce
TIME_LIMIT_S = 0.5
WORKER_MEMORY = 1 << 30  # address space of a render worker, bytes

# Filters whose output is at most a small multiple of their input: a template that uses only these (and no
# loops, calls or repetition) is "plain" and renders in process.
PLAIN_FILTERS = frozenset({
    "upper", "lower", "title", "capitalize", "trim", "striptags", "escape", "e", "length", "count", "first",
    "last", "default", "d", "tojson", "string", "int", "float", "round", "abs", "join", "list", "sort",
    "unique", "reverse", "truncate", "wordcount", "safe", "min", "max", "sum", "urlencode", "forceescape",
    "items", "dictsort",
})
_PLAIN_SLACK = 8  # tojson and escape may grow a value several times


class RenderLimit(Exception):
    """A render passed one of its bounds (the message says which)."""


class RenderTimeout(RenderLimit):
    pass


class NoAliasLoader(yaml.SafeLoader):  # type: ignore[misc]
    """YAML without anchors' aliases: a prompt file has no use for them, and they make expansion bombs."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a prompt file",
                                              event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str | bytes) -> Any:
    return yaml.load(text, Loader=NoAliasLoader)


def _bounded_range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise RenderLimit(f"range() is limited to {MAX_RANGE} items")
    return rng


class BoundedSandbox(SandboxedEnvironment):
    """jinja2's sandbox with size bounds on repetition and ``range``."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
        self.globals["range"] = _bounded_range

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    if len(seq) * max(times, 0) > MAX_REPEAT:
                        raise RenderLimit(f"a repetition may produce at most {MAX_REPEAT} characters")
            return operator.mul(left, right)
        if isinstance(left, int | float) and isinstance(right, int | float):
            if abs(right) > 64 or (isinstance(left, int) and abs(left) > 2**32 and right > 1):
                raise RenderLimit("a power is limited to exponents of 64")
        return operator.pow(left, right)


ENV = BoundedSandbox()


def is_plain(template: nodes.Template) -> bool:
    """No loops, macros, calls or repetition, and only filters from ``PLAIN_FILTERS``."""
    for node in template.find_all((nodes.For, nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.Call,
                                   nodes.Mul, nodes.Pow, nodes.Include, nodes.Import, nodes.FromImport,
                                   nodes.Extends, nodes.Block, nodes.Assign, nodes.AssignBlock, nodes.With)):
        del node
        return False
    return all(f.name in PLAIN_FILTERS for f in template.find_all(nodes.Filter))


def uses(template: nodes.Template) -> dict[str, int]:
    """How many times the template reads each variable."""
    counts: dict[str, int] = {}
    for name in template.find_all(nodes.Name):
        if name.ctx == "load":
            counts[name.name] = counts.get(name.name, 0) + 1
    return counts


def plain_bound(source_len: int, counts: dict[str, int], variables: dict[str, Any]) -> int:
    """The most characters a plain template can produce with these variables."""
    total = source_len
    for name, times in counts.items():
        value = variables.get(name)
        size = len(value) if isinstance(value, str) else len(orjson.dumps(value, default=str))
        total += times * size * _PLAIN_SLACK
    return total


def render_bounded(template: jinja2.Template, variables: dict[str, Any], room: int) -> str:
    """One template's output, stopped once it passes ``room`` characters."""
    parts: list[str] = []
    size = 0
    for piece in template.generate(variables):
        size += len(piece)
        if size > room:
            raise RenderLimit(f"a rendered prompt is limited to {MAX_OUTPUT} characters")
        parts.append(piece)
    return "".join(parts)


def render_all(templates: Iterable[tuple[str, jinja2.Template]], variables: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    room = MAX_OUTPUT
    for role, template in templates:
        text = render_bounded(template, variables, room)
        room -= len(text)
        out.append({"role": role, "content": text})
    return out


# -- the worker side ------------------------------------------------------------------------------
@lru_cache(maxsize=512)
def _compiled(source: str) -> jinja2.Template:
    return ENV.from_string(source)


def _on_alarm(signum: int, frame: Any) -> None:
    raise RenderTimeout("a prompt render is limited in time")


def _worker_init(memory: int) -> None:
    import resource

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    except (ValueError, OSError):
        pass


def _ready() -> None:
    """A task that only makes the pool start a worker."""


def _render_in_worker(sources: tuple[tuple[str, str], ...], variables: dict[str, Any],
                      time_limit_s: float) -> list[dict[str, Any]] | str:
    """Runs in a pool process: the messages, or the reason the render failed (a str)."""
    signal.setitimer(signal.ITIMER_REAL, time_limit_s)
    try:
        return render_all([(role, _compiled(src)) for role, src in sources], variables)
    except RenderTimeout:
        return f"a prompt render is limited to {time_limit_s:g}s"
    except RenderLimit as exc:
        return str(exc)
    except MemoryError:
        return "a prompt render ran out of its memory"
    except jinja2.TemplateError as exc:
        return f"template error: {exc}"
    except Exception as exc:  # the template's own runtime errors (a bad index, a type error)
        return f"{type(exc).__name__}: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class RenderPool:
    """A few processes that render the templates whose time cannot be bounded by looking at them. Started
    on first use; built and closed by the composition root."""

    def __init__(self, workers: int = 2, time_limit_s: float = TIME_LIMIT_S, memory: int = WORKER_MEMORY) -> None:
        self.workers = workers
        self.time_limit_s = time_limit_s
        self.memory = memory
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        # One render in the pool per tenant at a time: a tenant's flood queues behind itself, and with two
        # or more workers another tenant always finds one free.
        self._owners: dict[object, tuple[asyncio.Lock, list[int]]] = {}  # owner -> (turn, [renders waiting])

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                initargs=(self.memory,))
            for _ in range(self.workers):  # start every worker now: a process starts in a few hundred ms
                self._pool.submit(_ready)
        return self._pool

    async def render(self, sources: tuple[tuple[str, str], ...], variables: dict[str, Any],
                     owner: object = None) -> list[dict[str, Any]]:
        """``owner`` (a tenant): whose renders take turns with each other."""
        lock, users = self._owners.setdefault(owner, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                return await self._render(sources, variables)
        finally:
            users[0] -= 1
            if not users[0]:
                del self._owners[owner]

    async def _render(self, sources: tuple[tuple[str, str], ...], variables: dict[str, Any]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        pool = self._executor()
        future = loop.run_in_executor(pool, _render_in_worker, sources, variables, self.time_limit_s)
        try:
            # The worker stops itself at the limit; this is the backstop for one that cannot (a C call).
            result = await asyncio.wait_for(future, self.time_limit_s + 5)
        except TimeoutError:
            self._reset(pool)
            raise RenderTimeout(f"a prompt render is limited to {self.time_limit_s:g}s") from None
        except concurrent.futures.process.BrokenProcessPool:
            self._reset(pool)
            raise RenderLimit("a prompt render ran out of its memory") from None
        if isinstance(result, str):
            raise RenderLimit(result)
        return result

    def _reset(self, pool: concurrent.futures.ProcessPoolExecutor) -> None:
        """A worker that will not stop is killed with its pool; the next render starts a fresh one."""
        if self._pool is pool:
            self._pool = None
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
