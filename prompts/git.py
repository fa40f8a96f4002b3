"""`git clone` and `git push` against ``/v1/prompts.git``: git's smart HTTP protocol, served by dulwich's
WSGI server (in a thread, through a2wsgi) over an in-memory repository built from the tenant's objects in
PostgreSQL for each request. The gateway mounts it (``tollway.gateway.http.routes.prompts_git``)
behind its authentication: each request on its own tenant's repository.

A push is checked like an API submission before anything is stored: only ``main``, a fast-forward of the
current head, prompts at the top of the tree, every changed prompt parsing with its golden set. A bad
push is refused with git's own ``! [remote rejected]`` line naming the file and the problem, and nothing
changes; a good one lands in one transaction and reaches every replica through the change channel.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from a2wsgi.wsgi import WSGIResponder
from dulwich.errors import HookError
from dulwich.objects import Commit, Tree
from dulwich.repo import MemoryRepo
from dulwich.server import DictBackend
from dulwich.web import HTTPGitApplication
from psycopg_pool import AsyncConnectionPool
from starlette.types import Receive, Scope, Send

from tollway.errors import TollwayError
from tollway.prompts.packs import pack_refusal, refusal_report
from tollway.prompts.paths import FILE_MODES, check_tree
from tollway.prompts.spec import PromptError
from tollway.prompts.store import MAIN, blob_text, land_push, load_objects, memory_repo, tree_files
from tollway.prompts.store import check_files as check_prompt_files

log = logging.getLogger("tollway.git")
ZERO = b"0" * 40


class _UpdateHook:
    """dulwich's ``update`` hook: runs in the WSGI thread, lands the push on the event loop."""

    def __init__(self, repo: MemoryRepo, land: Callable[[bytes | None, bytes], Coroutine[Any, Any, None]],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.repo, self.land, self.loop = repo, land, loop

    def execute(self, ref: bytes, old: bytes, new: bytes) -> tuple[bytes, bytes]:
        if ref != MAIN:
            raise HookError(f"only refs/heads/main is kept (not {ref.decode()})")
        if new == ZERO:
            raise HookError("main cannot be deleted")
        try:
            check_push(self.repo, None if old == ZERO else old, new)
            asyncio.run_coroutine_threadsafe(self.land(None if old == ZERO else old, new), self.loop).result(60)
        except (PromptError, TollwayError) as exc:
            raise HookError(exc.message) from exc
        except Exception as exc:  # never a traceback to git: its rejected line, and the log
            log.exception("push to %s failed unexpectedly", ref.decode(errors="replace"))
            raise HookError("the push could not be checked; the gateway's log has the reason") from exc
        return b"", b""


def _size(repo: MemoryRepo, sha: bytes, mode: int) -> int:
    obj = repo.object_store[sha] if mode in FILE_MODES else None  # type: ignore[index]
    return len(obj.as_raw_string()) if obj is not None else 0


def check_push(repo: MemoryRepo, old: bytes | None, new: bytes) -> None:
    """Linear history on top of ``old``, prompts at the top level, every changed prompt valid."""
    sha: bytes | None = new
    while sha is not None and sha != old:
        commit = repo.object_store[sha]  # type: ignore[index]
        assert isinstance(commit, Commit)
        if len(commit.parents) > 1:
            raise PromptError("merge commits are not kept: rebase onto main and push again")
        tree = repo.object_store[commit.tree]
        assert isinstance(tree, Tree)
        check_tree([(entry.path, entry.mode, _size(repo, entry.sha, entry.mode)) for entry in tree.iteritems()])
        blobs = tree_files(repo, commit.id)
        files = {path: blob_text(repo, blob) for path, blob in blobs.items()}
        before = tree_files(repo, commit.parents[0]) if commit.parents else {}
        changed = [p for p, blob in blobs.items() if before.get(p) != blob]
        check_prompt_files(files, changed)
        sha = commit.parents[0] if commit.parents else None
    if sha != old:
        raise PromptError("the push does not build on the current main: fetch first")


def _answer_whole(app: Any) -> Any:
    """WSGI around dulwich's git services: the answer (a push's status report, a clone's pack, which dulwich
    writes through start_response's write()) is produced whole before anything is sent, so a request dulwich
    cannot parse becomes a 400 instead of a 200 that breaks off mid-answer. Prompt repositories are small (at
    most 1,000 files of 1 MiB at the head, pushes of at most TOLLWAY_MAX_BODY_BYTES)."""

    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        if not environ.get("PATH_INFO", "").endswith(("git-receive-pack", "git-upload-pack")):
            return app(environ, start_response)
        started: list[Any] = []
        written: list[bytes] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            started[:] = [status, headers]
            return written.append

        try:
            for chunk in app(environ, capture):  # in the order produced, write() calls included
                written.append(chunk)
        except Exception as exc:
            log.warning("a git request could not be read (%s: %s)", type(exc).__name__, exc)
            start_response("400 Bad Request", [("content-type", "text/plain")])
            return [b"malformed git request\n"]
        start_response(*started)
        return written

    return wrapped


class GitServer:
    """One tenant's prompt repository over git's smart HTTP, for one request at a time."""

    def __init__(self, pool: AsyncConnectionPool, on_landed: Callable[[int], Awaitable[None]]) -> None:
        self.pool = pool
        self.on_landed = on_landed  # reload this process's registry at once
        self.executor = ThreadPoolExecutor(thread_name_prefix="git", max_workers=4)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def serve(self, scope: Scope, receive: Receive, send: Send, *, prefix: str, tenant_id: int,
                    author: str) -> None:
        """Serve one git request under ``prefix`` on ``tenant_id``'s repository; a push lands as ``author``."""
        async with self.pool.connection() as conn:
            head, objects = await load_objects(conn, tenant_id)
        repo = memory_repo(head, objects)
        loop = asyncio.get_running_loop()

        async def land(old: bytes | None, new: bytes) -> None:
            async with self.pool.connection() as conn:
                await land_push(conn, tenant_id, repo, old, new, author)
            await self.on_landed(tenant_id)

        repo.hooks["update"] = _UpdateHook(repo, land, loop)  # type: ignore[assignment]
        app = _answer_whole(HTTPGitApplication(DictBackend({"/": repo})))  # type: ignore[arg-type]
        inner = dict(scope, path=scope["path"][len(prefix):] or "/", root_path=prefix)
        inner.pop("raw_path", None)
        # The ASGI server has already undone git's chunked transfer encoding (a push over 1 MiB is sent
        # chunked), and the body limit counted the result: dulwich must not de-chunk it a second time.
        inner["headers"] = [(k, v) for k, v in scope["headers"] if k != b"transfer-encoding"]
        service = inner["path"].rsplit("/", 1)[-1]
        if scope.get("method") == "POST" and service in ("git-receive-pack", "git-upload-pack"):
            body = await _whole_body(receive)  # at most TOLLWAY_MAX_BODY_BYTES: the body limit counted it
            encoding = next((v.strip().lower() for k, v in scope["headers"] if k == b"content-encoding"), b"identity")
            if encoding not in (b"", b"identity"):
                # git gzips a fetch's negotiation once it passes 1 KiB (hundreds of local commits); a push never
                if (refusal := _encoding_refusal(service, encoding)) is not None:
                    await _answer(send, 415, b"text/plain", refusal.encode() + b"\n")
                    return
                inflated = _inflated(body)
                if inflated is None:
                    await _answer(send, 413, b"text/plain",
                                  f"the request is not gzip, or inflates past {MAX_INFLATED_REQUEST >> 20} MiB\n".encode())
                    return
                body = inflated
            if service == "git-receive-pack" and (why := pack_refusal(body)) is not None:
                # nothing unpacked: git prints the reason on each ref
                log.info("push refused before unpacking: %s", why)
                await _answer(send, 200, b"application/x-git-receive-pack-result", refusal_report(body, why))
                return
            inner["headers"] = [(k, v) for k, v in inner["headers"] if k not in (b"content-encoding", b"content-length")]
            inner["headers"].append((b"content-length", str(len(body)).encode()))
            receive = _replayed(body)
        responder: Any = WSGIResponder(app, self.executor, 10)
        await responder(inner, receive, send)


async def _whole_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _replayed(body: bytes) -> Receive:
    """The body read once, handed to the WSGI app as if it came now."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


MAX_INFLATED_REQUEST = 4 << 20  # a fetch's negotiation: about 80,000 "have" lines


def _encoding_refusal(service: str, encoding: bytes) -> str | None:
    if service == "git-receive-pack":
        return "a push's body is sent as it is (no content-encoding)"
    if encoding != b"gzip":
        return f"content-encoding {encoding.decode(errors='replace')} is not served (gzip is)"
    return None


def _inflated(body: bytes) -> bytes | None:
    """A gzip body inflated, or None past ``MAX_INFLATED_REQUEST`` (or not gzip at all)."""
    stream = zlib.decompressobj(wbits=31)
    try:
        out = stream.decompress(body, MAX_INFLATED_REQUEST + 1)
    except zlib.error:
        return None
    return None if len(out) > MAX_INFLATED_REQUEST or stream.unconsumed_tail else out


async def _answer(send: Send, status: int, content_type: bytes, body: bytes) -> None:
    """A whole answer of the gateway's own, for a request that never reaches dulwich."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"cache-control", b"no-cache")]})
    await send({"type": "http.response.body", "body": body})
