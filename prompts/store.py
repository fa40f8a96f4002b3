"""The prompt repository of each tenant, kept in PostgreSQL as git objects, written through dulwich.

Why PostgreSQL holds the objects: every replica must serve the same versions and accept writes, and
dulwich has no shared object store; PostgreSQL is already the store every replica shares. So the git
objects (made by dulwich, byte for byte what git stores), the head of ``main``, one row per prompt
version and the labels are rows; a replica serves ``git clone`` from an in-memory repository built from
them and renders from what it loaded (``registry``), reloading a tenant when the change channel says so.

Writes take the tenant's head row ``FOR UPDATE``: concurrent submissions queue instead of racing, so
none is lost. An API submission names the version it was based on (``parent``): if the prompt changed
since, it is refused (409, as git refuses a non-fast-forward push); if only other files changed, it is
rebased onto the current head. A git push must be based on the current head (else git's own "fetch
first" refusal).
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from dulwich.objects import Blob, Commit, ObjectID, ShaFile, Tree
from dulwich.refs import Ref
from dulwich.repo import MemoryRepo

from tollway.errors import NotFound, TollwayError
from tollway.infra import changes
from tollway.prompts.paths import check_name, check_path, check_tree, path_problem
from tollway.prompts.spec import PromptError, check_golden_set, parse_prompt

MAIN = Ref(b"refs/heads/main")
SUFFIX = ".yaml"


class StaleParent(TollwayError):
    status = 409
    type = "invalid_request_error"
    code = "stale_parent"


@dataclass(frozen=True, slots=True)
class Version:
    name: str
    version: str
    message: str
    author: str
    created_at: str
    content: str

    def diff(self, other: Version) -> str:
        """A unified diff from this version to ``other`` (API and CLI show the same)."""
        return "".join(difflib.unified_diff(self.content.splitlines(keepends=True),
                                            other.content.splitlines(keepends=True),
                                            fromfile=f"{self.name}@{self.version[:12]}",
                                            tofile=f"{other.name}@{other.version[:12]}"))

    def as_json(self, *, content: bool = False) -> dict[str, Any]:
        out = {"name": self.name, "version": self.version, "message": self.message, "author": self.author,
               "created_at": self.created_at}
        if content:
            out["content"] = self.content
        return out


def prompt_name(path: str) -> str | None:
    """``greet.yaml`` -> ``greet``; other files (golden sets, READMEs) are not prompts."""
    return path.removesuffix(SUFFIX) if path.endswith(SUFFIX) and "/" not in path else None


# -- objects ------------------------------------------------------------------------------------
async def load_objects(conn: psycopg.AsyncConnection[Any], tenant_id: int) -> tuple[bytes | None, list[ShaFile]]:
    """The tenant's head and every object of its repository."""
    cur = await conn.execute("SELECT head FROM prompt_heads WHERE tenant_id = %s", (tenant_id,))
    row = await cur.fetchone()
    cur = await conn.execute("SELECT type_num, data FROM prompt_objects WHERE tenant_id = %s", (tenant_id,))
    objects = [ShaFile.from_raw_string(t, bytes(d)) for t, d in await cur.fetchall()]
    return (row[0].encode() if row else None), objects


async def load_head_tree(conn: psycopg.AsyncConnection[Any], tenant_id: int, head: bytes | None) -> list[ShaFile]:
    """Only what a new commit on ``head`` needs: the head commit, its tree and the tree's files."""
    if head is None:
        return []
    out: list[ShaFile] = []
    wanted = [head.decode()]
    for _ in range(3):  # commit -> tree -> blobs
        cur = await conn.execute("SELECT type_num, data FROM prompt_objects WHERE tenant_id = %s AND sha = ANY(%s)",
                                 (tenant_id, wanted))
        found = [ShaFile.from_raw_string(t, bytes(d)) for t, d in await cur.fetchall()]
        out += found
        wanted = []
        for obj in found:
            if isinstance(obj, Commit):
                wanted.append(obj.tree.decode())
            elif isinstance(obj, Tree):
                wanted += [entry.sha.decode() for entry in obj.iteritems()]
        if not wanted:
            break
    return out


