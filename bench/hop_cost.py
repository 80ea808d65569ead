"""What one message between two processes costs this machine's CPUs (router-cpu.md, round 4).

A streaming proxy receives every token event from the engine and sends it on to the client:
two socket operations per token, each finding its peer asleep in ``epoll`` when tokens are
milliseconds apart. This measures that floor without any proxy: a sender process writes
``--size``-byte messages over loopback TCP (``TCP_NODELAY``, as aiohttp and Envoy set it) to
a receiver process that waits in ``select``/``epoll`` and reads each; with ``--gap-ms`` between
messages (the receiver idle when each arrives, as for streamed tokens) and with none
(back-to-back: the receiver mostly awake). Reported: the sender's CPU per ``send`` and the
receiver's per message (wake-up + ``recv``), from ``time.thread_time()``.

    python bench/hop_cost.py --messages 1000 --gap-ms 2 --json hop.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import selectors
import socket
import sys
import time
from pathlib import Path
from typing import Any


def _receive(port: int, total_bytes: int, report_fd: int) -> None:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(conn, selectors.EVENT_READ)
    got = wakes = 0
    start = time.thread_time()
    deadline = time.monotonic() + 120
    while got < total_bytes and time.monotonic() < deadline:
        if selector.select(timeout=5):
            wakes += 1
            with contextlib.suppress(BlockingIOError):
                got += len(conn.recv(65536))
    os.write(report_fd, json.dumps({"cpu_s": time.thread_time() - start, "wakes": wakes,
                                    "bytes": got}).encode())


def measure(messages: int, size: int, gap_s: float) -> dict[str, Any]:
    """One run: ``messages`` sends with ``gap_s`` between them; CPU per message each side."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the receiver
        try:
            _receive(port, messages * size, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    sender, _ = listener.accept()
    sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"x" * size
    cpu = 0.0
    for _ in range(messages):
        t0 = time.thread_time()
        sender.sendall(payload)
        cpu += time.thread_time() - t0
        if gap_s:
            time.sleep(gap_s)
    os.waitpid(pid, 0)
    receiver = json.loads(os.read(read_fd, 4096) or b"{}")
    os.close(read_fd)
    sender.close()
    listener.close()
    return {"gap_ms": gap_s * 1000, "messages": messages, "size": size,
            "sender_us_per_message": cpu / messages * 1e6,
            "receiver_us_per_message": receiver.get("cpu_s", float("nan")) / messages * 1e6,
            "receiver_wakes": receiver.get("wakes", 0),
            "received_bytes": receiver.get("bytes", 0)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=200, help="bytes per message (an SSE "
                                                               "token event is ~150-250)")
    parser.add_argument("--gap-ms", type=float, default=2.0,
                        help="pause between messages in the paced run (tokens ms apart)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    runs = [measure(args.messages, args.size, args.gap_ms / 1000),
            measure(args.messages * 5, args.size, 0.0)]
    result = {"machine": f"{os.cpu_count()} cores, {platform.machine()}, "
                         f"{platform.system()} {platform.release()}",
              "python": sys.version.split()[0], "loadavg": os.getloadavg()[0], "runs": runs}
    for run in runs:
        print(f"gap {run['gap_ms']:.1f} ms: send {run['sender_us_per_message']:.1f} µs, "
              f"wake + recv {run['receiver_us_per_message']:.1f} µs per message "
              f"({run['receiver_wakes']} wakes for {run['messages']} messages)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
