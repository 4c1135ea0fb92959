"""The UNet-variants driver: each variant's own process and time limit, its failure reason or where it was when
stopped, and the fastest one's flags (no timing assertions)."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.bench_variants import Outcome, best, main, parse_variant, where_time_went
from benchmarks.stacks import format_stacks, innermost_frames, sample_stacks, split_dumps, telling_frame

DUMP = """Thread 0x00007f83937fe6c0 (most recent call first):
  File "/usr/lib/python3.12/threading.py", line 355 in wait
  File "/usr/lib/python3.12/threading.py", line 1001 in run

Current thread 0x00007f847e43db80 (most recent call first):
  File "/usr/lib/python3.12/threading.py", line 327 in wait
  File "/venv/lib/python3.12/site-packages/torch/_inductor/async_compile.py", line 912 in wait
  File "/srv/app/sage_core/unet_buckets.py", line 248 in warm_buckets
"""


def test_variants_parse_with_their_own_limits_and_refuse_what_is_not_one():
    assert parse_variant("eager=") == parse_variant("eager=  ")
    assert parse_variant("fp8@400=--unet-compile default --unet-quantize fp8").limit_s == 400.0
    assert parse_variant("eager=").limit_s is None
    assert parse_variant("x=--a 1 \n   --b 'two words'").flags == "--a 1 --b 'two words'"
    for bad in ("no equals sign", "=--unet-compile default", "a b=--x", "fp8@0=--x", "q=--model 'unclosed"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_the_working_threads_frames_are_kept_and_the_telling_one_named():
    frames = innermost_frames(DUMP)
    assert len(frames) == 3 and "async_compile.py" in frames[1]  # the deepest stack, innermost first
    assert telling_frame(frames) == 'File "torch/_inductor/async_compile.py", line 912 in wait'
    assert innermost_frames("") == [] and telling_frame([]) == "no stack dump"


def test_periodic_dumps_are_split_and_counted():
    log = "loading\nStack sample 1:\n" + DUMP + "more output\nStack sample 2:\n" + DUMP + \
        "Fatal Python error: Aborted\n\n" + DUMP.replace("line 912", "line 913")
    dumps = split_dumps(log)
    assert len(dumps) == 3 and dumps[0].startswith("Stack sample 1") and dumps[2].startswith("Fatal")
    samples = [telling_frame(innermost_frames(d)) for d in dumps]
    o = Outcome("fp8", "", "timed out", 90, 90, samples=samples)
    assert where_time_went(o) == ('  stack samples: 2 x File "torch/_inductor/async_compile.py", line 912 in wait; '
                                  '1 x File "torch/_inductor/async_compile.py", line 913 in wait')
    assert split_dumps("no dumps") == [] and where_time_went(Outcome("a", "", "ok", 1, 1)) == ""


def test_a_run_samples_its_own_stacks_in_faulthandlers_layout():
    import io
    import threading
    import time

    here = format_stacks({threading.get_ident(): sys._getframe()})
    assert here.startswith("Thread 0x") and "in test_a_run_samples_its_own_stacks_in_faulthandlers_layout" in here
    assert innermost_frames(here)[0].startswith('File "') and __file__ in innermost_frames(here)[0]
    stream = io.StringIO()
    stop = sample_stacks(0.05, stream)
    time.sleep(0.3)
    stop.set()
    dumps = split_dumps(stream.getvalue())
    assert len(dumps) >= 2
    assert any("test_a_run_samples_its_own_stacks" in "".join(innermost_frames(d)) for d in dumps)


def test_the_fastest_finished_variant_wins():
    runs = [Outcome("a", "", "ok", 1, 9, ms_per_sample=2.0), Outcome("b", "-x", "timed out", 9, 9),
            Outcome("c", "-y", "ok", 1, 9, ms_per_sample=1.5)]
    assert best(runs).name == "c" and best(runs[1:2]) is None


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [1, 3])
def test_cpu_run_times_one_variant_stops_a_slow_one_and_says_why_one_fails(tmp_path, parallel):
    out, flags = tmp_path / "variants.json", tmp_path / "best.txt"
    cache = tmp_path / "cache"
    result = main(["--model", "tiny", "--rows", "4", "--repeats", "1", "--json", str(out), "--stack-dumps-every", "0.5",
                   "--parallel", str(parallel), "--kernel-profiles", "--plot", str(tmp_path / "kernels.png"),
                   "--best-flags", str(flags),
                   "--variant", f"stuck@8=--unet-compile default --compile-cache {cache}",  # compiling at 8 s
                   "--variant", "eager=",
                   "--variant", "fp8=--unet-compile default --unet-quantize fp8"])
    stuck, eager, fp8 = result["variants"]
    assert stuck["status"] == "timed out" and stuck["limit_s"] == 8.0 and stuck["ms_per_sample"] is None
    assert stuck["stack"] and all(f.startswith("File ") for f in stuck["stack"])  # faulthandler's dump was read
    assert len(stuck["samples"]) >= 2  # periodic samples and the last dump
    assert eager["status"] == "ok" and eager["ms_per_sample"] > 0 and eager["worker_start_s"] > 0
    assert fp8["status"] == "failed" and "fp8 needs an NVIDIA GPU" in fp8["reason"]
    assert result["best"] == "eager" and flags.read_text() == "\n"  # the defaults: no flags
    assert json.loads(out.read_text())["variants"][1]["name"] == "eager"
    assert (tmp_path / "variant_eager.json").is_file()
    assert "convolution" in eager["kinds"] and (tmp_path / "variant_eager.kernels.txt").is_file()
    assert (tmp_path / "kernels.png").stat().st_size > 0  # the one variant timed, by kind
    assert (tmp_path / "variant_stuck.log").is_file()
    eager_log = (tmp_path / "variant_eager.log").read_text()
    if parallel > 1:  # compiled (here: started) side by side first, then timed alone by the process that compiled it
        assert eager["compile_s"] > 0 and sorted(o["name"] for o in result["compiled"]) == ["eager", "fp8", "stuck"]
        assert eager_log.count("worker ready; waiting for") == 1 and (tmp_path / "variant_eager.go").is_file()
        assert eager["seconds"] < eager["compile_s"] + 30  # the timing did not start a worker again
    else:
        assert eager["compile_s"] is None and "waiting for" not in eager_log


def test_bad_arguments_are_refused_before_anything_runs(capsys):
    for argv in ([], ["--variant", "a=", "--variant", "a=--x"], ["--variant", "nope"], ["--variant", "a=",
                                                                                       "--rows", "0"]):
        with pytest.raises(SystemExit):
            main(argv)
    assert "error:" in capsys.readouterr().err


def test_a_run_that_fails_after_its_timing_keeps_the_timing(tmp_path):
    # the variant's own --kernel-profile (last on the command line) names a folder that does not exist: the run
    # times the UNet, writes its JSON, then fails opening the profile's file
    result = main(["--model", "tiny", "--rows", "2", "--repeats", "1", "--json", str(tmp_path / "v.json"),
                   "--variant", f"late=--kernel-profile {tmp_path / 'missing' / 'k.txt'}"])
    (late,) = result["variants"]
    assert late["status"] == "ok" and late["ms_per_sample"] > 0 and result["best"] == "late"
    assert late["reason"].startswith("failed after its timing: ") and "No such file" in late["reason"]


def test_no_finished_variant_leaves_no_best_flags(tmp_path):
    # scripts/gpu_session.sh runs bench_serving with the flags file's contents whenever it is not empty: an
    # earlier run's winner used to stay there when no variant of this run finished
    flags = tmp_path / "best.txt"
    flags.write_text("--unet-compile max-autotune\n", encoding="utf-8")
    result = main(["--model", "tiny", "--rows", "2", "--repeats", "1", "--json", str(tmp_path / "v.json"),
                   "--best-flags", str(flags), "--variant", "bad=--no-such-flag"])
    assert result["variants"][0]["status"] == "failed" and result["best"] is None
    assert not flags.exists()


def test_a_waiting_run_ends_when_its_driver_does(tmp_path):
    # bench_variants' ready runs wait for their turn in their own session; if the driver is killed (a lease's time
    # limit), they must not wait for ever holding the GPU's memory
    import subprocess
    import time

    ready = tmp_path / "v.json"
    driver = (f"import subprocess, sys; subprocess.Popen([sys.executable, '-m', 'benchmarks.bench_serving', "
              f"'--model', 'tiny', '--batches', '', '--json', {str(ready)!r}, '--wait-for', "
              f"{str(tmp_path / 'never')!r}], start_new_session=True, stdout=open({str(tmp_path / 'log')!r}, 'w'), "
              f"stderr=subprocess.STDOUT)\n"
              f"import pathlib, time\n"
              f"while not pathlib.Path({str(ready)!r}).is_file(): time.sleep(0.1)")
    subprocess.run([sys.executable, "-c", driver], check=True, timeout=90)  # ends once the run is ready
    deadline = time.monotonic() + 90
    log = ""
    while time.monotonic() < deadline and "ended before" not in log:
        time.sleep(0.5)
        log = (tmp_path / "log").read_text()
    assert ready.is_file() and "worker ready; waiting for" in log
    assert "error: the process that started this run ended before" in log