def memory_repo(head: bytes | None, objects: Iterable[ShaFile]) -> MemoryRepo:
    repo = MemoryRepo()
    for obj in objects:
        repo.object_store.add_object(obj)
    if head is not None:
        repo.refs[MAIN] = ObjectID(head)
    repo.refs.set_symbolic_ref(Ref(b"HEAD"), MAIN)
    return repo


def tree_files(repo: MemoryRepo, commit_sha: bytes | None) -> dict[str, bytes]:
    """path -> blob sha of a commit's (flat) tree."""
    if commit_sha is None:
        return {}
    commit = repo.object_store[ObjectID(commit_sha)]
    assert isinstance(commit, Commit)
    tree = repo.object_store[commit.tree]
    assert isinstance(tree, Tree)
    # surrogateescape: a repository from before the path check may hold a name that is not UTF-8 (repair)
    return {entry.path.decode("utf-8", "surrogateescape"): entry.sha for entry in tree.iteritems()}


def blob_text(repo: MemoryRepo, sha: bytes) -> bytes:
    blob = repo.object_store[ObjectID(sha)]
    assert isinstance(blob, Blob)
    return blob.data


async def file_at(conn: psycopg.AsyncConnection[Any], tenant_id: int, commit: str, path: str) -> bytes | None:
    """One file of the tree of ``commit`` (a prompt version), or None if it has no such file."""
    objects = await load_head_tree(conn, tenant_id, commit.encode())
    repo = memory_repo(None, objects)
    sha = tree_files(repo, commit.encode()).get(path) if objects else None
    return None if sha is None else blob_text(repo, sha)


def check_files(files: Mapping[str, bytes], changed: Iterable[str]) -> None:
    """Every changed prompt parses and compiles, and the golden set it names is in the tree and well formed.
    Raises PromptError naming the file and the problem."""
    for path in changed:
        name = prompt_name(path)
        if name is None:
            continue
        prompt = parse_prompt(name, "new", files[path])
        golden = prompt.raw.golden_set
        if golden is not None:
            if golden not in files:
                raise PromptError(f"{path}: golden_set {golden} is not in the repository", param="golden_set")
            check_golden_set(golden, files[golden])


async def verify(conn: psycopg.AsyncConnection[Any], tenant_id: int) -> list[str]:
    """What is wrong with a tenant's repository (empty: nothing): objects that do not parse, the head's
    history missing objects, versions whose file does not parse."""
    problems: list[str] = []
    cur = await conn.execute("SELECT head FROM prompt_heads WHERE tenant_id = %s", (tenant_id,))
    row = await cur.fetchone()
    try:
        head, objects = await load_objects(conn, tenant_id)
    except Exception as exc:  # an object that does not parse
        return [f"tenant {tenant_id}: unreadable object ({type(exc).__name__}: {exc})"]
    repo = memory_repo(head if row and row[0] else None, objects)
    sha = head if row and row[0] else None
    while sha is not None:
        try:
            commit = repo.object_store[ObjectID(sha)]
            assert isinstance(commit, Commit)
            for blob in tree_files(repo, commit.id).values():
                blob_text(repo, blob)
        except (KeyError, AssertionError):
            problems.append(f"tenant {tenant_id}: commit {sha.decode()[:12]} or its files are missing")
            break
        sha = commit.parents[0] if commit.parents else None
    cur = await conn.execute("SELECT name, version, content FROM prompt_versions WHERE tenant_id = %s", (tenant_id,))
    for name, ver, content in await cur.fetchall():
        try:
            parse_prompt(name, ver, content)
        except PromptError as exc:
            problems.append(f"tenant {tenant_id}: {name}@{ver[:12]}: {exc.message}")
    return problems


