"""The benchmark command lines: a setting they cannot run, a missing input or an output path they cannot write is
refused with one line `error: ...` and exit status 2 before any work, never a traceback at the end of the run."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from training.grouped_dataset import COCO_CAPTIONS

# bench_policies reads the shared COCO captions, which a clean clone elsewhere does not have beside it
NEEDS_COCO = pytest.mark.skipif(not COCO_CAPTIONS.is_file(), reason="shared COCO captions not present")


def refused(main, argv: list[str], capsys) -> str:
    """Run a benchmark's main on `argv`; it must exit 2 with one `error:` line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # argparse's 'prog: error: ...' or the benchmark's own 'error: ...'
    assert last.startswith("error: ") or ": error: " in last, err
    return last


def test_write_json_leaves_no_part_file_behind(tmp_path):
    """A failed write (here: the path is a folder) used to leave `<path>.part` next to it."""
    from benchmarks.results import write_json

    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(OSError):
        write_json({"ms": 1.0}, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_file_refuses_folders_and_unwritable_paths(tmp_path):
    from benchmarks.results import output_file

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for bad in (str(tmp_path), f"{tmp_path}/new/", str(blocker / "r.json")):
        with pytest.raises(argparse.ArgumentTypeError):
            output_file(bad)
    assert output_file(str(tmp_path / "new" / "r.json")) == tmp_path / "new" / "r.json"
    assert output_file(str(blocker)) == blocker  # an existing file is replaced whole


@pytest.mark.parametrize("argv", [["--json", "."], ["--trajectories", "x"], ["--trajectories", "0"],
                                  ["--steps", "0"], ["--repeats", "0"], ["--device", "cuda:7"]])
def test_step_loop_refuses_at_once(argv, capsys, monkeypatch):
    import torch

    from benchmarks.bench_step_loop import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused(main, argv, capsys)


def test_simulation_refuses_a_json_folder_before_the_run(tmp_path, capsys):
    """Used to simulate every request, then fail with IsADirectoryError."""
    from benchmarks.bench_simulation import main

    assert "is a folder" in refused(main, ["--requests", "10", "--embedder", "hashed", "--json", str(tmp_path)],
                                    capsys)


@pytest.mark.parametrize("argv, message", [(["--prompts", "0"], "--prompts"), (["--window", "0"], "--window"),
                                           (["--cache-mb", "-1"], "--cache-mb"),
                                           (["--embedder", "nope", "--prompts", "4"], "prompts.embedder")])
def test_policies_refuse_with_one_line(argv, message, capsys):
    from benchmarks.bench_policies import main

    assert message in refused(main, argv, capsys)


@NEEDS_COCO
def test_policies_refuse_more_prompts_than_the_dataset_holds(capsys):
    from benchmarks.bench_policies import main

    assert "holds only" in refused(main, ["--embedder", "hashed", "--prompts", "99999999"], capsys)


@NEEDS_COCO
def test_policies_run_on_the_hashed_embedder(tmp_path, capsys):
    """--embedder lets it run without the MiniLM package (it was fixed to MiniLM, a traceback without it)."""
    from benchmarks.bench_policies import main

    out = tmp_path / "p.json"
    result = main(["--embedder", "hashed", "--prompts", "40", "--window", "8", "--steps", "10", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"] and len(result["rows"]) == 4


@pytest.mark.parametrize("argv, message", [(["--bins", "x"], "--bins"), (["--bins", "0.5"], "two increasing"),
                                           (["--bins", "0.9,0.5"], "two increasing"), (["--ks", "0,40"], "--ks"),
                                           (["--threads", "0"], "--threads"), (["--pairs", "0"], "--pairs")])
def test_calibrate_depth_refuses_before_loading_the_model(argv, message, capsys):
    from benchmarks.calibrate_depth import main

    assert message in refused(main, argv, capsys)


def test_calibrate_depth_always_tries_independent_sampling():
    from benchmarks.calibrate_depth import parse_args

    assert parse_args(["--ks", "12,6"]).ks == [0, 6, 12]


def test_coco_stream_one_line_for_a_missing_config_or_an_out_folder(tmp_path, capsys):
    from benchmarks.coco_stream import main

    assert "does not exist" in refused(main, ["--config", str(tmp_path / "none.yaml")], capsys)
    (tmp_path / "s.npz").mkdir()
    assert "is a folder" in refused(main, ["--out", str(tmp_path / "s.npz")], capsys)


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--repeats", "0"], ["--model", "/no/such/model"]])
def test_default_model_bench_refuses_with_one_line(argv, capsys):
    from benchmarks.bench_default_model import main

    refused(main, argv, capsys)


def test_default_model_verdict_agrees_with_the_best_time_recorded():
    """10.004 s was recorded as 10.0 (printed 10.00 s) yet judged 'NOT met' on the unrounded time."""
    from benchmarks.bench_default_model import summarize

    res = summarize([10.004, 11.0], steps=30, guidance=7.5, threads=2)
    assert res["seconds_best"] == 10.0 and res["meets_goal"]


@pytest.mark.parametrize("argv, message", [(["--prompts", "/no/such/prompts.txt"], "does not exist"),
                                           (["--steps", "-1"], "steps"), (["--timeout", "0"], "timeout"),
                                           (["--max-wait-ms", "-1"], "--max-wait-ms"),
                                           (["--max-wait-ms", "nan"], "--max-wait-ms"),
                                           (["--model", "/no/such/model"], "model folder /no/such/model does not")])
def test_load_bench_refuses_before_starting_a_server(argv, message, capsys, monkeypatch):
    import benchmarks.bench_load as bench_load

    monkeypatch.setattr(bench_load, "EdgeServerProcess", None)  # starting one would fail the test
    assert bench_load.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_codec_refuses_a_json_folder(tmp_path, capsys):
    from benchmarks.bench_codec import main

    refused(main, ["--quick", "--no-images", "--json", str(tmp_path)], capsys)



@pytest.mark.parametrize("module, shown", [("bench_simulation", "requests simulated (default: 1000000)"),
                                           ("bench_policies", "(default: 8192)")])
def test_help_shows_the_defaults_of_a_long_run(module, shown, capsys):
    """A bare run simulates a million requests / embeds 8192 prompts; --help used to hide both defaults."""
    import importlib

    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit):
        main(["--help"])
    assert shown in " ".join(capsys.readouterr().out.split())


def test_default_model_bench_reports_each_run_as_it_ends(capsys):
    """Minutes of runs used to pass in silence until the final summary."""
    from benchmarks.bench_default_model import timed_runs

    seeds: list[int] = []
    times = timed_runs(seeds.append, 2)
    assert seeds == [0, 1, 2] and len(times) == 2  # the warm-up is run but not counted
    assert [line.split(":")[0] for line in capsys.readouterr().err.splitlines()] == ["warm-up", "run 1/2", "run 2/2"]


class UnreachableClient:
    """DeviceClient's stand-in for a server that never answers: each request fails once its connect timeout
    (longer than the request's own --timeout) has passed."""

    def __init__(self, config, model) -> None:
        self.config = config

    def __enter__(self) -> UnreachableClient:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def request_latent(self, prompt: str, seed: int) -> None:
        from device_client.client import DeviceError

        time.sleep(0.2)
        raise DeviceError("UNAVAILABLE", "unreachable within the connect timeout")


def test_load_counts_a_request_waiting_to_connect_as_an_error_not_lost(monkeypatch):
    """The wait for the devices allowed --timeout per request only, so with a server out of reach a request still
    inside its 10 s connect timeout was reported LOST (and the bench exited 1)."""
    import benchmarks.bench_load as bench_load

    monkeypatch.setattr(bench_load, "DeviceClient", UnreachableClient)
    args = bench_load.parse_args(["--requests", "3", "--concurrency", "1", "--timeout", "0.05"])
    summary = bench_load.run_load("127.0.0.1:52251", None, args, ["a red circle"])
    assert summary["lost"] == 0 and summary["errors"] == {"UNAVAILABLE": 3}


class RefusingClient(UnreachableClient):
    """DeviceClient's stand-in for a server that refuses every request at once."""

    def request_latent(self, prompt: str, seed: int) -> None:
        from device_client.client import DeviceError

        raise DeviceError("RESOURCE_EXHAUSTED", "queue full")


def test_load_without_a_success_prints_no_latency_and_exits_1(monkeypatch, capsys):
    """A run in which every request failed printed 'latency ms p50=0 p95=0 p99=0' (and recorded 0.0) and exited 0."""
    from types import SimpleNamespace

    import benchmarks.bench_load as bench_load

    monkeypatch.setattr(bench_load, "DeviceClient", RefusingClient)
    monkeypatch.setattr(bench_load, "DeviceModel", SimpleNamespace(load=lambda config: None))
    assert bench_load.main(["--server", "127.0.0.1:52251", "--requests", "3", "--concurrency", "2", "--json"]) == 1
    out = capsys.readouterr().out
    assert "requests=3 ok=0 RESOURCE_EXHAUSTED=3 lost=0" in out and "latency: no request succeeded;" in out
    assert "p50=" not in out and '"p50": null' in out


def test_load_summary_of_successes_keeps_its_latencies(monkeypatch, capsys):
    import benchmarks.bench_load as bench_load

    class FastClient(UnreachableClient):
        def request_latent(self, prompt: str, seed: int) -> None:
            return None

    monkeypatch.setattr(bench_load, "DeviceClient", FastClient)
    args = bench_load.parse_args(["--requests", "2", "--concurrency", "1"])
    summary = bench_load.run_load("127.0.0.1:52251", None, args, ["a red circle"])
    bench_load.print_summary(summary)
    assert summary["ok"] == 2 and all(v is not None and v >= 0 for v in summary["latency_ms"].values())
    assert "latency ms p50=0 p95=0 p99=0;" in capsys.readouterr().out


class FailingServer:
    """EdgeServerProcess's stand-in for a server that exits during its start."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.stopped = False

    def launch(self) -> None:
        return None

    def wait_listening(self) -> str:
        from device_client.server_process import ServerStartError

        raise ServerStartError("edge server exited with code 2: unknown option --bogus")

    def stop(self) -> int:
        return 2


def test_load_takes_server_flags_with_or_without_equals():
    """`--server-arg --max-batch` was refused (argparse took the server's flag for one of bench_load's): only
    `--server-arg=--max-batch` worked."""
    from benchmarks.bench_load import parse_args

    args = parse_args(["--server-arg", "--max-batch", "--server-arg", "8", "--server-arg=--bogus", "--requests", "3"])
    assert args.server_arg == ["--max-batch", "8", "--bogus"] and args.requests == 3


def test_load_reports_a_server_that_did_not_start_in_one_line(monkeypatch, capsys):
    """A server that failed to start (e.g. a bad --server-arg) ended the bench with a traceback."""
    from types import SimpleNamespace

    import benchmarks.bench_load as bench_load

    monkeypatch.setattr(bench_load, "EdgeServerProcess", FailingServer)
    monkeypatch.setattr(bench_load, "DeviceModel", SimpleNamespace(load=lambda config: None))
    assert bench_load.main(["--server-arg=--bogus"]) == 1
    err = capsys.readouterr().err
    assert err == "error: edge server exited with code 2: unknown option --bogus\n"
