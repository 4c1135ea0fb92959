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
    assert json.loads((out / "report.json").read_text())["counts"]["ok"] == 0


def test_the_cli_exits_1_when_requests_fail(prompts, tmp_path):
    from typer.testing import CliRunner

    from device_client.cli import main

    res = CliRunner().invoke(main, ["demo", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--model", "tiny"])
    assert res.exit_code == 1, res.output
    assert "error: 2 of 2 requests ended without an image" in res.output


class SlowServer:
    """EdgeServerProcess's stand-in: starts at once, listens on a made-up address."""

    def __init__(self, model: str, args: tuple, start_timeout_s: float) -> None:
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
