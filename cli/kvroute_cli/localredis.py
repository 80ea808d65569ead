"""A throwaway redis-server on loopback, for tests, benchmarks and demos (the way
:mod:`kvroute_cli.localengines` runs vLLM engines): a free port, no persistence, a working
directory of its own, and a bounded wait until it listens."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

LISTEN_TIMEOUT_S = 5.0


class RedisStartError(RuntimeError):
    """redis-server is missing, or did not listen in time."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(workdir: Path, extra_args: Sequence[str] = ()
                ) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``redis-server`` on a free loopback port; returns the process and its port once it
    accepts connections (the caller terminates it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisStartError("redis-server is not installed: scripts/system-deps.sh installs it")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), *extra_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.terminate()
                raise RedisStartError(f"redis-server did not listen on {port} within "
                                      f"{LISTEN_TIMEOUT_S:.0f} s (exit {process.poll()})") from None
            time.sleep(0.05)


__all__ = ["RedisStartError", "free_port", "start_redis"]
