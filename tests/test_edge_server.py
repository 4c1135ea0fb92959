"""Edge server: config, admission rules, and server-side acceptance tests against a real server process.

One module-scoped server (tiny model, local Ray, 20 ms per UNet call so "slow" requests are slow on purpose:
steps=S with share=1 runs S UNet calls on the worker) serves the reliability tests; the `ray start --head`
test starts its own Ray head and server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_fixtures import EdgeServerProcess, free_port, idle, server_env, start_edge_server

from edge_server.config import ConfigError, ServerConfig, build_config
from edge_server.engine import Engine, EngineError, ImageSpec, negotiate_codec, resolve
from edge_server.worker import ModelInfo
from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc

STEP_DELAY_MS = 20
MAX_QUEUE = 6
FAST = {"steps": 4, "share": 0.5}
TIMEOUT = 60.0


# ---- no server --------------------------------------------------------------------------------------------------
def test_the_front_end_negotiates_codecs_as_sage_core_does() -> None:
    """The torch-free front end's codec choice (engine.negotiate_codec) is sage_core.codec.negotiate's."""
    from sage_core import codec

    for accepted in (["fp16"], ["int4", "fp32"], ["bogus", "int8"], ["fp8"]):
        assert negotiate_codec(accepted, ServerConfig().codecs) == codec.negotiate(accepted, ServerConfig().codecs)


def test_the_front_end_does_not_import_torch() -> None:
    """The edge server's front end (config, engine, service, CLI) stays free of torch: heavy imports belong in the
    Ray actors (why the names it checks live in the torch-free sage_core.names, the seed limit in sage_core.seeds)."""
    code = "import sys, edge_server.cli, edge_server.service, edge_server.engine; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1], env=server_env())
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


def test_config_file_and_overrides(tmp_path: Path) -> None:
    """File settings apply, CLI overrides win, unknown keys and bad values fail with the setting's name."""
    yaml_file = tmp_path / "edge.yaml"
    yaml_file.write_text("server:\n  max_batch: 7\n  tau: 0.5\n  codecs: fp16,int8\n")
    cfg = build_config(yaml_file, {"max_batch": 9, "port": None})
    assert (cfg.max_batch, cfg.tau, cfg.codecs, cfg.port) == (9, 0.5, ("fp16", "int8"), 50051)
    toml_file = tmp_path / "edge.toml"
    toml_file.write_text('model = "tiny"\nray_address = "auto"\n')
    assert build_config(toml_file).ray_address == "auto"
    with pytest.raises(ConfigError, match=r"^unknown setting max_bacth; did you mean max_batch\?$"):
        build_config(None, {"max_bacth": 3})
    with pytest.raises(ConfigError, match=r"^unknown settings max_wiat_ms, qqq; did you mean max_wait_ms\?$"):
        build_config(None, {"max_wiat_ms": 3, "qqq": 1})
    with pytest.raises(ConfigError, match="chunk_size"):
        ServerConfig(chunk_size=8 * 2**20)
    with pytest.raises(ConfigError, match="unknown codec"):
        ServerConfig(codecs=("zip",))


