"""``tollway ingest`` and ``tollway search``: clients of a running gateway's retrieval API, like any OpenAI
client (``--base-url`` ending in /v1 or TOLLWAY_BASE_URL, ``--api-key`` or TOLLWAY_API_KEY). The gateway
owns the embedder, the ledger and the budgets, so a CLI ingest is metered like an API one."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".md", ".markdown", ".mdx", ".txt", ".text", ".rst", ".html", ".htm", ".xhtml")
BATCH_BYTES = 2 * 1024 * 1024  # per request, under the gateway's default body limit of 4 MiB


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        raw = body.get("error")
        error: dict[str, Any] = raw if isinstance(raw, dict) else {}
        super().__init__(f"{status}: {error.get('message') or body}")
        self.status, self.code, self.body = status, error.get("code"), body


class Client:
    def __init__(self, base_url: str, api_key: str, timeout: float = 600) -> None:
        self.base_url, self.api_key, self.timeout = base_url.rstrip("/"), api_key, timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers={
            "authorization": f"Bearer {self.api_key}", "content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                out: dict[str, Any] = json.loads(resp.read())
                return out
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = {"error": {"message": raw.decode(errors="replace")[:500]}}
            raise ApiError(exc.code, parsed) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise SystemExit(f"tollway: cannot reach the gateway at {self.base_url} ({reason}); is it running, and "
                             "are --base-url or TOLLWAY_BASE_URL its /v1 URL?") from None


def client_of(args: argparse.Namespace) -> Client:
    key = args.api_key or os.environ.get("TOLLWAY_API_KEY")
    if not key:
        raise SystemExit("tollway: give --api-key or set TOLLWAY_API_KEY (an app key made with --ingest, or an "
                         "admin key with --tenant)")
    base = args.base_url or os.environ.get("TOLLWAY_BASE_URL") or "http://127.0.0.1:8080/v1"
    return Client(base, key)


def files_of(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                          and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            out.append(path)
        else:
            raise SystemExit(f"tollway: {raw}: no such file or folder")
    return out


def _source(path: Path) -> str:
    """The document's name in the collection: its path relative to here (re-ingesting it replaces it)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _batches(paths: list[Path], limit: int) -> list[list[Path]]:
    batches: list[list[Path]] = [[]]
    size = 0
    for p in paths:
        n = p.stat().st_size
        if batches[-1] and (size + n > BATCH_BYTES or len(batches[-1]) >= limit):
            batches.append([])
            size = 0
        batches[-1].append(p)
        size += n
    return [b for b in batches if b]


def _document(path: Path, fmt: str | None, metadata: dict[str, Any]) -> dict[str, Any]:
    text = path.read_bytes().decode("utf-8-sig")  # UnicodeDecodeError: reported as a failed document
    doc: dict[str, Any] = {"source": _source(path), "text": text, "metadata": metadata}
    if fmt:
        doc["format"] = fmt
    return doc


def _ensure_collection(client: Client, args: argparse.Namespace) -> None:
    tenant = f"?tenant={args.tenant}" if args.tenant else ""
    try:
        client.call("GET", f"/collections/{args.collection}{tenant}")
    except ApiError as exc:
        if exc.code != "collection_not_found" or args.no_create:
            raise
        body: dict[str, Any] = {"name": args.collection}
        if args.tenant:
            body["tenant"] = args.tenant
        if args.embedder:
            body["embedder"] = args.embedder
        made = client.call("POST", "/collections", body)
        print(f"created collection {made['name']} (embedder {made['embedder']})", file=sys.stderr)