# -- writing --------------------------------------------------------------------------------------
async def _lock_head(conn: psycopg.AsyncConnection[Any], tenant_id: int) -> bytes | None:
    await conn.execute("INSERT INTO prompt_heads (tenant_id, head) VALUES (%s, '') ON CONFLICT DO NOTHING",
                       (tenant_id,))
    cur = await conn.execute("SELECT head FROM prompt_heads WHERE tenant_id = %s FOR UPDATE", (tenant_id,))
    row = await cur.fetchone()
    assert row is not None
    return row[0].encode() or None


async def _land(conn: psycopg.AsyncConnection[Any], tenant_id: int, repo: MemoryRepo, old: bytes | None,
                new: bytes, author: str) -> list[Version]:
    """Store the objects reachable from ``new`` but not ``old``, one version row per prompt each new commit
    changed, move the head, and announce it on the change channel. The caller holds the head lock."""
    chain: list[Commit] = []
    sha: bytes | None = new
    while sha is not None and sha != old:
        commit = repo.object_store[ObjectID(sha)]
        assert isinstance(commit, Commit)
        chain.append(commit)
        sha = commit.parents[0] if commit.parents else None
    if sha != old:
        raise StaleParent("The push does not build on the current head; fetch first.")
    fresh: dict[bytes, ShaFile] = {}
    for commit in chain:
        for obj in (commit, repo.object_store[commit.tree]):
            fresh[obj.id] = obj
        tree = repo.object_store[commit.tree]
        assert isinstance(tree, Tree)
        for entry in tree.iteritems():
            fresh[entry.sha] = repo.object_store[entry.sha]
    known = {row[0] for row in await (await conn.execute(
        "SELECT sha FROM prompt_objects WHERE tenant_id = %s AND sha = ANY(%s)",
        (tenant_id, [sha.decode() for sha in fresh]))).fetchall()}
    rows = [(tenant_id, obj.id.decode(), obj.type_num, obj.as_raw_string()) for obj in fresh.values()
            if obj.id.decode() not in known]
    async with conn.cursor() as cur:
        await cur.executemany("INSERT INTO prompt_objects (tenant_id, sha, type_num, data) VALUES (%s, %s, %s, %s)"
                              " ON CONFLICT DO NOTHING", rows)
    versions: list[Version] = []
    for commit in reversed(chain):
        before = tree_files(repo, commit.parents[0]) if commit.parents else {}
        after = tree_files(repo, commit.id)
        for path, blob in sorted(after.items()):
            name = prompt_name(path)
            if name is None or before.get(path) == blob:
                continue
            content = blob_text(repo, blob).decode()
            message = commit.message.decode(errors="replace").strip()
            await conn.execute(
                "INSERT INTO prompt_versions (tenant_id, name, version, blob, content, message, author)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (tenant_id, name, commit.id.decode(), blob.decode(), content, message, author))
            versions.append(Version(name, commit.id.decode(), message, author, "", content))
    await conn.execute("UPDATE prompt_heads SET head = %s, updated_at = now() WHERE tenant_id = %s",
                       (new.decode(), tenant_id))
    await changes.record(conn, author=author, kind="prompt", subject=",".join(v.name for v in versions) or "-",
                         action="push", tenant_id=tenant_id, before={"head": None if old is None else old.decode()},
                         after={"head": new.decode(), "versions": [v.as_json() for v in versions]})
    return versions


async def land_push(conn: psycopg.AsyncConnection[Any], tenant_id: int, repo: MemoryRepo, old: bytes | None,
                    new: bytes, author: str) -> list[Version]:
    """A checked git push: lands only if ``old`` is still the head (else git's "fetch first")."""
    async with conn.transaction():
        head = await _lock_head(conn, tenant_id)
        if head != old:
            raise StaleParent("main has moved on since you fetched: fetch first, then push again")
        return await _land(conn, tenant_id, repo, old, new, author)


def _commit(repo: MemoryRepo, parent: bytes | None, files: Mapping[str, bytes], message: str, author: str) -> Commit:
    tree = Tree()
    for path, data in sorted(files.items()):
        blob = Blob.from_string(data)
        repo.object_store.add_object(blob)
        tree.add(path.encode(), 0o100644, blob.id)
    repo.object_store.add_object(tree)
    commit = Commit()
    commit.tree = tree.id
    commit.parents = [ObjectID(parent)] if parent is not None else []
    identity = f"{author} <{author.replace(' ', '.')}@tollway>".encode()
    commit.author = commit.committer = identity
    commit.author_time = commit.commit_time = int(time.time())
    commit.author_timezone = commit.commit_timezone = 0
    commit.encoding = b"UTF-8"
    commit.message = message.encode() + (b"" if message.endswith("\n") else b"\n")
    repo.object_store.add_object(commit)
    return commit


async def latest_version(conn: psycopg.AsyncConnection[Any], tenant_id: int, name: str) -> str | None:
    cur = await conn.execute("SELECT version FROM prompt_versions WHERE tenant_id = %s AND name = %s"
                             " ORDER BY seq DESC LIMIT 1", (tenant_id, name))
    row = await cur.fetchone()
    return None if row is None else str(row[0])


async def submit(conn: psycopg.AsyncConnection[Any], tenant_id: int, name: str, content: str, *, message: str,
                 author: str, parent: str | None = None, extra_files: Mapping[str, str] | None = None) -> Version:
    """A new version of one prompt (and files it needs, such as its golden set), as a commit on main.

    ``parent``: the version this edit was based on; if the prompt has moved on since, StaleParent (409).
    Other files having changed is fine: the commit goes on the current head (rebased)."""
    check_name(name)
    for path in extra_files or {}:
        check_path(path)
    files_in = {f"{name}{SUFFIX}": content.encode(), **{p: t.encode() for p, t in (extra_files or {}).items()}}
    async with conn.transaction():
        head = await _lock_head(conn, tenant_id)
        current = await latest_version(conn, tenant_id, name)
        if parent is not None and parent != current:
            raise StaleParent(f"Prompt '{name}' has changed since version {parent} (now {current}); "
                              "fetch it, merge your edit and submit again.", param="parent")
        repo = memory_repo(head, await load_head_tree(conn, tenant_id, head))
        files = {path: blob_text(repo, sha) for path, sha in tree_files(repo, head).items()}
        changed = [p for p, data in files_in.items() if files.get(p) != data]
        if not changed:
            raise PromptError(f"Nothing changed: {name}{SUFFIX} is already this content.", param="content",
                              code="no_change")
        files.update(files_in)
        check_tree([(p.encode(), 0o100644, len(data)) for p, data in files.items()])
        check_files(files, changed)
        commit = _commit(repo, head, files, message, author)
        versions = await _land(conn, tenant_id, repo, head, commit.id, author)
    return next(v for v in versions if v.name == name)


async def repair(conn: psycopg.AsyncConnection[Any], tenant_id: int, author: str) -> list[str]:
    """Mend a repository that holds entries the path check refuses (written before it existed). Every clone
    fetches the whole history, so the history is rewritten (as ``git filter-repo`` would): each commit keeps
    its valid entries, and from the first bad one on, commits get new ids. Prompt versions, labels and
    prompt rollouts follow their versions to the new ids; records of the past (ledger, eval runs, samples)
    keep the old ones, and the change log holds the mapping. Returns what was dropped (empty: nothing)."""
    async with conn.transaction():
        head = await _lock_head(conn, tenant_id)
        if head is None:
            return []
        _, objects = await load_objects(conn, tenant_id)
        repo = memory_repo(head, objects)
        chain: list[Commit] = []
        sha: bytes | None = head
        while sha is not None:
            commit = repo.object_store[ObjectID(sha)]
            assert isinstance(commit, Commit)
            chain.append(commit)
            sha = commit.parents[0] if commit.parents else None
        dropped: set[str] = set()
        mapping: dict[str, str] = {}
        fresh: list[ShaFile] = []
        parent: bytes | None = None
        for old in reversed(chain):
            tree = repo.object_store[old.tree]
            assert isinstance(tree, Tree)
            kept = Tree()
            for entry in tree.iteritems():
                if path_problem(entry.path, entry.mode) is None:
                    kept.add(entry.path, entry.mode, entry.sha)
                else:
                    dropped.add(entry.path.decode("utf-8", "backslashreplace"))
            new = old.copy()
            assert isinstance(new, Commit)
            new.tree = kept.id
            new.parents = [ObjectID(parent)] if parent is not None else []
            fresh += [kept, new]
            mapping[old.id.decode()] = new.id.decode()
            parent = new.id
        if not dropped:
            return []
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO prompt_objects (tenant_id, sha, type_num, data) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                [(tenant_id, obj.id.decode(), obj.type_num, obj.as_raw_string()) for obj in fresh])
            moved = [(new, tenant_id, old) for old, new in mapping.items() if old != new]
            for statement in ("UPDATE prompt_versions SET version = %s WHERE tenant_id = %s AND version = %s",
                              "UPDATE prompt_labels SET version = %s WHERE tenant_id = %s AND version = %s",
                              "UPDATE prompt_labels SET split_version = %s WHERE tenant_id = %s AND split_version = %s",
                              "UPDATE prompt_rollouts SET candidate = %s WHERE tenant_id = %s AND candidate = %s",
                              "UPDATE prompt_rollouts SET previous = %s WHERE tenant_id = %s AND previous = %s"):
                await cur.executemany(statement, moved)
        assert parent is not None
        await conn.execute("UPDATE prompt_heads SET head = %s, updated_at = now() WHERE tenant_id = %s",
                           (parent.decode(), tenant_id))
        await changes.record(conn, author=author, kind="prompt", subject="-", action="repair", tenant_id=tenant_id,
                             before={"head": head.decode()},
                             after={"head": parent.decode(), "dropped": sorted(dropped),
                                    "versions": {o: n for o, n in mapping.items() if o != n}})
    return sorted(dropped)