def test_malformed_config_file_is_a_one_line_error(tmp_path: Path) -> None:
    """Settings of the wrong shape or type, an empty `server:` section and a file that is not text are ConfigErrors
    naming the problem, and `serve` says so in one line (exit 2), never with a traceback."""
    from typer.testing import CliRunner

    from edge_server.cli import app

    cases = {
        "adaptive_taus: [x]\n": "adaptive_taus",
        "depth_schedule: [[0.7]]\n": "depth_schedule",
        "unet_buckets: [a]\n": "unet_buckets",
        "codecs: 5\n": "codecs",
        "log_level: 5\n": "log_level",
        "server:\n": "mapping of settings",
        "keepalive_s: 0\n": "keepalive_s must be in",
        "keepalive_timeout_s: .nan\n": "keepalive_timeout_s must be",
        "stall_s: 0.05\n": r"stall_s must be 0 \(off\) or in \[0.1, 86400\] seconds, got 0.05",
        "stall_s: -1\n": "stall_s must be 0",
    }
    for i, (text, needle) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            build_config(path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_config(binary)
    result = CliRunner().invoke(app, ["serve", "--config", str(tmp_path / "bad0.yaml")])
    assert result.exit_code == 2 and "error: adaptive_taus" in result.output, result.output
    assert "Traceback" not in result.output


async def test_busy_ports_are_config_errors() -> None:
    """A gRPC or metrics port that is taken, or a host that is not an address here, is a ConfigError naming the
    address (the CLI prints it in one line, exit 2), not grpc's RuntimeError or an OSError traceback."""
    from edge_server.metrics import EdgeMetrics
    from edge_server.service import bind_port, serve_metrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        for config in (ServerConfig(port=busy), ServerConfig(host="999.1.1.1", port=0)):
            with pytest.raises(ConfigError, match=f"cannot bind {config.host}:{config.port}"):
                bind_port(server, config, None)
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{busy}"):
            serve_metrics(EdgeMetrics(), ServerConfig(metrics_port=busy))



def test_config_values_of_the_wrong_type_name_the_setting(tmp_path: Path) -> None:
    """A quoted number, a number for a string, or a bool for a number is refused naming the setting and the type
    (it was "'>=' not supported between instances of 'str' and 'int'"); an int where a float goes is fine."""
    from typer.testing import CliRunner

    from edge_server.cli import app

    cases = {"max_batch": ("8", "an integer"), "tau": ("high", "a number"), "ray_address": (5, "a string or null"),
             "metrics_port": ("9", "an integer or null"), "port": (True, "an integer"),
             "unet_channels_last": ("false", "true or false")}
    for name, (value, expected) in cases.items():
        with pytest.raises(ConfigError, match=f"^{name} must be {expected}, got {value!r}"):
            build_config(overrides={name: value})
    assert build_config(overrides={"tau": 1, "grace_s": 2}).tau == 1
    assert build_config(overrides={"tau": "0.5"}).tau == 0.5  # YAML reads 1e-4 as a string: numbers are read
    (tmp_path / "c.yaml").write_text('max_batch: "8"\n')
    result = CliRunner().invoke(app, ["serve", "--config", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and result.output == "error: max_batch must be an integer, got '8'\n"


def _serve_fails_fast(*flags: str, env: dict[str, str] | None = None) -> str:
    """Run `serve --model tiny <flags>` expecting a one-line error and exit 2 within seconds (no Ray start, no model
    load); returns that line."""
    from server_fixtures import REPO_ROOT

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "edge_server", "serve", "--model", "tiny", *flags], cwd=REPO_ROOT,
                          env=server_env(env), capture_output=True, text=True, timeout=40)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ray_ready" not in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - started < 20, "took as long as a Ray start"
    return errors[0]


@pytest.mark.parametrize("form", ["{a}", "ray://{a}", "auto"])
def test_an_unreachable_ray_address_is_a_one_line_error(form: str) -> None:
    """--ray-address naming no Ray (host:port, ray://host:port, or "auto" resolving to RAY_ADDRESS) ends at once
    with `error: cannot reach Ray at ...` and exit 2: ray.init would wait forever on host:port (deaf to SIGTERM),
    print a traceback after 30 s for ray://, and at once for "auto"."""
    nothing = f"127.0.0.1:{free_port()}"
    line = _serve_fails_fast("--port", "0", "--ray-address", form.format(a=nothing), env={"RAY_ADDRESS": nothing})
    assert line.startswith(f"error: cannot reach Ray at {form.format(a=nothing)} ("), line


@pytest.mark.parametrize("auth_mode", ["", "token"])
def test_a_refused_join_names_token_auth(monkeypatch, auth_mode: str) -> None:
    """A cluster whose port answers but refuses the join (Ray's token auth, the usual cause: a joining process
    sends its token only under RAY_AUTH_MODE=token) says how to send the token, unless it is already sent."""
    import ray

    import edge_server.service as service

    def refused(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379")

    monkeypatch.setattr(service, "probe_ray", lambda address: None)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setenv("RAY_AUTH_MODE", auth_mode)
    with pytest.raises(ConfigError, match="cannot reach Ray at 127.0.0.1:6379") as refused_join:
        service.init_ray(ServerConfig(ray_address="127.0.0.1:6379"))
    assert ("RAY_AUTH_MODE=token" in str(refused_join.value)) == (auth_mode != "token")


def test_a_port_in_use_is_found_before_ray_starts() -> None:
    """A gRPC or metrics port that another socket listens on is refused before Ray starts and the model loads."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        assert _serve_fails_fast("--port", str(busy)).startswith(f"error: cannot bind 127.0.0.1:{busy}")
        line = _serve_fails_fast("--port", "0", "--metrics-port", str(busy))
        assert line.startswith(f"error: cannot serve metrics on 127.0.0.1:{busy}"), line


def test_anonymous_requests_are_capped_by_connection_not_together() -> None:
    """Without tokens, requests that name no client_id are counted per gRPC peer (their connection) for the
    per-client stream cap; a named client_id is kept."""
    from edge_server.service import EdgeSamplerServicer

    class Context:
        def __init__(self, peer: str) -> None:
            self._peer = peer

        def peer(self) -> str:
            return self._peer

        def invocation_metadata(self) -> tuple:
            return ()

    servicer = EdgeSamplerServicer(engine=None, config=ServerConfig())
    anonymous = edge_pb2.ImageRequest(prompt="a cat")
    a = servicer._spec(anonymous, Context("ipv4:10.0.0.5:40001")).client_id
    b = servicer._spec(anonymous, Context("ipv4:10.0.0.6:40002")).client_id
    assert a != b and a.startswith("peer:")
    assert servicer._spec(anonymous, Context("ipv4:10.0.0.5:40001")).client_id == a
    named = edge_pb2.ImageRequest(prompt="a cat", client_id="phone-7")
    assert servicer._spec(named, Context("ipv4:10.0.0.5:40001")).client_id == "phone-7"
    assert len(servicer._spec(anonymous, Context("unix:" + "x" * 400)).client_id) == 256
    assert servicer._spec(named, Context("ipv4:10.0.0.5:40001")).host == "10.0.0.5"  # the per-host cap's key


def test_peer_host_keys_the_address_not_the_port() -> None:
    """The per-host cap's key: an IPv4 address, an IPv6 address's /64 (an IPv4-mapped one as IPv4), every unix
    socket peer as one host; never the port, so a new connection does not make a new host."""
    from edge_server.service import peer_host

    cases = {
        "ipv4:10.0.0.5:40001": "10.0.0.5",
        "ipv4:10.0.0.5:40002": "10.0.0.5",
        "ipv6:[2001:db8:1:2::7]:40001": "2001:db8:1:2::/64",
        "ipv6:[2001:db8:1:2:ffff::9]:40002": "2001:db8:1:2::/64",
        "ipv6:[fe80::1%25eth0]:40001": "fe80::/64",
        "ipv6:[::ffff:10.0.0.5]:40001": "10.0.0.5",
        "ipv6:%5B2001:db8:1:2::7%5D:40003": "2001:db8:1:2::/64",  # as grpcio 1.85 writes it (URI-escaped)
        "ipv6:%5B::1%5D:42054": "::/64",
        "ipv6:%5B::ffff:127.0.0.1%5D:42055": "127.0.0.1",
        "ipv6:%5Bfe80::1%25eth0%5D:40001": "fe80::/64",
        "unix:/run/sage.sock": "unix",
        "unix:": "unix",
        "unix-abstract:sage": "unix",
        "something-else": "something-else",
    }
    assert {peer: peer_host(peer) for peer in cases} == cases
    assert len(peer_host("x" * 400)) == 256


async def test_the_per_host_cap_counts_streams_whatever_client_id_they_claim() -> None:
    """max_streams_per_host: a host's requests count together under whatever client ids they declare (the
    per-client cap alone was dodged by a new id per request); other hosts are not affected, a released stream frees
    its slot, and 0 (the default) keeps the cap off."""
    info = ModelInfo("abc", "{}", 32, 32, 1, "cpu")
    capped = Engine(ServerConfig(max_streams_per_host=2), [object()], [info], worker_factory=None)
    spec = lambda client, host: ImageSpec(prompt="a cat", client_id=client, host=host)  # noqa: E731
    first = capped.admit(spec("a", "10.0.0.5"), None)
    capped.admit(spec("b", "10.0.0.5"), None)
    with pytest.raises(EngineError) as refused:
        capped.admit(spec("c", "10.0.0.5"), None)
    assert refused.value.code == "RESOURCE_EXHAUSTED" and "host 10.0.0.5 has 2 open requests" in refused.value.message
    assert "max_streams_per_host" in refused.value.message
    capped.admit(spec("d", "10.0.0.6"), None)
    capped.release(first, "OK")
    capped.admit(spec("c", "10.0.0.5"), None)
    uncapped = Engine(ServerConfig(), [object()], [info], worker_factory=None)
    for i in range(5):
        uncapped.admit(spec(f"id-{i}", "10.0.0.5"), None)
    with pytest.raises(ConfigError, match="max_streams_per_host must be >= 0"):
        ServerConfig(max_streams_per_host=-1)


def refusing_info() -> ModelInfo:
    """A model whose DDIM schedule (leading spacing, steps_offset 1, as SD's) cannot take 1000 of its 1000 steps."""
    return ModelInfo("abc", '{"_class_name": "DDIMScheduler", "steps_offset": 1}', 32, 32, 1, "cpu")


async def test_steps_the_scheduler_cannot_run_are_refused_at_admission() -> None:
    """A request for steps the model's scheduler cannot run (a raised max_steps lets a device ask for 1000 DDIM
    steps) ends INVALID_ARGUMENT at admission with the scheduler's reason, counted as rejected; it used to wait
    for a window and fail there. Other schedulers and step counts are admitted; a scheduler config the front end
    cannot rebuild leaves the check to the worker."""
    engine = Engine(ServerConfig(max_steps=1000), [object()], [refusing_info()], worker_factory=None)
    with pytest.raises(EngineError) as refused:
        engine.admit(ImageSpec(prompt="a cat", steps=1000), None)
    assert refused.value.code == "INVALID_ARGUMENT", refused.value
    assert refused.value.message == ("ddim with 1000 steps reaches timestep 1000, past the model's 1000 training "
                                     "timesteps; use fewer steps")
    assert engine.stats()["rejected"] == 1 and engine.stats()["queued_requests"] == 0
    engine.admit(ImageSpec(prompt="a cat", steps=999), None)
    engine.admit(ImageSpec(prompt="a cat", steps=1000, scheduler="euler"), None)
    assert engine.stats()["queued_requests"] == 2
    broken = ModelInfo("abc", '{"_class_name": "DDIMScheduler", "num_train_timesteps": "many"}', 32, 32, 1, "cpu")
    unchecked = Engine(ServerConfig(max_steps=1000), [object()], [broken], worker_factory=None)
    unchecked.admit(ImageSpec(prompt="a cat", steps=1000), None)


def test_the_worker_refuses_such_a_bucket_alone() -> None:
    """The worker's own check (the model's scheduler config, not the front end's copy): a bucket its scheduler
    cannot run comes back refused with the reason, and the window's other bucket runs."""
    from edge_server.worker import BucketJob, BucketRefused, BucketSettings, EdgeWorker, MemberSpec

    threads = torch.get_num_threads()
    worker = EdgeWorker(ServerConfig(model="tiny", dtype="float32", ray_num_cpus=1, max_steps=1000))
    torch.set_num_threads(threads)
    info = worker.info()
    jobs = [BucketJob(BucketSettings(steps, 1.0, "ddim", info.default_height, info.default_width),
                      (MemberSpec("a red circle", 1, 0.5, "fp16", True, ""),))
            for steps in (1000, 4)]
    refused, served = worker.run_window("w-refused", jobs).buckets
    assert isinstance(refused, BucketRefused) and "ddim with 1000 steps" in refused.reason, refused
    assert len(served) == 1 and served[0].members == (0,) and served[0].branch_step == 2


async def test_a_request_waiting_for_a_free_worker_counts_as_queued() -> None:
    """A collected window waits in the batch loop for a free worker: its requests are waiting_requests until a
    worker takes it (they were counted nowhere but active_requests, so a poll found a waiting request queued only
    during the 50 ms the window collected)."""
    info = ModelInfo("abc", "{}", 32, 32, 1, "cpu")
    engine = Engine(ServerConfig(max_wait_ms=10.0), [object()], [info], worker_factory=None)
    busy = [engine._free_workers.get_nowait() for _ in range(engine._free_workers.qsize())]  # every slot taken
    loop = asyncio.create_task(engine._batch_loop())
    try:
        ticket = engine.admit(ImageSpec(prompt="a cat"), None)
        assert (engine.stats()["queued_requests"], engine.stats()["waiting_requests"]) == (1, 0)
        await asyncio.sleep(0.2)  # the window closed long ago: the batch loop holds it, waiting for a worker
        assert (engine.stats()["queued_requests"], engine.stats()["waiting_requests"]) == (0, 1)
        engine.release(ticket, "CANCELLED")
        assert engine.stats()["waiting_requests"] == 0
    finally:
        loop.cancel()
    assert busy and engine.stats()["active_requests"] == 0


class PendingWorker:
    """A stand-in for a worker actor whose run_window and shared_done answer only when the test says so."""

    def __init__(self) -> None:
        from concurrent.futures import Future

        self.calls: list[str] = []
        self.runs: dict[str, Future] = {}
        self.shared: dict[str, Future] = {}
        self.alive = self._method("alive", lambda *_: 0)
        self.stalled_s = self._method("stalled_s", lambda *_: 0.0)
        self.cancel = self._method("cancel", lambda *_: True)
        self.run_window = self._method("run_window", lambda window_id, jobs: self.runs.setdefault(window_id, Future()))
        self.shared_done = self._method("shared_done", lambda window_id: self.shared.setdefault(window_id, Future()))

    def _method(self, name: str, answer):
        from concurrent.futures import Future
        from types import SimpleNamespace

        def remote(*args):
            self.calls.append(name)
            result = answer(*args)
            if not isinstance(result, Future):
                done: Future = Future()
                done.set_result(result)
                result = done
            return SimpleNamespace(future=lambda: result)

        return SimpleNamespace(remote=remote)


async def test_a_window_whose_members_all_left_before_its_task_started_is_skipped() -> None:
    """The batch loop drops members that left while the window waited for a worker; members that leave after the
    dispatch, before the window's task runs, were sent to the worker all the same (a window for nobody). Now the
    task drops them too, and gives the worker's slot back without calling it (and nothing is cancelled there)."""
    worker = PendingWorker()
    info = ModelInfo("abc", "{}", 32, 32, 1, "cpu")
    engine = Engine(ServerConfig(), [worker], [info], worker_factory=None)
    slot = engine._free_workers.get_nowait()
    tickets = [engine.admit(ImageSpec(prompt=p), None) for p in ("a cat", "a dog")]
    window = engine._open_window(tickets, slot)
    for t in tickets:
        engine.release(t, "CANCELLED")
    slots = engine._free_workers.qsize()
    await engine._run_window(window, tickets)
    assert worker.calls == [] and engine.stats()["windows_skipped"] == 1 and engine._free_workers.qsize() == slots + 1
    assert (engine.stats()["open_windows"], engine.stats()["windows_cancelled"]) == (0, 0)


async def test_a_dispatched_window_is_open_before_its_task_starts() -> None:
    """From the batch loop's dispatch on, a window's members are in an open window, for GetStats and for a
    departure: they used to be counted nowhere until its task started a loop turn later, so a poll between the
    two saw an idle server with a request active."""
    worker = PendingWorker()
    info = ModelInfo("abc", "{}", 32, 32, 1, "cpu")
    engine = Engine(ServerConfig(max_wait_ms=1.0), [worker], [info], worker_factory=None)
    started: list = []
    engine._spawn = started.append  # the window's task is held, not started
    loop = asyncio.create_task(engine._batch_loop())
    try:
        ticket = engine.admit(ImageSpec(prompt="a cat"), None)
        for _ in range(100):
            if started:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        assert (stats["queued_requests"], stats["waiting_requests"], stats["open_windows"]) == (0, 0, 1), stats
        assert (stats["running_windows"], ticket.window_id is not None) == (0, True), stats
        engine.release(ticket, "CANCELLED")
        assert engine._windows[ticket.window_id].tickets == set() and worker.calls == []
    finally:
        loop.cancel()
        for coro in started:
            coro.close()


async def test_the_hung_worker_watch_outlives_a_failed_progress_call() -> None:
    """A `stalled_s` call that fails (the actor restarting under a resent window) does not end the window's watch:
    the next answer, a stall past stall_s, still marks the window hung (the kill itself fails on this stand-in)."""
    worker = PendingWorker()
    answers = iter([RuntimeError("the actor restarts"), 5.0, 5.0, 5.0])

    def stalled(*_):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    worker.stalled_s = worker._method("stalled_s", stalled)
    info = ModelInfo("abc", "{}", 32, 32, 1, "cpu")
    engine = Engine(ServerConfig(hung_window_s=0.3, stall_s=0.3), [worker], [info], worker_factory=None)
    ticket = engine.admit(ImageSpec(prompt="a cat"), None)
    task = asyncio.create_task(engine._run_window(engine._open_window([ticket], engine._free_workers.get_nowait()),
                                                  [ticket]))
    await asyncio.sleep(0.5)
    window = engine._windows[ticket.window_id]
    assert window.hung.startswith("started no UNet call for 5 s (stall_s 0.3)"), window.hung
    worker.runs[ticket.window_id].set_exception(RuntimeError("ended"))
    await task


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_window_waiting_for_a_worker_takes_the_requests_queued_meanwhile(workers: int) -> None:
    """With one worker, a collected window that waits for the busy worker is topped up, when it frees, with the
    requests queued meanwhile (up to max_batch; one that left is not sent): they used to wait for the window after
    it, behind it, though it had room. With two, they stay queued for the next worker that frees."""
    worker = PendingWorker()
    info = ModelInfo("abc", "{}", 32, 32, 1, "cpu")
    engine = Engine(ServerConfig(max_wait_ms=10.0, max_batch=3), [worker] * workers, [info] * workers,
                    worker_factory=None)
    slots = [engine._free_workers.get_nowait() for _ in range(workers)]  # every worker is busy
    sent: list[list[str]] = []
    worker.run_window = worker._method(
        "run_window", lambda window_id, jobs: sent.append([m.prompt for j in jobs for m in j.members]) or Future()
    )
    loop = asyncio.create_task(engine._batch_loop())
    tickets = [engine.admit(ImageSpec(prompt="first"), None)]
    try:
        await asyncio.sleep(0.1)  # its window closed: the batch loop holds it, waiting for the worker
        tickets += [engine.admit(ImageSpec(prompt=p), None) for p in ("second", "left", "third", "fourth")]
        engine.release(tickets[2], "CANCELLED")
        assert (engine.stats()["queued_requests"], engine.stats()["waiting_requests"]) == (3, 1)
        engine._free_workers.put_nowait(slots[0])
        for _ in range(20):
            await asyncio.sleep(0.01)
        if workers == 1:
            assert sent == [["first", "second", "third"]]
            stats = engine.stats()  # "fourth" opened the next window, which waits for the worker
            assert (stats["queued_requests"] + stats["waiting_requests"], stats["running_windows"]) == (1, 1)
        else:
            assert sent == [["first"]]
            stats = engine.stats()  # the next window holds "second", "third" and "fourth", waiting for a worker
            assert (stats["waiting_requests"], stats["queued_requests"], stats["running_windows"]) == (3, 0, 1)
    finally:
        loop.cancel()
        for ticket in tickets:
            engine.release(ticket, "CANCELLED")
        await engine.close()


@pytest.mark.parametrize("pipeline", [1, 2])
async def test_a_workers_slot_comes_back_when_its_window_leaves_the_model(pipeline: int) -> None:
    """A worker takes its next window when the last one's shared phase ends (its latents are encoded meanwhile),
    with at most `worker_pipeline` windows in flight; until then the next window waits in the engine. It used to
    take `worker_pipeline` windows at once, and the second waited on the worker for the model while requests that
    came meanwhile went into yet another window."""
    worker = PendingWorker()
    info = ModelInfo("abc", "{}", 32, 32, 1, "cpu")
    engine = Engine(ServerConfig(worker_pipeline=pipeline), [worker], [info], worker_factory=None)
    free = engine._free_workers

    async def dispatch(prompt: str) -> tuple[asyncio.Task, str]:
        ticket = engine.admit(ImageSpec(prompt=prompt), None)
        task = asyncio.create_task(engine._run_window(engine._open_window([ticket], free.get_nowait()), [ticket]))
        for _ in range(5):
            await asyncio.sleep(0)
        return task, ticket.window_id

    first, w1 = await dispatch("a cat")
    assert free.qsize() == 0  # the model is taken
    worker.shared[w1].set_result(None)
    await asyncio.sleep(0.01)
    assert free.qsize() == (1 if pipeline == 2 else 0)  # its latents are encoded: the next shared phase may run
    if pipeline == 2:
        second, w2 = await dispatch("a dog")
        worker.shared[w2].set_result(None)
        await asyncio.sleep(0.01)
        assert free.qsize() == 0  # two windows in flight already
    worker.runs[w1].set_exception(RuntimeError("the first window ends"))
    await first
    assert free.qsize() == 1 and engine._in_flight == [pipeline - 1]
    if pipeline == 2:
        worker.runs[w2].set_exception(RuntimeError("the second window ends"))
        await second
        assert free.qsize() == 1 and engine._in_flight == [0]


def test_a_signal_during_the_start_stops_the_server_cleanly(tmp_path: Path) -> None:
    """SIGTERM while the workers load (a `docker stop` during a long model load or compile) ends the start: the
    server shuts its local Ray down and exits 0, instead of dying at once and leaving Ray's processes behind."""
    from server_fixtures import DEFAULT_ARGS, REPO_ROOT

    log_path = tmp_path / "server.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "edge_server", "serve", *DEFAULT_ARGS], cwd=REPO_ROOT,
                                   env=server_env(), stdout=log_file, stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 120
            while "ray_ready" not in log_path.read_text() and process.poll() is None and time.monotonic() < end:
                time.sleep(0.05)
            assert "ray_ready" in log_path.read_text(), log_path.read_text()[-2000:]
            process.send_signal(signal.SIGTERM)  # the worker is still loading: about 10 s on this CPU
            code = process.wait(timeout=90)
        finally:
            if process.poll() is None:
                process.kill()
    log = log_path.read_text()
    assert code == 0, log[-2000:]
    assert "stopped_during_start" in log and "worker_ready" not in log and "Traceback" not in log

def test_resolve_fills_defaults_and_rejects() -> None:
    """Admission rules: defaults are filled in; every malformed field is INVALID_ARGUMENT."""
    cfg = ServerConfig(max_prompt_chars=50, max_steps=60, max_image_side=256)
    info = ModelInfo("abc", "{}", 32, 32, 1, "cpu")
    r = resolve(ImageSpec(prompt="a cat", seed=5), cfg, info)
    assert (r.steps, r.guidance, r.share, r.scheduler, r.height, r.codec, r.seed) == (
        30,
        7.5,
        0.4,
        "ddim",
        32,
        "fp32",
        5,
    )
    bad = [
        ImageSpec(prompt=""),
        ImageSpec(prompt="   "),
        ImageSpec(prompt="x" * 51),
        ImageSpec(prompt="a", steps=61),
        ImageSpec(prompt="a", guidance=math.nan),
        ImageSpec(prompt="a", share=1.5),
        ImageSpec(prompt="a", height=264),
        ImageSpec(prompt="a", width=12),
        ImageSpec(prompt="a", scheduler="plms"),
        ImageSpec(prompt="a", accepted_codecs=("zip",)),
        ImageSpec(prompt="a", negative_prompt="x" * 51),
    ]
    for spec in bad:
        with pytest.raises(EngineError) as err:
            resolve(spec, cfg, info)
        assert err.value.code == "INVALID_ARGUMENT", spec
    with pytest.raises(EngineError) as err:
        resolve(ImageSpec(prompt="a", model_fingerprint="other"), cfg, info)
    assert err.value.code == "FAILED_PRECONDITION"


def test_a_negative_prompt_keeps_its_request_in_the_bucket_of_its_settings() -> None:
    """Requests that differ only in their negative prompts share a bucket (its UNet calls; the worker keeps their
    groups apart), and the request keeps its negative prompt."""
    cfg, info = ServerConfig(), ModelInfo("abc", "{}", 32, 32, 1, "cpu")
    with_negative = resolve(ImageSpec(prompt="a", negative_prompt="blurry"), cfg, info)
    assert with_negative.bucket_key() == resolve(ImageSpec(prompt="a"), cfg, info).bucket_key()
    assert with_negative.negative_prompt == "blurry"


def test_rejections_echo_only_the_start_of_a_huge_value() -> None:
    """A status message quotes at most the start of the client's value (and its length): quoted whole, a 100 kB
    scheduler, fingerprint or codec name passed gRPC's 16 KiB limit on trailers and the client got
    RESOURCE_EXHAUSTED instead of the status meant."""
    cfg, info = ServerConfig(), ModelInfo("abc", "{}", 32, 32, 1, "cpu")
    huge = "z" * 100_000
    for spec, code in (
        (ImageSpec(prompt="a", scheduler=huge), "INVALID_ARGUMENT"),
        (ImageSpec(prompt="a", model_fingerprint=huge), "FAILED_PRECONDITION"),
        (ImageSpec(prompt="a", accepted_codecs=(huge, huge + "y")), "INVALID_ARGUMENT"),
    ):
        with pytest.raises(EngineError) as err:
            resolve(spec, cfg, info)
        assert err.value.code == code and len(err.value.message) < 1000, err.value.message[:300]
        assert "zzz... (" in err.value.message and " characters)" in err.value.message


def test_more_workers_than_the_local_ray_holds_fail_at_start() -> None:
    """More workers than the local Ray can place (one GPU each, or one CPU each without a GPU) end the start with
    the reason in one line, instead of waiting forever for actors Ray never schedules."""
    with pytest.raises(RuntimeError, match="error: num_workers 64 needs one GPU") as err:
        start_edge_server("--num-workers", "64", "--ray-num-cpus", "1", timeout=120)
    assert "Traceback" not in str(err.value)


# ---- one shared server --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> EdgeServerProcess:
    """The module's edge server: tiny model, local Ray, slow UNet calls, small queue, small chunks."""
    proc = start_edge_server(
        "--worker-step-delay-ms",
        str(STEP_DELAY_MS),
        "--max-queue",
        str(MAX_QUEUE),
        "--chunk-size",
        "1024",
        "--grace-s",
        "5",
    )
    yield proc
    proc.terminate()


def request(prompt: str, **fields) -> edge_pb2.ImageRequest:
    """An ImageRequest with the fast settings unless overridden."""
    return edge_pb2.ImageRequest(prompt=prompt, **{**FAST, **fields})


async def collect(stub: edge_pb2_grpc.EdgeSamplerStub, req: edge_pb2.ImageRequest, timeout: float = TIMEOUT):
    """(accepted, payload bytes, done) of one RequestImage call; checks chunk order."""
    accepted, parts, done = None, [], None
    async for msg in stub.RequestImage(req, timeout=timeout):
        kind = msg.WhichOneof("kind")
        if kind == "accepted":
            assert accepted is None and not parts
            accepted = msg.accepted
        elif kind == "chunk":
            assert accepted is not None and done is None and msg.chunk.index == len(parts)
            parts.append(msg.chunk.data)
        else:
            done = msg.done
    assert accepted is not None and done is not None
    return accepted, b"".join(parts), done


async def status_of(stub: edge_pb2_grpc.EdgeSamplerStub, req: edge_pb2.ImageRequest, timeout: float = TIMEOUT):
    """The final status code of a RequestImage call (OK when it ends normally) and its details."""
    try:
        await collect(stub, req, timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


async def test_stream_frames_checksum_and_decode(server: EdgeServerProcess) -> None:
    """Accepted, ordered chunks under the chunk size, a matching sha256, frames that decode to the latent shape."""
    from sage_core.codec import LatentCodec

    async with server.aio_channel() as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        info = await stub.GetServerInfo(edge_pb2.ServerInfoRequest(), timeout=10)
        req = request(
            "a lighthouse at dusk", seed=3, accepted_codecs=["fp32"], model_fingerprint=info.model_fingerprint
        )
        accepted, payload, done = await collect(stub, req)
    assert accepted.codec == "fp32" and accepted.seed == 3 and accepted.total_steps == 4 and accepted.branch_step == 2
    assert accepted.model_fingerprint == info.model_fingerprint and accepted.group_size >= 1
    assert done.total_bytes == len(payload) == sum(done.frame_sizes) and done.chunks == math.ceil(len(payload) / 1024)
    assert hashlib.sha256(payload).hexdigest() == done.sha256
    assert list(done.frame_names) == ["latent"]
    latent = LatentCodec().decode(payload[: done.frame_sizes[0]])
    assert tuple(latent.shape) == tuple(accepted.latent_shape) and latent.shape[:2] == (1, 4)


async def test_health_and_reflection(server: EdgeServerProcess) -> None:
    """grpc.health.v1 says SERVING for the server and the service; reflection lists EdgeSampler."""
    async with server.aio_channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "sage_edge.v1.EdgeSampler"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name async for r in replies for s in r.list_services_response.service}
    assert "sage_edge.v1.EdgeSampler" in names and "grpc.health.v1.Health" in names


async def test_malformed_requests_are_invalid_argument(server: EdgeServerProcess) -> None:
    """Empty / over-long prompt, steps out of range, unknown codec, huge or odd sizes, bad guidance/share/scheduler:
    INVALID_ARGUMENT with a message; a wrong model: FAILED_PRECONDITION; and the server serves on."""
    bad = [
        (request(""), "prompt is empty"),
        (request("x" * 5000), "limit is 1000"),
        (request("a", steps=100000), "steps"),
        (request("a", accepted_codecs=["zip9"]), "no common codec"),
        (request("a", height=1 << 20, width=1 << 20), "height"),
        (request("a", width=30), "width"),
        (request("a", guidance=float("nan")), "guidance"),
        (request("a", share=-0.5), "share"),
        (request("a", scheduler="plms"), "scheduler"),
    ]
    async with server.aio_channel() as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        results = await asyncio.gather(*(status_of(stub, req, 10) for req, _ in bad))
        for (req, needle), (code, details) in zip(bad, results, strict=True):
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (req, code, details)
            assert needle in details
        code, details = await status_of(stub, request("a", model_fingerprint="not-this-model"), 10)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "fingerprint" in details
        accepted, payload, _ = await collect(stub, request("still serving"))
    assert payload and accepted.group_size >= 1


async def test_huge_values_in_a_refused_request_keep_its_status(server: EdgeServerProcess) -> None:
    """Over the wire, a request refused for a 100 kB scheduler, fingerprint or codec name ends with the refusal's
    status (not RESOURCE_EXHAUSTED for trailers past gRPC's metadata limit) and a short message."""
    huge = "z" * 100_000
    cases = [
        (request("a", scheduler=huge), grpc.StatusCode.INVALID_ARGUMENT),
        (request("a", model_fingerprint=huge), grpc.StatusCode.FAILED_PRECONDITION),
        (request("a", accepted_codecs=[huge, huge]), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    async with server.aio_channel() as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        results = await asyncio.gather(*(status_of(stub, req, 10) for req, _ in cases))
    for (_, code), (got, details) in zip(cases, results, strict=True):
        assert got == code and len(details) < 1000, (got, details[:300])


async def test_requests_that_do_not_parse_are_invalid_argument(server: EdgeServerProcess) -> None:
    """Request bytes that are no valid message (a prompt or client id that is not UTF-8, a corrupt wire format) end
    with INVALID_ARGUMENT naming the message, on every method, and count as rejected; grpc's own parse failure
    was UNKNOWN with a Python exception in its details."""
    good = edge_pb2.ImageRequest(prompt="a cat", client_id="abc", **FAST).SerializeToString()
    bodies = [good.replace(b"a cat", b"a\xff\xfet"), good.replace(b"abc", b"\xc3\x28c"), b"\xff\xff\xff\xff"]
    before = server.stats()
    async with server.aio_channel() as channel:
        raw_request = channel.unary_stream("/sage_edge.v1.EdgeSampler/RequestImage")
        for body in bodies:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [m async for m in raw_request(body, timeout=10)]
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert err.value.details().startswith("malformed sage_edge.v1.ImageRequest: ")
        for method in ("GetStats", "GetServerInfo"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(f"/sage_edge.v1.EdgeSampler/{method}")(b"\xff\xff", timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        accepted, payload, _ = await collect(edge_pb2_grpc.EdgeSamplerStub(channel), request("still serving"))
    assert payload and accepted.group_size >= 1
    after = server.stats()
    assert after.rejected == before.rejected + len(bodies)
    assert after.status_counts["INVALID_ARGUMENT"] == before.status_counts["INVALID_ARGUMENT"] + len(bodies)


async def test_a_client_id_cannot_forge_log_lines(server: EdgeServerProcess) -> None:
    """A client id with a newline (the request's own value, logged with each request) stays on its record's line
    in the text log, escaped; it used to end the line, and the rest of it read as a record of its own."""
    forged = "2026-01-01 00:00:00,000 INFO sage_edge.service forged_event status=OK"
    async with server.aio_channel() as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        await collect(stub, request("a forged log line", client_id=f"served\n{forged}"))
        code, _ = await status_of(stub, request("", client_id=f"refused\r\n{forged}"), 10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    end = time.monotonic() + 10
    while sum("forged_event" in line for line in server.log_lines) < 2 and time.monotonic() < end:
        await asyncio.sleep(0.05)
    lines = [line for line in server.log_lines if "forged_event" in line]
    assert len(lines) == 2 and not any(line.startswith(forged) for line in lines), lines
    assert any("client_id=served\\n2026" in line and "request_done" in line for line in lines), lines
    assert any("client_id=refused\\r\\n2026" in line and "request_rejected" in line for line in lines), lines


async def test_a_client_keepalive_of_seconds_keeps_its_request(server: EdgeServerProcess) -> None:
    """A client that sends HTTP/2 keepalive pings every 1.5 s (as mobile devices do, to keep NAT mappings) keeps its
    connection while its request waits about 8 s (its window also runs a 4 s bucket); gRPC's default ping policy
    (one per 5 minutes while the server sends nothing) closed it with GOAWAY too_many_pings at the fourth ping,
    and the request ended UNAVAILABLE."""
    await asyncio.to_thread(server.wait_stats, idle)
    options = [("grpc.keepalive_time_ms", 1500), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]  # fmt: skip
    async with server.aio_channel() as plain, grpc.aio.insecure_channel(server.address, options=options) as pinging:
        other = status_of(edge_pb2_grpc.EdgeSamplerStub(plain), request("the other bucket", steps=200, share=1.0))
        mine = status_of(edge_pb2_grpc.EdgeSamplerStub(pinging), request("a slow one", steps=199, share=1.0))
        results = await asyncio.gather(other, mine)
    assert [code for code, _ in results] == [grpc.StatusCode.OK] * 2, results


async def test_queue_full_is_immediate_resource_exhausted(server: EdgeServerProcess) -> None:
    """With max_queue requests in flight the next one gets RESOURCE_EXHAUSTED at once; the rest complete."""
    await asyncio.to_thread(server.wait_stats, idle)
    async with server.aio_channel() as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        slow = [
            asyncio.create_task(status_of(stub, request(f"slow {i}", steps=40, share=1.0, client_id=f"q{i}")))
            for i in range(MAX_QUEUE)
        ]
        await asyncio.to_thread(server.wait_stats, lambda s: s.active_requests == MAX_QUEUE, 20)
        start = time.monotonic()
        code, details = await status_of(stub, request("one too many"), 10)
        elapsed = time.monotonic() - start
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in details
        assert elapsed < 2.0, f"rejection took {elapsed:.2f} s"
        results = await asyncio.wait_for(asyncio.gather(*slow), TIMEOUT)
    assert [c for c, _ in results] == [grpc.StatusCode.OK] * MAX_QUEUE


async def test_deadline_exceeded_stops_the_work(server: EdgeServerProcess) -> None:
    """A request whose deadline passes gets DEADLINE_EXCEEDED; its window (nobody else in it) is cancelled on the
    worker, which is free again long before the abandoned work (200 slow UNet calls) would have ended."""
    await asyncio.to_thread(server.wait_stats, idle)
    before = server.stats()
    async with server.aio_channel() as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        code, _ = await status_of(stub, request("too slow", steps=200, share=1.0), timeout=1.0)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        stats = await asyncio.to_thread(
            server.wait_stats, lambda s: idle(s) and s.windows_cancelled > before.windows_cancelled, 10
        )
        assert stats.status_counts["DEADLINE_EXCEEDED"] == before.status_counts["DEADLINE_EXCEEDED"] + 1
        start = time.monotonic()
        await collect(stub, request("quick after a deadline"))
    # the abandoned window would have needed 200 x 20 ms = 4 s more; the worker took the next one well before
    assert time.monotonic() - start < 3.0


async def test_cancel_and_disconnect_do_not_disturb_the_group(server: EdgeServerProcess) -> None:
    """Three identical prompts form one group; one member cancels, one drops its connection, the third still
    gets the group's latent (group size 3)."""
    await asyncio.to_thread(server.wait_stats, idle)
    prompt = "a quiet harbour with fishing boats"
    slow = {"steps": 40, "share": 1.0, "seed": 11}
    async with server.aio_channel() as keep, server.aio_channel() as dropped:
        stay = asyncio.create_task(collect(edge_pb2_grpc.EdgeSamplerStub(keep), request(prompt, **slow, client_id="s")))
        cancel_call = edge_pb2_grpc.EdgeSamplerStub(keep).RequestImage(
            request(prompt, **slow, client_id="c"), timeout=30
        )
        drop_call = edge_pb2_grpc.EdgeSamplerStub(dropped).RequestImage(
            request(prompt, **slow, client_id="d"), timeout=30
        )
        await asyncio.to_thread(server.wait_stats, lambda s: s.running_windows == 1 and s.active_requests == 3, 20)
        cancel_call.cancel()
        await dropped.close()
        accepted, payload, done = await asyncio.wait_for(stay, TIMEOUT)
    assert accepted.group_size == 3 and payload and done.total_bytes == len(payload)
    assert cancel_call.cancelled() and drop_call.cancelled() or drop_call.done()
    await asyncio.to_thread(server.wait_stats, idle, 10)


async def test_worker_killed_mid_group_fails_fast_and_recovers(server: EdgeServerProcess) -> None:
    """SIGKILL the Ray actor during a shared phase: its requests end with UNAVAILABLE at once, Ray restarts the
    actor (a new pid) and new requests succeed."""
    await asyncio.to_thread(server.wait_stats, idle)
    async with server.aio_channel() as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        doomed = [
            asyncio.create_task(status_of(stub, request("doomed", steps=200, share=1.0, seed=i))) for i in range(2)
        ]
        stats = await asyncio.to_thread(server.wait_stats, lambda s: s.running_windows == 1, 20)
        old_pid = stats.worker_pids[0]
        os.kill(old_pid, signal.SIGKILL)
        start = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*doomed), 30)
        assert [c for c, _ in results] == [grpc.StatusCode.UNAVAILABLE] * 2, results
        assert "died" in results[0][1]
        assert time.monotonic() - start < 20.0
        stats = await asyncio.to_thread(server.wait_stats, lambda s: s.worker_pids[0] not in (0, old_pid), 120)
        assert stats.worker_failures >= 1
        accepted, payload, _ = await collect(stub, request("after the restart"))
    assert payload and accepted.branch_step == 2


async def test_mixed_run_leaves_no_state(server: EdgeServerProcess) -> None:
    """Successes, rejections, cancellations and deadlines together: afterwards every per-request structure is
    empty and every admitted request is counted as finished."""
    await asyncio.to_thread(server.wait_stats, idle)
    async with server.aio_channel() as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        ok = [status_of(stub, request(f"mixed {i % 2}", client_id=f"m{i}")) for i in range(3)]
        invalid = [status_of(stub, request("", client_id="bad"))]
        late = [status_of(stub, request("late", steps=150, share=1.0, client_id="late"), timeout=0.5)]
        call = stub.RequestImage(request("to cancel", steps=100, share=1.0, client_id="cx"), timeout=30)
        results = await asyncio.wait_for(asyncio.gather(*ok, *invalid, *late), TIMEOUT)
        call.cancel()
    codes = [c for c, _ in results]
    assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED]
    stats = await asyncio.to_thread(server.wait_stats, idle, 15)
    assert stats.admitted == stats.completed + stats.failed
    assert sum(stats.status_counts.values()) == stats.admitted + stats.rejected


# ---- a real `ray start --head` cluster ----------------------------------------------------------------------------
@pytest.mark.slow
async def test_requests_cut_at_the_end_of_the_grace_period_end_unavailable() -> None:
    """SIGTERM with a grace period shorter than the request in flight: the client gets UNAVAILABLE with the reason,
    the server logs the request as UNAVAILABLE too (what its client saw; it logged CANCELLED), and exits 0. The
    grace period is longer than 3 s: Ray's failure-signal handler, which sees SIGTERM first, armed an alarm that
    aborted the server 3 s later (exit 134)."""
    server = start_edge_server("--worker-step-delay-ms", "100", "--grace-s", "4")
    try:
        async with server.aio_channel() as channel:
            stub = edge_pb2_grpc.EdgeSamplerStub(channel)
            in_flight = asyncio.create_task(status_of(stub, request("cut short", steps=100, share=1.0)))
            await asyncio.to_thread(server.wait_stats, lambda s: s.running_windows == 1, 30)
            server.process.send_signal(signal.SIGTERM)
            code, details = await asyncio.wait_for(in_flight, 30)
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details, (code, details)
        assert await asyncio.to_thread(server.process.wait, 60) == 0
        done = [line for line in server.log_lines if "request_done" in line]
        assert len(done) == 1 and "status=UNAVAILABLE" in done[0], done
        noise = [line for line in server.log_lines if "SIGTERM" in line]  # Ray's native dump, its thread warning
        assert not noise, noise
    finally:
        server.terminate(timeout=30)


@pytest.mark.slow
async def test_join_ray_head_cluster_and_graceful_shutdown() -> None:
    """`ray start --head` on 127.0.0.1 (own temp dir, own process group), `serve --ray-address HOST:PORT` joins it
    and serves; SIGTERM: health NOT_SERVING, new requests UNAVAILABLE, the in-flight stream still finishes, exit 0.
    The head is stopped by killing its process group only (never `ray stop`, which would stop every Ray here)."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="sgr", dir="/tmp")
    # Ray clusters use token authentication: head and server share a fresh token through the environment
    auth = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }  # short: Ray's socket paths must stay under 108 bytes
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            "--num-cpus=1",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=server_env(auth),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    server = None
    try:
        _wait_for_port(port, head, 90)
        server = start_edge_server(
            "--ray-address", f"127.0.0.1:{port}", "--worker-step-delay-ms", "20", "--grace-s", "20", env=auth
        )
        assert any("ray_ready started_local=False" in line for line in server.log_lines), server.log_lines
        async with server.aio_channel() as channel:
            stub = edge_pb2_grpc.EdgeSamplerStub(channel)
            accepted, payload, _ = await collect(stub, request("a cluster cat"))
            assert payload and accepted.group_size == 1
            in_flight = asyncio.create_task(collect(stub, request("in flight", steps=60, share=1.0)))
            await asyncio.to_thread(server.wait_stats, lambda s: s.running_windows == 1, 20)
            server.process.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(200):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.02)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            code, details = await status_of(stub, request("too late"), 10)
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            accepted, payload, done = await asyncio.wait_for(in_flight, TIMEOUT)
            assert payload and done.total_bytes == len(payload)
        assert await asyncio.to_thread(server.process.wait, 60) == 0
    finally:
        if server is not None:
            server.terminate(timeout=30)
        _stop_head(head, temp_dir)


def _wait_for_port(port: int, head: subprocess.Popen, timeout: float) -> None:
    """Wait until the Ray head's GCS accepts TCP connections on 127.0.0.1:port."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert head.poll() is None, f"ray start --head exited with {head.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            time.sleep(2)  # the GCS listens a little before the raylet registers
            return
        time.sleep(0.2)
    raise AssertionError(f"the Ray head did not listen on port {port} within {timeout} s")


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop the Ray head this test started: SIGTERM its process group, SIGKILL what is left after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


VANISHING_CLIENT = """
import sys
import grpc
from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
stream = edge_pb2_grpc.EdgeSamplerStub(channel).RequestImage(
    edge_pb2.ImageRequest(prompt="gone", steps=200, share=1.0, client_id="vanishing"), timeout=300)
print("sent", flush=True)
next(stream)  # waits here, for the shared phase, until the test stops this process
"""


async def test_one_host_cannot_dodge_the_stream_cap_with_new_client_ids() -> None:
    """With --max-streams-per-host 2, a third stream from 127.0.0.1 is RESOURCE_EXHAUSTED at once although each
    stream declares its own client id (within the per-client cap), with a message naming the host and the setting;
    the refusal is logged with the peer, and the slot is free again once a stream ends."""
    server = start_edge_server("--worker-step-delay-ms", str(STEP_DELAY_MS), "--max-streams-per-host", "2")
    try:
        async with server.aio_channel() as channel:
            stub = edge_pb2_grpc.EdgeSamplerStub(channel)
            slow = [asyncio.create_task(status_of(stub, request(f"slow {i}", steps=40, share=1.0, client_id=f"id-{i}")))
                    for i in range(2)]  # fmt: skip
            await asyncio.to_thread(server.wait_stats, lambda s: s.active_requests == 2, 20)
            start = time.monotonic()
            code, details = await status_of(stub, request("a third", client_id="id-2"), 10)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert "host 127.0.0.1 has 2 open requests" in details and "max_streams_per_host" in details, details
            assert time.monotonic() - start < 2.0
            assert [c for c, _ in await asyncio.wait_for(asyncio.gather(*slow), TIMEOUT)] == [grpc.StatusCode.OK] * 2
            assert (await status_of(stub, request("a third", client_id="id-2")))[0] == grpc.StatusCode.OK
        rejected = [line for line in server.log_lines if "request_rejected" in line]
        assert len(rejected) == 1 and "peer=ipv4:127.0.0.1:" in rejected[0], rejected
    finally:
        server.terminate()


def test_a_device_that_vanishes_gives_back_its_queue_slot() -> None:
    """A device that stops answering without closing its connection (it left the network; here: SIGSTOP) is found
    by the server's keepalive ping and its request cancelled within keepalive_s + keepalive_timeout_s; with gRPC's
    default keepalive (2 hours) its slot stayed taken until the work ended (200 slow steps: 20 s here)."""
    server = start_edge_server("--worker-step-delay-ms", "100", "--keepalive-s", "1", "--keepalive-timeout-s", "1")
    client = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, server.address], stdout=subprocess.PIPE,
                              text=True, env=server_env(), cwd=Path(__file__).resolve().parents[1])
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "sent"
        server.wait_stats(lambda s: s.active_requests == 1, 10)
        client.send_signal(signal.SIGSTOP)  # its connection stays open and nothing answers on it
        stats = server.wait_stats(lambda s: s.active_requests == 0, 10)
        assert (stats.admitted, stats.failed) == (1, 1), stats
    finally:
        client.kill()
        client.wait()
        assert server.terminate() == 0