def cmd_ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    client = client_of(args)
    try:
        metadata = json.loads(args.metadata) if args.metadata else {}
    except ValueError as exc:
        raise SystemExit(f"tollway: --metadata is not JSON ({exc})") from None
    if not isinstance(metadata, dict):
        raise SystemExit("tollway: --metadata must be a JSON object, such as '{\"lang\": \"en\"}'")
    paths = files_of(args.paths)
    if not paths:
        print("tollway: no text, markdown or HTML files found", file=sys.stderr)
        return 1
    try:
        _ensure_collection(client, args)
    except ApiError as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        return 2
    counts: Counter[str] = Counter()
    failures: list[tuple[str, str]] = []
    chunks = tokens = 0
    cost = 0.0
    version = ""
    started = time.perf_counter()

    def send(docs: list[dict[str, Any]]) -> None:
        nonlocal chunks, tokens, cost, version
        body: dict[str, Any] = {"documents": docs}
        if args.tenant:
            body["tenant"] = args.tenant
        try:
            out = client.call("POST", f"/collections/{args.collection}/documents", body)
        except ApiError as exc:
            if len(docs) > 1 and exc.status in (400, 413):  # one bad document refuses its batch: find it
                for doc in docs:
                    send([doc])
                return
            failures.append((docs[0]["source"] if len(docs) == 1 else f"{len(docs)} documents", str(exc)))
            if exc.status in (401, 403, 404):
                raise
            return
        for row in out["data"]:
            counts[row["status"]] += 1
            if row["status"] != "unchanged":
                chunks += row["chunks"]
        tokens += out["usage"]["prompt_tokens"]
        cost += float(out["usage"]["cost_usd"])
        version = out["index_version"]

    with tqdm(total=len(paths), unit="doc", desc=f"ingest {args.collection}", file=sys.stderr,
              disable=args.quiet) as bar:
        try:
            for batch in _batches(paths, args.batch):
                docs = []
                for p in batch:
                    try:
                        docs.append(_document(p, args.format, metadata))
                    except (UnicodeDecodeError, OSError) as exc:
                        failures.append((_source(p), f"not UTF-8 text ({exc.__class__.__name__})"))
                if docs:
                    send(docs)
                bar.update(len(batch))
        except ApiError as exc:
            print(f"tollway: {exc}", file=sys.stderr)
            return 2
    took = time.perf_counter() - started
    done = sum(counts.values())
    print(f"{done} documents in {took:.1f} s ({done / took if took else 0:.1f} documents/s): "
          f"{counts['created']} created, {counts['replaced']} replaced, {counts['unchanged']} unchanged, "
          f"{len(failures)} failed; {chunks} chunks, {tokens} embedding tokens, ${cost:.6f}")
    if version:
        print(f"index version: {version}")
    for source, why in failures:
        print(f"failed: {source}: {why}", file=sys.stderr)
    return 1 if failures else 0


def cmd_search(args: argparse.Namespace) -> int:
    client = client_of(args)
    body: dict[str, Any] = {"collection": args.collection, "query": args.query, "mode": args.mode,
                            "hybrid": args.hybrid}
    if args.k is not None:  # 0 or less goes to the gateway, which refuses it as the API does (not the default)
        body["k"] = args.k
    if args.context_tokens is not None:
        body["context_tokens"] = args.context_tokens
    if args.tenant:
        body["tenant"] = args.tenant
    try:
        out = client.call("POST", "/retrieval/search", body)
    except ApiError as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for s in out["sources"]:
        where = s["heading"] if s["heading"].startswith(s["title"]) else f"{s['title']} > {s['heading']}"
        print(f"[{s['n']}] {s['score']:.3f}  {where}  (document {s['document_id']}, "
              f"section {s['section_id']}, chunks {','.join(map(str, s['chunk_ids']))})")
    print(f"context: {out['context_tokens_used']} tokens; index version {out['index_version']}")
    return 0


def add_commands(sub: Any) -> None:
    def client_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--base-url", help="the gateway's /v1 URL; TOLLWAY_BASE_URL (default "
                                               "http://127.0.0.1:8080/v1)")
        parser.add_argument("--api-key", help="TOLLWAY_API_KEY")
        parser.add_argument("--tenant", help="the tenant (admin keys name it)")
        parser.add_argument("--collection", required=True)

    ingest = sub.add_parser("ingest", help="add files or folders (text, markdown, HTML) to a collection")
    ingest.add_argument("paths", nargs="+", metavar="PATH")
    client_flags(ingest)
    ingest.add_argument("--format", choices=["text", "markdown", "html"], help="default: from each file's suffix")
    ingest.add_argument("--metadata", help="JSON object stored with every document (filterable)")
    ingest.add_argument("--embedder", help="for a new collection: 'local' or an embedding model of the catalog")
    ingest.add_argument("--no-create", action="store_true", help="fail if the collection does not exist")
    ingest.add_argument("--batch", type=int, default=16, help="documents per request (default 16)")
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")
    ingest.set_defaults(func=cmd_ingest)

    search = sub.add_parser("search", help="search a collection; shows the sources packed into the budget")
    search.add_argument("query")
    client_flags(search)
    search.add_argument("--context-tokens", type=int)
    search.add_argument("-k", type=int, help="flat: chunks (default 8); hierarchical: most passages (default 50)")
    search.add_argument("--mode", choices=["hierarchical", "flat"], default="hierarchical")
    search.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=True,
                        help="fuse BM25 with the dense ranking (the default); --no-hybrid: dense only")
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=cmd_search)
