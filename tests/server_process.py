"""``latentrt serve`` as a subprocess on a free loopback port, for tests that talk to it over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["ServerProcess", "free_port", "rss_bytes", "serve"]


@dataclass
class ServerProcess:
    """A running server: its base URL and process."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextmanager
def serve(
    args: Sequence[str], log: Path, env: dict[str, str] | None = None, startup_s: float = 120
) -> Iterator[ServerProcess]:
    """Run ``latentrt serve ARGS`` until the block ends; waits for ``/health`` first."""
    port = free_port()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "latentrt.cli", "serve", "--port", str(port), *args]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment)
    server = ServerProcess(f"http://127.0.0.1:{port}", port, process, log)
    try:
        _wait_healthy(server, startup_s)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(server: ServerProcess, startup_s: float) -> None:
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"latentrt serve exited with {server.process.returncode}:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"latentrt serve did not answer /health within {startup_s} s:\n{server.log.read_text()}")
