"""Device-side tool behaviour a mutation audit found unchecked by the fast tests: the edge server subprocess wrapper
(command line, environment, listening, start errors and timeouts, graceful then forced stop, process-group cleanup),
the demo's timeline (segments cut to the device's wait, rows, labels, shading, bars, legend), the demo itself (its
settings, device clients, grids, report figures, printed errors, completeness, the server it starts and the output
folder) and `sage-device`'s options reaching the device and the demo.

All fast: EdgeServerProcess runs a few-line Python script in place of the edge server, the demo's server is a
stand-in, the device clients sample the tiny model locally (their server is unreachable) and the figure is drawn
with matplotlib's Agg backend."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure
from PIL import Image
from server_fixtures import free_port
from typer.testing import CliRunner

import device_client.client
import device_client.demo as demo
from device_client.cli import check_png_out, main
from device_client.client import DeviceError, DeviceModel
from device_client.config import DeviceConfig
from device_client.server_process import HOST, REPO_ROOT, EdgeServerProcess, ServerStartError
from device_client.timeline import PHASES, Segment, segments, write_timeline
from sage_core.outputs import read_metadata

# ------------------------------------------------------------------------------------------ the server process

PORT = 43210
LISTEN = f"print('SAGE_EDGE_LISTENING host=127.0.0.1 port={PORT}')\n"
# SIGINT ends the scripts as it ends a server, even where pytest itself runs with SIGINT ignored (started with &)
INTERRUPTIBLE = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"


class ScriptServer(EdgeServerProcess):
    """EdgeServerProcess running a short Python script in place of `sage-edge-server serve`."""

    def __init__(self, script: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script = script

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script]


def gone(pid: int, within_s: float = 5.0) -> bool:
    """Whether process `pid` has ended (a zombie counts) within `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_the_command_runs_serve_on_loopback_with_a_free_port_and_the_callers_arguments_last() -> None:
    """--host 127.0.0.1 --port 0 (the port is read from the server's line), no --model for None, and the caller's
    arguments after them so that they can override."""
    cmd = EdgeServerProcess("tiny", ["--max-wait-ms", "5"]).command()
    assert cmd[3:] == ["serve", "--model", "tiny", "--host", HOST, "--port", "0", "--max-wait-ms", "5"]
    assert "--model" not in EdgeServerProcess(None).command()


def test_start_reads_the_port_and_stop_is_graceful() -> None:
    """The address is 127.0.0.1 and the whole port from the server's line, printed after a while; stop() sends
    SIGINT first and waits for the server to drain (here 0.3 s), returning its own exit code."""
    script = ("import signal, sys, time\n"
              "def bye(*a):\n    time.sleep(0.3)\n    print('bye', flush=True)\n    sys.exit(3)\n"
              "signal.signal(signal.SIGINT, bye)\ntime.sleep(0.5)\n" + LISTEN +
              "print('SAGE_EDGE_LISTENING port=1', flush=True)\ntime.sleep(60)\n")  # fmt: skip
    with ScriptServer(script, stop_timeout_s=20.0) as server:
        assert server.address == f"127.0.0.1:{PORT}" and server.port == PORT
    assert server.proc is not None and server.proc.returncode == 3  # stopped on leaving the block
    assert server.stop() == 3 and "bye" in server.output


def test_wait_listening_launches_when_not_launched() -> None:
    server = ScriptServer(INTERRUPTIBLE + LISTEN + "import time; time.sleep(60)\n")
    try:
        assert server.wait_listening() == f"127.0.0.1:{PORT}"
    finally:
        server.stop()


def test_a_server_that_ignores_sigint_is_terminated() -> None:
    """After stop_timeout_s of ignored SIGINT, SIGTERM: the exit code says so (not None, not a made-up 0)."""
    script = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" + LISTEN + "time.sleep(60)\n"
    server = ScriptServer(script, stop_timeout_s=0.5)
    server.start()
    assert server.stop() == -signal.SIGTERM


def test_stop_reaps_what_the_server_left_in_its_process_group() -> None:
    """Ray's helpers outlive a graceful server: a child that ignores SIGINT is killed with the server's group."""
    script = ("import signal, subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGINT, signal.SIG_IGN); print(1, flush=True); time.sleep(60)'], "
              "stdout=subprocess.PIPE)\n"
              "child.stdout.readline()\n"  # it ignores SIGINT from here on
              "print('child', child.pid, flush=True)\n"
              "signal.signal(signal.SIGINT, lambda *a: sys.exit(0))\n" + LISTEN + "time.sleep(60)\n")  # fmt: skip
    server = ScriptServer(script)
    server.start()
    child = int(next(line for line in server.output if line.startswith("child ")).split()[1])
    try:
        assert server.stop() == 0
        assert gone(child), "the server's child outlived stop()"
    finally:
        if not gone(child, 0.0):
            os.kill(child, signal.SIGKILL)


def test_the_server_gets_the_environment_and_the_repository_on_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """`env` overrides the caller's environment; PYTHONPATH keeps the caller's entries after the repository."""
    monkeypatch.setenv("SAGE_MUT_SETTING", "outer")
    monkeypatch.setenv("PYTHONPATH", "/tmp/mutdev-extra-path")
    script = (INTERRUPTIBLE + "import os, time\nprint('setting', os.environ['SAGE_MUT_SETTING'])\n"
              "print('path', os.environ['PYTHONPATH'])\n" + LISTEN + "time.sleep(60)\n")  # fmt: skip
    with ScriptServer(script, env={"SAGE_MUT_SETTING": "inner"}) as server:
        lines = list(server.output)
    assert "setting inner" in lines
    assert f"path {REPO_ROOT}{os.pathsep}/tmp/mutdev-extra-path" in lines


def test_a_server_that_exits_names_its_code_and_the_end_of_its_output() -> None:
    """Its stderr too (a traceback goes there), and the last 15 lines, not the first."""
    script = ("import sys, time\nfor i in range(30):\n    print('line', i)\n"
              "sys.stdout.flush()\ntime.sleep(0.5)\nprint('boom', file=sys.stderr)\nsys.exit(4)\n")  # fmt: skip
    with pytest.raises(ServerStartError) as info:
        ScriptServer(script).start()
    message = str(info.value)
    assert message.startswith("edge server exited with code 4: ")
    assert "boom" in message and "line 16 |" in message and "line 15 " not in message


def test_a_server_that_does_not_listen_in_time_is_stopped() -> None:
    """start_timeout_s (not stop_timeout_s) bounds the wait, and the process is not left running."""
    server = ScriptServer(INTERRUPTIBLE + "import time; time.sleep(60)\n", start_timeout_s=0.5, stop_timeout_s=30.0)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=r"^edge server did not listen within 0.5 s"):
        server.start()
    assert time.monotonic() - t0 < 20.0  # 0.5 s and a SIGINT, not 30 s
    assert server.proc is not None and server.proc.poll() is not None


def test_a_server_that_exits_during_a_with_block_start_leaves_nothing_running() -> None:
    """`with EdgeServerProcess(...)` whose server exits before listening raises from __enter__, so __exit__ never
    runs: the failed start itself reaps what the server started in its group (Ray's helpers). Before, they kept
    running (the demo, bench_load and sage-sim call stop() in a finally block; test_end_to_end uses `with`)."""
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
              "print('child', child.pid, flush=True)\ntime.sleep(0.3)\nsys.exit(1)\n")  # fmt: skip
    server = ScriptServer(script)
    with pytest.raises(ServerStartError, match="exited with code 1"), server:
        pass
    child = int(server.output[0].split()[1])
    try:
        assert gone(child, 2.0)
    finally:
        if not gone(child, 0.0):
            os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------- the timeline

TIMINGS = {"connect": 2.0, "wait_accepted": 900.0, "stream": 5.0, "verify_decode": 3.0, "server_queue_wait": 400.0,
           "server_shared_phase": 450.0, "branch_phase": 1200.0, "vae_decode": 80.0}  # fmt: skip


def test_server_times_beyond_the_devices_wait_or_below_zero_are_cut() -> None:
    """A queue wait longer than the 910 ms to the latent is cut to it; a negative queue wait or shared phase
    counts as 0, not as time taken from the transfer."""
    long_queue = segments(0.0, 1.0, True, {**TIMINGS, "server_queue_wait": 2000.0})
    assert long_queue[:2] == [Segment("queue", 0.0, 910.0), Segment("branch", 910.0, 1200.0)]
    assert segments(0.0, 1.0, True, {**TIMINGS, "server_queue_wait": -5.0})[:2] == [
        Segment("shared", 0.0, 450.0), Segment("transfer", 450.0, 460.0)]  # fmt: skip
    assert segments(0.0, 1.0, True, {**TIMINGS, "server_shared_phase": -30.0})[:2] == [
        Segment("queue", 0.0, 400.0), Segment("transfer", 400.0, 510.0)]  # fmt: skip


def record(i: int, start_ms: float, status: str = "OK", client: str = "") -> demo.RequestRecord:
    """A demo record: a served request with TIMINGS, or a failed one of 40 ms."""
    ok = status == "OK"
    return demo.RequestRecord(i, f"p{i}", client or f"device-{i % 2}", status, "" if ok else "boom",
                              started_ms=start_ms, latency_ms=2000.0 if ok else 40.0,
                              metadata={"timings_ms": TIMINGS} if ok else {})  # fmt: skip


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures write_timeline saves (it still saves them)."""
    figures: list[Figure] = []
    real = Figure.savefig

    def savefig(self: Figure, *args: Any, **kwargs: Any) -> Any:
        figures.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def test_the_timeline_rows_labels_bars_shading_and_legend(tmp_path: Path, drawn: list[Figure]) -> None:
    """Rows by group, then the failed requests by start; the first row on top; every other group of two or more
    shaded over its rows; each bar at its row from its start; the legend lists the phases drawn; the title counts
    clients, not requests; the figure grows with the rows; the folder is made."""
    records = [record(0, 0.0), record(1, 100.0), record(2, 2500.0), record(3, 2300.0, "INTERNAL"),
               record(4, 50.0, "INTERNAL"), record(5, 10.0), record(6, 20.0)]  # fmt: skip
    path = write_timeline(records, {"g0": [0, 2], "g1": [1], "g2": [5, 6]}, tmp_path / "a" / "b" / "timeline.png")
    assert path is not None and path.is_file()
    (fig,) = drawn
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "#0 group 0 (2)", "#2 group 0 (2)", "#1 alone", "#5 group 2 (2)", "#6 group 2 (2)", "#4 INTERNAL",
        "#3 INTERNAL"]  # fmt: skip
    assert ax.get_ylim() == (6.5, -0.5)
    spans = [p for p in ax.patches if p.get_zorder() == 0]
    (span,) = spans
    ys = sorted(y for _, y in span.get_path().transformed(span.get_patch_transform()).vertices)
    assert (ys[0], ys[-1]) == (-0.5, 1.5)
    bars = [(p.get_x(), p.get_width(), p.get_y() + p.get_height() / 2) for p in ax.patches if p.get_zorder() == 2]
    assert bars[0] == pytest.approx((0.0, 0.4, 0.0))  # #0's queue wait
    assert (2.5, 0.4, 1.0) == pytest.approx(bars[5])  # #2's queue wait, on the second row
    assert bars[-1] == pytest.approx((2.3, 0.04, 6.0))  # #3 failed, last row
    assert "7 requests, 2 device clients" in ax.get_title()
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert legend == {PHASES[p][0] for p in ("queue", "shared", "transfer", "branch", "vae", "failed")}
    assert fig.get_size_inches()[1] == pytest.approx(1.6 + 0.3 * 7)


# ----------------------------------------------------------------------------------------- the demo's settings


def test_demo_settings_are_checked_at_their_limits() -> None:
    """n_clients >= 1; a max_wait_ms of 0 (no batching window) is fine; a start timeout of 0 or NaN is not."""
    with pytest.raises(ValueError, match="n_clients must be >= 1, got 0"):
        demo.DemoConfig(Path("p"), Path("o"), n_clients=0)
    assert demo.DemoConfig(Path("p"), Path("o"), max_wait_ms=0.0).max_wait_ms == 0.0
    for bad in (0.0, math.nan):
        with pytest.raises(ValueError, match="start_timeout_s must be > 0 seconds"):
            demo.DemoConfig(Path("p"), Path("o"), start_timeout_s=bad)


def test_the_default_model_is_the_shipped_one_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sage_core.names

    monkeypatch.setattr(sage_core.names, "DEFAULT_MODEL_DIR", tmp_path)
    assert demo.resolve_model(None) == str(tmp_path) and demo.resolve_model("tiny") == "tiny"
    monkeypatch.setattr(sage_core.names, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    assert demo.resolve_model(None) == "tiny"


def test_every_device_gets_the_demos_settings() -> None:
    config = demo.DemoConfig(Path("p"), Path("o"), model_config="cfgs", adapter="none", steps=3,
                             accepted_codecs=("fp16",), timeout_s=7.0)  # fmt: skip
    device = demo.make_device_config(config, "/models/m.safetensors")
    assert (device.model, device.model_config, device.adapter, device.steps) == ("/models/m.safetensors", "cfgs",
                                                                                 "none", 3)  # fmt: skip
    assert device.accepted_codecs == ("fp16",) and device.timeout_s == 7.0


# ----------------------------------------------------------------------------------------- the device clients


@pytest.fixture(scope="module")
def tiny() -> DeviceModel:
    return DeviceModel.load(DeviceConfig(model="tiny", adapter="none"))


def local_devices(fallback: bool = True) -> DeviceConfig:
    """Devices whose server is not there: they sample locally (or fail with UNAVAILABLE)."""
    return DeviceConfig(server=f"127.0.0.1:{free_port()}", model="tiny", adapter="none", steps=2,
                        fallback_local=fallback, connect_timeout_s=0.2)  # fmt: skip


def test_the_clients_finish_every_prompt_with_its_seed_image_and_times(tiny: DeviceModel, tmp_path: Path) -> None:
    """One client takes every prompt; prompt i asks for seed + i; each record has its image under images/ (named
    relative to the output folder), its start since the clients started and its latency in ms; on_done per record."""
    prompts = ["a red circle", "a blue square"]
    config = demo.DemoConfig(tmp_path / "p.txt", tmp_path, n_clients=1, seed=40)
    done: list[int] = []
    records = demo.run_clients(prompts, config, local_devices(), tiny, tmp_path, on_done=lambda r: done.append(r.index))
    assert [r.status for r in records] == ["OK"] * 2 and sorted(done) == [0, 1]
    assert [r.metadata["seed"] for r in records] == [40, 41]
    assert [r.image for r in records] == ["images/000.png", "images/001.png"]
    assert all((tmp_path / r.image).is_file() and r.client == "device-0" for r in records)
    assert all(r.started_ms >= 0 for r in records) and records[1].started_ms >= records[0].started_ms
    assert all(r.latency_ms >= r.metadata["timings_ms"]["total"] > 0 for r in records)


def test_a_failed_request_keeps_its_code_and_message(tiny: DeviceModel, tmp_path: Path) -> None:
    """A DeviceError's code is the status and its message the error; any other exception is INTERNAL."""
    config = demo.DemoConfig(tmp_path / "p.txt", tmp_path, n_clients=1)
    (refused,) = demo.run_clients(["a cat"], config, local_devices(fallback=False), tiny, tmp_path)
    assert refused.status == "UNAVAILABLE" and "edge server" in refused.error and refused.latency_ms > 0
    (tmp_path / "images").write_text("a file where the images folder goes")
    (broken,) = demo.run_clients(["a cat"], config, local_devices(), tiny, tmp_path)
    assert broken.status == "INTERNAL" and broken.error.split(":")[0] in ("FileExistsError", "NotADirectoryError")


# ----------------------------------------------------------------------------------------------- the report


def meta(gid: str | None, guidance: float, size: int, branch_step: int, evals: int, branch_ms: float) -> dict:
    """A served request's metadata as a device reports it (10 steps, an 8x8 latent)."""
    m = {"total_steps": 10, "branch_step": branch_step, "group_size": size, "device_unet_evals": evals,
         "guidance": guidance, "payload_bytes": 100, "wire_bytes": 130, "latent_shape": [1, 4, 8, 8],
         "seed": 5, "min_similarity": 0.9,
         "timings_ms": {"branch_phase": branch_ms, "server_shared_phase": 7.0}}  # fmt: skip
    return {**m, "group_id": gid} if gid else m


def report_records() -> list[demo.RequestRecord]:
    """Two members of a group of three (the third failed), one request alone, two refusals and a lost one."""
    ok = [("g0", 7.5, 3, 4, 12, 10.0, 100.0), ("g0", 7.5, 3, 4, 12, 20.0, 200.0), ("g1", 1.0, 1, 0, 10, 30.0, 1000.0)]
    records = [demo.RequestRecord(i, f"p{i}", "device-0", "OK", latency_ms=lat, metadata=meta(g, cfg, n, k, e, b))
               for i, (g, cfg, n, k, e, b, lat) in enumerate(ok)]  # fmt: skip
    records += [demo.RequestRecord(3, "p3", "device-1", "INVALID_ARGUMENT", "bad steps", latency_ms=5000.0),
                demo.RequestRecord(4, "p4", "device-1", latency_ms=5000.0),
                demo.RequestRecord(5, "p5", "device-1", "INVALID_ARGUMENT", "second message", latency_ms=5000.0)]
    return records


def test_the_report_counts_evaluations_bytes_and_latencies_of_the_served_requests(tmp_path: Path) -> None:
    """CFG doubles a request's evaluations; the shared phase counts once per group; bytes and latencies are those
    of the requests that have an image; LOST is not an error code."""
    records = report_records()
    report = demo.build_report(records, {"g0": [0, 1], "g1": [2]}, demo.DemoConfig(tmp_path, tmp_path), {})
    assert report["counts"] == {"requests": 6, "ok": 3, "lost": 1, "errors": {"INVALID_ARGUMENT": 2}}
    assert report["unet"] == {"independent": 50, "shared_phase": 8, "branch_phase_devices": 34, "used": 42,
                              "saving": pytest.approx(0.16)}  # fmt: skip
    g0 = report["groups"][0]
    assert (g0["grid"], g0["size"], g0["members"], report["groups"][1]["grid"]) == (
        "grids/group_000.png", 3, [0, 1], "grids/group_001.png")  # fmt: skip
    assert report["bytes"] == {"payload_total": 300, "wire_total": 390, "payload_per_image": 100.0,
                               "raw_fp32_latent": 1024}  # fmt: skip
    lat = report["latency_ms"]
    assert lat["total"] == {"p50": 200.0, "p95": pytest.approx(920.0)}
    assert lat["branch_phase"]["p50"] == 20.0 and lat["server_shared_phase"]["p50"] == 7.0


def test_print_report_shows_the_first_message_of_each_error_and_no_lost_line(tmp_path: Path, capsys) -> None:
    records = report_records()
    report = demo.build_report(records, {"g0": [0, 1], "g1": [2]}, demo.DemoConfig(tmp_path, tmp_path), {})
    demo.print_report(report, tmp_path)
    printed = capsys.readouterr().out
    assert "  INVALID_ARGUMENT: bad steps" in printed and "second message" not in printed
    assert "  LOST" not in printed and "saving 16.0%" in printed


def test_a_lost_request_alone_makes_the_demo_incomplete(tmp_path: Path) -> None:
    records = [*report_records()[:3], demo.RequestRecord(3, "p3", "device-1")]
    report = demo.build_report(records, {"g0": [0, 1], "g1": [2]}, demo.DemoConfig(tmp_path, tmp_path), {})
    with pytest.raises(demo.DemoIncomplete, match=r"^1 of 4 requests ended without an image \(LOST=1\)"):
        demo.check_complete(report, tmp_path)


def test_requests_served_alone_have_a_grid_each(tmp_path: Path) -> None:
    """Local requests (no group id) are groups of one each, in grids/group_000.png, group_001.png."""
    (tmp_path / "images").mkdir()
    records = []
    for i in range(2):
        Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / f"{i:03d}.png")
        records.append(demo.RequestRecord(i, f"p{i}", status="OK", image=f"images/{i:03d}.png", metadata={}))
    assert demo.write_grids(records, tmp_path) == {"local-0": [0], "local-1": [1]}
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["group_000.png", "group_001.png"]


# ------------------------------------------------------------------------------------- the server the demo starts


class RecordingServer:
    """EdgeServerProcess's stand-in: keeps what it was given, listens on a made-up address, stops with code 7."""

    made: list[RecordingServer] = []
    fail_start = False

    def __init__(self, model: str, args: tuple, start_timeout_s: float, model_config: str | None = None) -> None:
        self.model, self.args, self.start_timeout_s, self.model_config = model, args, start_timeout_s, model_config
        self.stopped = False
        RecordingServer.made.append(self)

    def launch(self) -> None:
        pass

    def wait_listening(self) -> str:
        if self.fail_start:
            raise ServerStartError("edge server exited with code 1: boom")
        return "127.0.0.1:52277"

    def stop(self) -> int:
        self.stopped = True
        return 7


@pytest.fixture
def stand_in_server(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The demo's server is a RecordingServer and the device model is not loaded; returns the clients' configs."""
    from types import SimpleNamespace

    RecordingServer.made, RecordingServer.fail_start = [], False
    monkeypatch.setattr(demo, "EdgeServerProcess", RecordingServer)
    monkeypatch.setattr(device_client.client.DeviceModel, "load",
                        staticmethod(lambda config: SimpleNamespace(fingerprint="f", adapter="none")))  # fmt: skip
    devices: list[Any] = []

    def run_with_progress(prompts: list[str], config: Any, device_config: Any, *rest: Any) -> list[Any]:
        devices.append(device_config)
        time.sleep(0.05)
        return [demo.RequestRecord(0, prompts[0], "device-0", "UNAVAILABLE", "no")]

    monkeypatch.setattr(demo, "run_with_progress", run_with_progress)
    return devices


def test_the_demo_starts_its_server_with_its_settings(tmp_path: Path, stand_in_server: list[Any]) -> None:
    """The server gets the model named, its configs, the batching window as given and the extra arguments after
    it, and the start timeout; the devices get its address; the report has its exit code, start and wall times;
    the timeline goes in the folder being written."""
    config = demo.DemoConfig(tmp_path / "p.txt", tmp_path / "out", n_clients=1, model_config="cfgs", adapter="none",
                             max_wait_ms=2.5, server_args=("--default-steps", "4"), start_timeout_s=12.0)  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    report = demo.run_in(work, ["a cat"], "/models/m.safetensors", config, progress=False)
    (server,) = RecordingServer.made
    assert (server.model, server.model_config, server.start_timeout_s) == ("/models/m.safetensors", "cfgs", 12.0)
    assert server.args == ("--max-wait-ms", "2.5", "--default-steps", "4") and server.stopped
    assert stand_in_server[0].server == "127.0.0.1:52277"
    assert report["server"]["exit_code"] == 7 and report["server"]["start_s"] >= 0
    assert 0.05 <= report["wall_s"] < 30
    assert (work / demo.TIMELINE).is_file() and not (tmp_path / "out").exists()


def test_a_server_that_does_not_start_is_a_demo_error_and_is_stopped(tmp_path: Path, stand_in_server: list) -> None:
    RecordingServer.fail_start = True
    config = demo.DemoConfig(tmp_path / "p.txt", tmp_path / "out", n_clients=1, adapter="none")
    with pytest.raises(demo.DemoError, match="^edge server exited with code 1: boom$"):
        demo.run_in(tmp_path, ["a cat"], "tiny", config, progress=False)
    assert RecordingServer.made[0].stopped and not stand_in_server


def test_the_progress_bar_is_fed_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []

    def run_clients(prompts: list[str], *args: Any, **kwargs: Any) -> list[Any]:
        calls.append("on_done" in kwargs)
        for i, p in enumerate(prompts):
            kwargs.get("on_done", lambda r: None)(demo.RequestRecord(i, p))
        return []

    monkeypatch.setattr(demo, "run_clients", run_clients)
    config = demo.DemoConfig(tmp_path / "p.txt", tmp_path / "out", n_clients=1)
    for progress in (False, True):
        demo.run_with_progress(["a", "b"], config, DeviceConfig(), None, tmp_path, progress)
    assert calls == [False, True]


def test_a_previous_runs_output_is_kept_without_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_demo_config with prompts already read still refuses a previous run's folder without overwrite."""
    monkeypatch.setattr(demo, "run_in", lambda *args: pytest.fail("the demo ran"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    config = demo.DemoConfig(tmp_path / "p.txt", out, n_clients=1, model="tiny")
    with pytest.raises(ValueError, match="exists and is not empty; pass --overwrite"):
        demo.run_demo_config(config, prompts=["a cat"])
    assert (out / "report.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------------ sage-device


class RecordingClient:
    """DeviceClient's stand-in: keeps its config and what it was asked, then fails as an unreachable server."""

    seen: list[tuple[Any, ...]] = []

    def __init__(self, config: DeviceConfig, model: Any = None) -> None:
        self.seen.append(("config", config))

    def __enter__(self) -> RecordingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def generate(self, *args: Any) -> Any:
        self.seen.append(("generate", *args))
        raise DeviceError("UNAVAILABLE", "stand-in")


def test_generate_passes_every_option_to_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    RecordingClient.seen = []
    monkeypatch.setattr(device_client.client, "DeviceClient", RecordingClient)
    res = CliRunner().invoke(main, [
        "generate", "a cat", "-o", str(tmp_path / "x.png"), "--server", "127.0.0.1:1", "--model", "tiny",
        "--adapter", "none", "--steps", "3", "--guidance", "5", "--share", "0.25", "--scheduler", "euler",
        "--codec", "fp16", "--timeout", "40", "--connect-timeout", "2", "--retries", "1", "--device", "cpu:0",
        "--tls", "--tls-server-name", "edge", "--client-id", "dev7", "--seed", "9",
        "--negative-prompt", "blurry"])  # fmt: skip
    assert res.exit_code == 1 and "error: UNAVAILABLE: stand-in" in res.stderr and "error" not in res.stdout
    (_, config), generate = RecordingClient.seen
    assert generate == ("generate", "a cat", 9, "blurry")
    got = {k: getattr(config, k) for k in ("steps", "guidance", "share", "scheduler", "accepted_codecs", "timeout_s",
                                           "connect_timeout_s", "retries", "device", "tls", "tls_server_name",
                                           "client_id")}  # fmt: skip
    assert got == {"steps": 3, "guidance": 5.0, "share": 0.25, "scheduler": "euler", "accepted_codecs": ("fp16",),
                   "timeout_s": 40.0, "connect_timeout_s": 2.0, "retries": 1, "device": "cpu:0", "tls": True,
                   "tls_server_name": "edge", "client_id": "dev7"}  # fmt: skip


def test_generate_without_model_uses_the_shipped_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    RecordingClient.seen = []
    monkeypatch.setattr(device_client.client, "DeviceClient", RecordingClient)
    res = CliRunner().invoke(main, ["generate", "a cat", "-o", str(tmp_path / "x.png"), "--server", "127.0.0.1:1",
                                    "--adapter", "none"])  # fmt: skip
    assert res.exit_code == 1 and "error: UNAVAILABLE: stand-in" in res.output, res.output
    assert RecordingClient.seen[0][1].model == demo.resolve_model(None)


LONG = " ".join(["a red circle on the left of a blue square"] * 12)  # over CLIP's 77 tokens


def tiny_generate(out: Path, prompt: str, *options: str) -> Any:
    """`sage-device generate PROMPT -o OUT` on the tiny model with 2 steps and seed 3."""
    args = ["generate", prompt, "-o", str(out), "--model", "tiny", "--adapter", "none", "--steps", "2", "--seed", "3"]
    res = CliRunner().invoke(main, [*args, *options])
    assert res.exit_code == 0, res.output
    return res


def test_local_generate_ignores_the_token_and_reports_what_it_did(tmp_path: Path) -> None:
    """Without --server: no token is read, the negative prompt is used, the line says 'local' and there is no
    fallback line."""
    from device_client import read_metadata

    out = tmp_path / "x.png"
    res = tiny_generate(out, "a red circle", "--negative-prompt", "blurry", "--token-file", str(tmp_path / "missing"))
    assert res.stdout.startswith(f"wrote {out} (local, seed 3, ") and "fell back" not in res.output
    assert read_metadata(out)["negative_prompt"] == "blurry"


def test_a_long_prompt_without_a_negative_one_gets_only_its_own_note(tmp_path: Path) -> None:
    """With guidance 1 and no negative prompt there is no note on the negative prompt, and the over-long prompt's
    note names the prompt."""
    res = tiny_generate(tmp_path / "x.png", LONG, "--guidance", "1", "--server", f"127.0.0.1:{free_port()}",
                        "--fallback-local", "--connect-timeout", "0.2")  # fmt: skip
    notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: the prompt is too long"), res.stderr
    assert res.stdout.startswith(f"wrote {tmp_path / 'x.png'} (local-fallback, seed 3, ") and "fell back" in res.stdout


def test_local_generate_notes_a_long_prompt_and_its_time(tmp_path: Path) -> None:
    """`sage-device generate` without --server gives the time taken, the over-long prompt's note and the ignored
    tokens in the image's metadata, as the same command with an unreachable server and --fallback-local does
    (it said '0 ms', without the note or the metadata)."""
    res = tiny_generate(tmp_path / "x.png", LONG)
    assert "note: the prompt is too long" in res.stderr and " 0 ms)" not in res.stdout
    metadata = read_metadata(tmp_path / "x.png")
    assert metadata["ignored_tokens"] > 0
    assert metadata["timings_ms"]["total"] >= metadata["timings_ms"]["local_sampling"] > 0


def test_png_names_are_checked_without_case(tmp_path: Path) -> None:
    check_png_out(tmp_path / "X.PNG", overwrite=False)


def test_demo_passes_every_option_and_its_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[demo.DemoConfig, list[str] | None]] = []

    def run_demo_config(config: demo.DemoConfig, progress: bool = False, prompts: list[str] | None = None) -> dict:
        seen.append((config, prompts))
        return {}

    monkeypatch.setattr(demo, "run_demo_config", run_demo_config)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n", encoding="utf-8")
    base = ["demo", "--prompts", str(prompts), "--model", "tiny", "--adapter", "none"]
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "o"), "--clients", "3", "--steps", "4",
                                    "--seed", "11", "--negative-prompt", "blurry", "--max-wait-ms", "25",
                                    "--server-arg=--default-steps", "--server-arg=4", "--overwrite"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    (given, prompt_list), (default, _) = seen
    assert prompt_list == ["a cat", "a dog"]
    got = {k: getattr(given, k) for k in ("n_clients", "steps", "seed", "negative_prompt", "max_wait_ms",
                                          "server_args", "overwrite")}  # fmt: skip
    assert got == {"n_clients": 3, "steps": 4, "seed": 11, "negative_prompt": "blurry", "max_wait_ms": 25.0,
                   "server_args": ("--default-steps", "4"), "overwrite": True}  # fmt: skip
    defaults = (default.n_clients, default.steps, default.seed, default.max_wait_ms, default.overwrite)
    assert defaults == (8, 0, 0, 500.0, False)
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "c"), "--model-config", str(tmp_path)])
    assert res.exit_code == 2 and "model_config is for a single-file model, not the tiny model" in res.output
    assert len(seen) == 2


def test_sage_device_alone_prints_its_help() -> None:
    res = CliRunner().invoke(main, [])
    assert "Missing command" not in res.output and "generate" in res.output and "demo" in res.output, res.output