async def versions_of(conn: psycopg.AsyncConnection[Any], tenant_id: int, name: str | None = None) -> list[Version]:
    cur = await conn.execute(
        "SELECT name, version, message, author, created_at, content FROM prompt_versions WHERE tenant_id = %s"
        " AND (%s::text IS NULL OR name = %s) ORDER BY name, seq DESC", (tenant_id, name, name))
    return [Version(r[0], r[1], r[2], r[3], r[4].isoformat(), r[5]) for r in await cur.fetchall()]


async def version(conn: psycopg.AsyncConnection[Any], tenant_id: int, name: str, ref: str) -> Version:
    """One version by its id (a unique prefix of at least 7 characters is enough) or by a label."""
    cur = await conn.execute("SELECT version FROM prompt_labels WHERE tenant_id = %s AND name = %s AND label = %s",
                             (tenant_id, name, ref))
    row = await cur.fetchone()
    key = row[0] if row else ref
    cur = await conn.execute(
        "SELECT name, version, message, author, created_at, content FROM prompt_versions"
        " WHERE tenant_id = %s AND name = %s AND version LIKE %s ORDER BY seq DESC",
        (tenant_id, name, key + "%" if len(key) >= 7 else key))
    rows = await cur.fetchall()
    if len(rows) != 1:
        raise NotFound(f"Prompt '{name}' has no version or label '{ref}'." if not rows else
                       f"'{ref}' is ambiguous for prompt '{name}'.", param="version", code="prompt_not_found")
    r = rows[0]
    return Version(r[0], r[1], r[2], r[3], r[4].isoformat(), r[5])
