"""Debian's PgBouncer in transaction mode in front of a test's PostgreSQL, as operators run it (installed by
`make test`: apt-get install pgbouncer). It refuses to run as root, so as root it drops to `nobody` after
reading its files."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tollway.local.embedded import free_port, wait_until


@dataclass
class PgBouncer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_pgbouncer(postgres_url: str, folder: Path, *, pool_size: int = 20) -> PgBouncer:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    assert Path(binary).exists(), "Debian's pgbouncer is installed by `make test` (apt-get install pgbouncer)"
    target = urlsplit(postgres_url)
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    users = folder / "users.txt"
    users.write_text(f'"{target.username}" ""\n')
    ini = folder / "pgbouncer.ini"
    ini.write_text(f"""[databases]
* = host={target.hostname} port={target.port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {users}
pool_mode = transaction
max_client_conn = 500
default_pool_size = {pool_size}
ignore_startup_parameters = extra_float_digits,options
""")
    argv = [binary, *(["-u", "nobody"] if os.geteuid() == 0 else []), str(ini)]
    log = folder / "pgbouncer.log"
    process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def up() -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            assert process.poll() is None, log.read_text(errors="replace")
            return False

    wait_until(up, 20, "pgbouncer")
    return PgBouncer(f"postgresql://{target.username}@127.0.0.1:{port}{target.path}", process, log)
