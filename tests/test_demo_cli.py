"""`sage-device demo` when requests fail: the report is kept, each error code is shown with its message, and the
command exits 1 (a demo whose every request was refused used to print a table of zeros and exit 0). The server is
replaced by a stand-in that refuses every request, so these run in a second."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import device_client.demo as demo

REFUSAL = "steps must be <= max_steps=200, got 300"


def refuse_all(work_dir: Path, prompts: list[str], model_name: str, config: demo.DemoConfig, progress: bool) -> dict:
    """run_in's stand-in: every request refused by the server, as `--steps 300` is."""
    records = [demo.RequestRecord(i, p, "device-0", "INVALID_ARGUMENT", REFUSAL) for i, p in enumerate(prompts)]
    groups = demo.write_grids(records, work_dir)
    report = demo.build_report(records, groups, config, {"server": {}, "wall_s": 0.0})
    (work_dir / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return report


@pytest.fixture
def prompts(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(demo, "run_in", refuse_all)
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n", encoding="utf-8")
    return path


def test_failed_requests_raise_with_the_report_kept(prompts, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(demo.DemoIncomplete, match=r"^2 of 2 requests ended without an image \(INVALID_ARGUMENT=2\)"):
        demo.run_demo(prompts, out, n_clients=1, model="tiny")
    printed = capsys.readouterr().out
    assert f"INVALID_ARGUMENT: {REFUSAL}" in printed  # the message, not only the code
    assert "images/" not in printed and "(grids/, report.json)" in printed  # no image was written
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["ok"] == 0
    # no latency was measured: it used to read 'latency ms: total p50 0 / p95 0' and record 0.0
    assert "no request succeeded" in printed and "latency ms" not in printed and "UNet evaluations" not in printed
    assert report["latency_ms"]["total"] == {"p50": None, "p95": None}


def test_the_cli_exits_1_when_requests_fail(prompts, tmp_path):
    from typer.testing import CliRunner

    from device_client.cli import main

    res = CliRunner().invoke(main, ["demo", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--model", "tiny"])
    assert res.exit_code == 1, res.output
    assert "error: 2 of 2 requests ended without an image" in res.output


class SlowServer:
    """EdgeServerProcess's stand-in: starts at once, listens on a made-up address."""

    def __init__(self, model: str, args: tuple, start_timeout_s: float, model_config: str | None = None) -> None:
        self.model = model

    def launch(self) -> None:
        print("(server launched)")

    def wait_listening(self) -> str:
        return "127.0.0.1:52277"

    def stop(self) -> int:
        return 0


def test_the_server_start_is_announced_before_the_wait(tmp_path, monkeypatch, capsys):
    """The start of the server (tens of seconds with the shipped model) used to pass without a word."""
    from types import SimpleNamespace

    import device_client.client

    monkeypatch.setattr(demo, "EdgeServerProcess", SlowServer)
    monkeypatch.setattr(device_client.client.DeviceModel, "load",
                        staticmethod(lambda config: SimpleNamespace(fingerprint="f", adapter="none")))
    monkeypatch.setattr(demo, "run_with_progress", lambda prompts, *rest: [demo.RequestRecord(0, prompts[0])])
    config = demo.DemoConfig(tmp_path / "p.txt", tmp_path / "out", n_clients=1)
    demo.run_in(tmp_path, ["a red circle"], "tiny", config, progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "starting the edge server (tiny) and loading the device model..."
    assert lines[1] == "(server launched)" and lines[2].startswith("edge server ready at 127.0.0.1:52277 after ")


def test_a_successful_run_prints_its_figures(tmp_path, capsys):
    meta = {"group_id": "g0", "total_steps": 4, "branch_step": 2, "group_size": 1, "device_unet_evals": 2,
            "guidance": 1.0, "payload_bytes": 100, "wire_bytes": 120, "latent_shape": [1, 4, 8, 8],
            "timings_ms": {"wait_accepted": 5.0, "branch_phase": 7.0}}
    records = [demo.RequestRecord(0, "a red circle", "device-0", demo.STATUS_OK, latency_ms=12.0, metadata=meta)]
    report = demo.build_report(records, {"g0": [0]}, demo.DemoConfig(tmp_path / "p", tmp_path / "o"), {})
    demo.print_report(report, tmp_path / "o")
    printed = capsys.readouterr().out
    assert "UNet evaluations: 4 used vs 4 independent" in printed and "(100 B per image;" in printed
    assert "latency ms: total p50 12 / p95 12; wait for Accepted p50 5; branch phase p50 7" in printed


class NoServer:
    """EdgeServerProcess's stand-in for the checks that must come first: starting a server fails the test."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the server was started before the inputs were checked")


@pytest.mark.parametrize("options, message", [
    ({"steps": 1001}, "steps must be in [0, 1000]"),
    ({"model": "MISSING"}, "model folder MISSING does not exist"),
    ({"adapter": "MISSING"}, "adapter folder MISSING does not exist"),
    ({"seed": 2**63 - 1}, "seed must be in [0, 2^63 - 1 - (prompts - 1)]"),
    ({"max_wait_ms": -1.0}, "max_wait_ms must be a finite number of milliseconds >= 0, got -1"),
    ({"max_wait_ms": float("nan")}, "max_wait_ms must be a finite number"),
    ({"out": "FULL"}, "exists and is not empty; pass --overwrite to replace it"),
    ({"negative_prompt": "x" * 1001}, "the negative prompt is 1001 characters long; the limit is 1000"),
])  # fmt: skip
def test_bad_inputs_are_refused_before_the_server_starts(options, message, tmp_path, monkeypatch):
    """--steps 1001, a missing --model or --adapter folder and a negative --max-wait-ms used to start the server
    (seconds to minutes) and load the device model before the run failed on them."""
    monkeypatch.setattr(demo, "EdgeServerProcess", NoServer)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n", encoding="utf-8")
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "keep.txt").write_text("x")
    options = {k: str(tmp_path / v) if v in ("MISSING", "FULL") else v for k, v in options.items()}
    message = message.replace("MISSING", str(tmp_path / "MISSING"))
    out = options.pop("out", tmp_path / "out")
    with pytest.raises(ValueError) as info:
        demo.run_demo(prompts, out, n_clients=1, **{"model": "tiny", **options})
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_check_inputs_reads_the_prompts_once_for_the_whole_run(prompts, tmp_path, monkeypatch):
    """The demo read its prompts file twice: once for the seed range check, once again for the run."""
    import sage_core.generate

    reads: list[Path] = []
    real = sage_core.generate.read_prompt_file
    monkeypatch.setattr(sage_core.generate, "read_prompt_file", lambda path: reads.append(path) or real(path))
    config = demo.DemoConfig(prompts, tmp_path / "out", n_clients=1, model="tiny")
    checked = demo.check_inputs(config)
    with pytest.raises(demo.DemoIncomplete):
        demo.run_demo_config(config, prompts=checked)
    assert reads == [prompts] and checked == ["a red circle", "a blue square"]


def test_the_cli_exits_2_for_a_non_empty_out_folder(prompts, tmp_path):
    """A command-line mistake found before any work: one 'error:' line and exit 2, as the other CLIs do (was 1)."""
    from typer.testing import CliRunner

    from device_client.cli import main

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    res = CliRunner().invoke(main, ["demo", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--model", "tiny"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [f"error: {tmp_path / 'o'} exists and is not empty; pass --overwrite "
                                               "to replace it"]


def test_the_cli_reads_the_prompts_once(prompts, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import sage_core.generate
    from device_client.cli import main

    reads: list[Path] = []
    real = sage_core.generate.read_prompt_file
    monkeypatch.setattr(sage_core.generate, "read_prompt_file", lambda path: reads.append(path) or real(path))
    res = CliRunner().invoke(main, ["demo", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--model", "tiny"])
    assert res.exit_code == 1 and reads == [prompts], res.output
