"""A real edge server in a subprocess (local Ray), for the demo, the end-to-end tests and the load benchmark."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

LISTENING = re.compile(r"SAGE_EDGE_LISTENING\b.*?\bport=(\d+)")
HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent


class ServerStartError(RuntimeError):
    """The edge server did not come up; the message carries the end of its output."""


class EdgeServerProcess:
    """`sage-edge-server serve` on 127.0.0.1 with a free port, started in `start()`, stopped in `stop()`.

    Use as a context manager. `address` is "127.0.0.1:PORT" once started.
    """

    def __init__(
        self,
        model: str | None = "tiny",
        args: Sequence[str] = (),
        start_timeout_s: float = 180.0,
        stop_timeout_s: float = 30.0,
        env: dict[str, str] | None = None,
        model_config: str | None = None,
    ):
        self.model = model
        self.model_config = model_config  # a single-file model's configs folder (--model-config)
        self.args = tuple(args)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.env = env
        self.port: int | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.output: deque[str] = deque(maxlen=200)
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        if self.port is None:
            raise ServerStartError("the edge server is not started")
        return f"{HOST}:{self.port}"

    def command(self) -> list[str]:
        """The server command line."""
        cmd = [sys.executable, "-c", "from edge_server.cli import main; main()", "serve"]
        if self.model is not None:
            cmd += ["--model", self.model]
        if self.model_config is not None:
            cmd += ["--model-config", self.model_config]
        return [*cmd, "--host", HOST, "--port", "0", *self.args]

    def launch(self) -> None:
        """Start the process without waiting for it to listen (overlap its startup with other work)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.rstrip())
            m = LISTENING.search(line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._listening.set()

    def wait_listening(self) -> str:
        """Block until the server prints its port; raise ServerStartError on exit or timeout."""
        if self.proc is None:
            self.launch()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._listening.wait(timeout=0.2):
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader drain the last lines
                self.stop()  # reap what it started in its process group (Ray's helpers)
                raise ServerStartError(f"edge server exited with code {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"edge server did not listen within {self.start_timeout_s:g} s: {self.tail()}")
        return self.address

    def start(self) -> str:
        """Launch and wait until listening; return the address."""
        self.launch()
        return self.wait_listening()

    def tail(self, lines: int = 15) -> str:
        """The last lines the server printed, joined with ' | '."""
        return " | ".join(list(self.output)[-lines:])

    def stop(self) -> int | None:
        """SIGINT to the server (graceful: it drains and shuts Ray down), then SIGTERM and SIGKILL to its process
        group; finally reap whatever of the group is left (Ray's helpers). Return the server's exit code."""
        if self.proc is None:
            return None
        steps = (
            (False, signal.SIGINT, self.stop_timeout_s),
            (True, signal.SIGTERM, 10.0),
            (True, signal.SIGKILL, 10.0),
        )
        for group, sig, wait in steps:
            if self.proc.poll() is not None:
                break
            self._signal(sig, group)
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        self._signal(signal.SIGKILL, True)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return self.proc.returncode

    def _signal(self, sig: signal.Signals, group: bool) -> None:
        assert self.proc is not None
        try:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> EdgeServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
