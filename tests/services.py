"""Real services on 127.0.0.1 for the cluster tests: an S3 server (moto's server mode), a PostgreSQL cluster
(Debian's ``postgresql``, run as an unprivileged user in a temporary directory) and ``mlflow server``.

Each starts in its own process group and is stopped with it; ``start`` waits until it answers.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited: {log.read_text()[-2000:]}")
        try:
            with opener.open(url, timeout=2) as reply:
                if reply.status < 500:
                    return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not answering after {timeout_s} s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


class MotoS3:
    """moto's S3 server; ``env`` points boto3, pyarrow and MLflow at it (``AWS_ENDPOINT_URL``)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}
        self.process: subprocess.Popen | None = None

    @staticmethod
    def available() -> str | None:
        """None when moto's server and boto3 are installed, else why not."""
        if not (VENV_BIN / "moto_server").is_file():
            return f"no moto_server in {VENV_BIN} (pip install 'moto[server]')"
        try:
            import boto3  # noqa: F401
        except ImportError:
            return "boto3 is not installed"
        return None

    def start(self, timeout_s: float = 60.0) -> None:
        log = self.root / "moto.log"
        self.process = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_http(self.endpoint, self.process, log, timeout_s)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials())

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        _stop(self.process)


def _boto_credentials() -> dict:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Postgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (run as ``postgres`` when this process is root, since
    PostgreSQL refuses to run as root); ``uri`` is an SQLAlchemy URL for MLflow."""

    def __init__(self):
        self.bin = _postgres_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="fowkal_pg_"))  # not under pytest's root-only tmp dir
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.uri = f"postgresql+psycopg2://mlflow@127.0.0.1:{self.port}/mlflow"

    @staticmethod
    def available() -> str | None:
        if _postgres_bin() is None:
            return "PostgreSQL is not installed (make setup installs Debian's postgresql)"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no postgres user to run PostgreSQL as"
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            return "psycopg2 is not installed"
        return None

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> None:
        data = self.dir / "data"
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        self._run(
            "pg_ctl",
            "-D",
            str(data),
            "-l",
            str(self.dir / "postgres.log"),
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.dir}",
            "-w",
            "start",
        )
        for sql in ("CREATE USER mlflow", "CREATE DATABASE mlflow OWNER mlflow"):
            self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c", sql)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with the given backend store and artifact destination."""

    def __init__(
        self,
        root: Path,
        backend_store_uri: str,
        artifacts_destination: str,
        env: dict | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.extra_args = extra_args  # e.g. ("--app-name", "basic-auth")
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = artifacts_destination
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> None:
        log = self.root / "mlflow-server.log"
        self.process = subprocess.Popen(
            [
                str(VENV_BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                self.backend_store_uri,
                "--artifacts-destination",
                self.artifacts_destination,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                *self.extra_args,
            ],
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env,
        )
        _wait_http(f"{self.uri}/health", self.process, log, timeout_s)

    def stop(self) -> None:
        _stop(self.process)
