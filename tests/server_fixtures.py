"""A real edge server process on 127.0.0.1 for tests: `start_edge_server(...)` and the `edge_server_factory`
fixture (imported into conftest.py).

    def test_x(edge_server_factory):
        server = edge_server_factory("--max-wait-ms", "30")     # model "tiny", --port 0, local Ray
        with server.blocking_stub() as stub:
            info = stub.GetServerInfo(edge_pb2.ServerInfoRequest(), timeout=10)
        async with server.aio_channel() as channel:            # grpc.aio channel to server.address
            ...

Starting one costs a Ray start plus the tiny model (about 10-25 s on a loaded 2-core CPU): share one per module
(a module-scoped fixture calling `start_edge_server`) where the tests allow. Server logs: `server.log_lines`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"SAGE_EDGE_LISTENING host=(\S+) port=(\d+)")
DEFAULT_ARGS = ("--model", "tiny", "--port", "0", "--ray-num-cpus", "1", "--max-wait-ms", "30")


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a server (or ray) subprocess: the repo importable, Ray quiet, few threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(
        {
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DISABLE_IMPORT_WARNING": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(extra or {})
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (nothing listens there: a server address to refuse or fail over)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def idle(stats: edge_pb2.ServerStats) -> bool:
    """No per-request state left in the engine."""
    return not (
        stats.active_requests
        or stats.queued_requests
        or stats.waiting_requests
        or stats.running_windows
        or stats.open_windows
        or stats.tracked_clients
    )


class EdgeServerProcess:
    """A running `python -m edge_server serve ...` subprocess and how to reach it."""

    def __init__(self, process: subprocess.Popen, host: str, port: int, log_lines: list[str]) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.log_lines = log_lines  # stderr lines, appended live by a reader thread

    @property
    def address(self) -> str:
        """host:port for grpc channels."""
        return f"{self.host}:{self.port}"

    def aio_channel(self) -> grpc.aio.Channel:
        """A new grpc.aio channel (use as `async with`)."""
        return grpc.aio.insecure_channel(self.address)

    @contextlib.contextmanager
    def blocking_stub(self) -> Iterator[edge_pb2_grpc.EdgeSamplerStub]:
        """A synchronous stub on a channel closed at exit."""
        with grpc.insecure_channel(self.address) as channel:
            yield edge_pb2_grpc.EdgeSamplerStub(channel)

    def stats(self, timeout: float = 10.0) -> edge_pb2.ServerStats:
        """The server's GetStats."""
        with self.blocking_stub() as stub:
            return stub.GetStats(edge_pb2.StatsRequest(), timeout=timeout)

    def wait_stats(
        self, predicate: Callable[[edge_pb2.ServerStats], bool], timeout: float = 30.0
    ) -> edge_pb2.ServerStats:
        """Poll GetStats until `predicate` holds; AssertionError with the last stats after `timeout`."""
        end = time.monotonic() + timeout
        stats = self.stats()
        while not predicate(stats):
            if time.monotonic() > end:
                raise AssertionError(f"server stats did not reach the expected state within {timeout} s:\n{stats}")
            time.sleep(0.05)
            stats = self.stats()
        return stats

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful shutdown), then SIGKILL after `timeout`; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode


def _pump(stream, sink: list[str], echo: bool) -> None:
    """Copy a pipe's lines into `sink` until EOF (runs in a daemon thread)."""
    for line in iter(stream.readline, ""):
        sink.append(line.rstrip("\n"))
        if echo:
            sys.stderr.write(line)
    stream.close()


def start_edge_server(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180.0, base_args: Sequence[str] = DEFAULT_ARGS
) -> EdgeServerProcess:
    """Start `python -m edge_server serve <base_args> <args>` (later flags win) and wait for its listening line.

    Raises RuntimeError with the server's log tail if it exits or does not listen within `timeout` seconds.
    """
    cmd = [sys.executable, "-m", "edge_server", "serve", *base_args, *args]
    process = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=server_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    out_lines: list[str] = []
    err_lines: list[str] = []
    threading.Thread(target=_pump, args=(process.stdout, out_lines, False), daemon=True).start()
    threading.Thread(
        target=_pump, args=(process.stderr, err_lines, bool(os.environ.get("SAGE_TEST_ECHO"))), daemon=True
    ).start()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in list(out_lines):
            if match := LISTENING.search(line):
                return EdgeServerProcess(process, match.group(1), int(match.group(2)), err_lines)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)
    tail = "\n".join(err_lines[-40:])
    raise RuntimeError(f"edge server did not start (exit {process.returncode}): {' '.join(cmd)}\n{tail}")


@pytest.fixture
def edge_server_factory() -> Iterator[Callable[..., EdgeServerProcess]]:
    """Start real edge servers (`factory(*flags)`); each is shut down (SIGTERM) at the end of the test."""
    started: list[EdgeServerProcess] = []

    def factory(*args: str, **kwargs) -> EdgeServerProcess:
        server = start_edge_server(*args, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.terminate()
