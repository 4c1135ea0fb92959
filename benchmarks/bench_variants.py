"""Shared-phase UNet variants side by side: each variant is a set of edge-server flags, timed by
`benchmarks.bench_serving --unet-sweep` in a process of its own (the worker's own compile, warm-up and compile cache,
as the server would start with those flags), under a time limit. A variant still running at its limit is stopped
with SIGABRT, so that Python's faulthandler prints where it was, and the next variant gets the rest of the budget.
Every run also prints its stacks every --stack-dumps-every seconds: the JSON keeps each sample's telling frame
(which compile step the time went to) and the last dump's innermost frames.

With --parallel N the variants first compile N at a time (each run starts a worker, which compiles and warms its
buckets, then waits with the GPU idle), then those that compiled are timed one after another in the processes that
compiled them, alone on the GPU: several compiles fit in the time of the slowest, and a timing costs seconds, not
another worker start (the fifth lease's timed runs spent 43 s of their 77 s starting a worker again from the compile
cache). The waiting processes hold their GPU memory until their turn.

On the H100 (one lease; the variants in order of priority):

    python -m benchmarks.bench_variants --model sd15-random --rows 128 --budget-s 400 --parallel 3 \\
        --variant "compiled=--unet-compile reduce-overhead --unet-buckets 64 --cudnn-benchmark" \\
        --variant "light=--unet-compile reduce-overhead --unet-buckets 64 --unet-compile-tuning light" \\
        --variant "fp8@300=--unet-compile reduce-overhead --unet-buckets 64 --cudnn-benchmark --unet-quantize fp8" \\
        --json $OUT/variants.json --best-flags $OUT/best_flags.txt

`--best-flags` writes the flags of the fastest variant that finished, for a follow-up
`python -m benchmarks.bench_serving $(cat best_flags.txt) --batches 32,64 ...` (whose worker then loads the
variant's compiled kernels from the compile cache instead of compiling again).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.results import write_json
from benchmarks.stacks import innermost_frames, split_dumps, telling_frame

ABORT_GRACE_S = 15.0  # after SIGABRT: time for faulthandler's dump before the process group is killed


@dataclass(frozen=True)
class Variant:
    """A name, the edge-server flags (bench_serving's spelling) it stands for, and its own time limit if any."""

    name: str
    flags: str
    limit_s: float | None = None


@dataclass
class Outcome:
    """What one variant's run gave: its UNet time, or why there is none."""

    name: str
    flags: str
    status: str  # "ok", "timed out", "failed", "not run"
    seconds: float  # the run's wall time, model loading and compiling included
    limit_s: float
    compile_s: float | None = None  # --parallel: seconds until its worker was ready (compiled beside the others)
    ms_per_sample: float | None = None
    worker_start_s: float | None = None
    unet_warmup: str = ""
    reason: str = ""  # failed: the run's last error line
    stack: list[str] = field(default_factory=list)  # timed out: the innermost frames of faulthandler's last dump
    # the telling frame of each periodic stack dump (--stack-dumps-every apart) and of the last one: where the run
    # spent its time, sampled
    samples: list[str] = field(default_factory=list)
    kinds: dict[str, float] = field(default_factory=dict)  # --kernel-profiles: ms per sample by kind of kernel


def parse_variant(text: str) -> Variant:
    """'fp8@400=--unet-compile default --unet-quantize fp8' -> Variant (at most 400 s; without '@SECONDS',
    --limit-s); 'eager=' is the server's defaults."""
    head, sep, flags = text.partition("=")
    match = re.fullmatch(r"([A-Za-z0-9_.+-]+)(?:@(\d+(?:\.\d+)?))?", head)
    if not sep or not match:
        raise ValueError(f"a variant is NAME=FLAGS or NAME@SECONDS=FLAGS, with a NAME of letters, digits, '_', '.', "
                         f"'+' or '-': {text!r}")
    try:
        words = shlex.split(flags)
    except ValueError as exc:
        raise ValueError(f"variant {match[1]}: its flags do not parse ({exc}): {flags!r}") from None
    limit = float(match[2]) if match[2] else None
    if limit is not None and limit <= 0:
        raise ValueError(f"variant {match[1]}: its time limit must be positive seconds")
    return Variant(match[1], shlex.join(words), limit)  # one space between flags


def last_error(log: str) -> str:
    """The run's last line that says what went wrong (an 'error: ...' line, or a traceback's last line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line
    return lines[-1] if lines else "no output"


def no_core_dumps() -> None:
    """In the child before it runs: SIGABRT writes no core file (a GPU process's would be gigabytes)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def command(variant: Variant, args: argparse.Namespace, json_path: Path, go_path: Path | None) -> list[str]:
    """bench_serving starting the variant's worker (compiling, warming its buckets), then timing its UNet at --rows
    rows (and, with --kernel-profiles, profiling it there); with `go_path` it waits for that file in between. It
    runs no window."""
    profile = ["--kernel-profile", str(json_path.with_suffix(".kernels.txt"))] if args.kernel_profiles else []
    wait = ["--wait-for", str(go_path)] if go_path else []
    return [sys.executable, "-m", "benchmarks.bench_serving", "--model", args.model, "--dtype", args.dtype,
            "--batches", "", "--repeats", str(args.repeats), "--unet-sweep", str(args.rows), *profile, *wait,
            "--stack-dumps-every", str(args.stack_dumps_every), "--json", str(json_path), *shlex.split(variant.flags)]


class Run:
    """One variant's process (its own process group, so that its compile workers go with it), its deadline, and
    the stop: SIGABRT (faulthandler dumps every thread's stack), SIGKILL to the group after ABORT_GRACE_S. With
    `wait` the process stops once its worker is ready (the compile phase's outcome) until `go` lets it time."""

    def __init__(self, variant: Variant, args: argparse.Namespace, limit_s: float, logs: Path, wait: bool) -> None:
        self.variant, self.rows, self.limit_s, self.timing = variant, args.rows, limit_s, not wait
        stem = f"variant_{variant.name}"
        self.log_path, self.json_path = logs / f"{stem}.log", logs / f"{stem}.json"
        self.go_path = logs / f"{stem}.go" if wait else None
        for stale in (self.json_path, self.go_path):
            if stale:
                stale.unlink(missing_ok=True)
        env = os.environ | {"PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"}  # SIGABRT: a last dump
        if args.parallel > 1 and "TORCHINDUCTOR_COMPILE_THREADS" not in env:  # share the cores, not N x all of them
            env["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parallel))
        self.start = time.perf_counter()
        with open(self.log_path, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen(command(variant, args, self.json_path, self.go_path), stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                         preexec_fn=no_core_dumps)
        self.aborted_at: float | None = None

    def poll(self) -> Outcome | None:
        """The outcome once the process has ended (stopping it at its deadline), or, before `go`, once its worker
        is ready (the process waits on); None while it runs."""
        now = time.perf_counter()
        if not self.timing and self.proc.poll() is None and self.aborted_at is None and self._worker_ready():
            out = Outcome(self.variant.name, self.variant.flags, "ok", round(now - self.start, 1),
                          round(self.limit_s, 1))
            read_figures(out, self.json_path, None)
            return out
        if self.proc.poll() is None:
            if self.aborted_at is None and now - self.start >= self.limit_s:
                self.aborted_at = now
                self.proc.send_signal(signal.SIGABRT)
            if self.aborted_at is None or now - self.aborted_at < ABORT_GRACE_S:
                return None
        self.stop()
        return self._outcome(now - self.start)

    def _worker_ready(self) -> bool:
        """Whether the run's JSON says its worker has started (bench_serving writes it before it waits)."""
        try:
            return "worker_start_s" in json.loads(self.json_path.read_text(encoding="utf-8")).get("environment", {})
        except (OSError, ValueError):
            return False

    def go(self, limit_s: float) -> None:
        """Let a ready process time its UNet, within `limit_s` from now."""
        self.timing, self.limit_s, self.start = True, limit_s, time.perf_counter()
        if self.go_path:
            self.go_path.touch()

    def stop(self) -> None:
        """Kill what is left of the process group (compile workers too): after the run ended or overran its
        deadline, or for a ready run whose turn did not come."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # what is left of the group: compile workers
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def _outcome(self, seconds: float) -> Outcome:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        v = self.variant
        out = Outcome(v.name, v.flags, "ok", round(seconds, 1), round(self.limit_s, 1))
        dumps = [innermost_frames(d) for d in split_dumps(text)]
        out.samples = [telling_frame(frames) for frames in dumps]
        if self.aborted_at is not None:
            out.status, out.stack = "timed out", dumps[-1] if dumps else []
        elif self.proc.returncode != 0 or not self.json_path.is_file():
            out.status, out.reason = "failed", last_error(text)
        read_figures(out, self.json_path, self.rows if self.timing else None)
        if out.status != "ok" and out.ms_per_sample is not None:  # it ended after its timing (in its profile)
            where = out.reason or f"it was in {telling_frame(out.stack)}"
            out.status, out.reason = "ok", f"{out.status} after its timing: {where}"
        return out


def read_figures(out: Outcome, json_path: Path, rows: int | None) -> None:
    """Into `out`: what the run's JSON holds (its worker's start, and with `rows` its UNet time at those rows and
    its kernel time by kind), as far as the run got; nothing when there is no readable JSON."""
    try:
        result = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    env = result.get("environment", {})
    if "worker_start_s" in env:
        out.worker_start_s = round(float(env["worker_start_s"]), 1)
    out.unet_warmup = env.get("unet_warmup", "")
    if rows is not None and str(rows) in result.get("unet_sweep", {}):
        out.ms_per_sample = float(result["unet_sweep"][str(rows)])
    out.kinds = result.get("kernel_profile", {}).get("kinds_ms_per_sample", {})


def run_all(variants: list[Variant], args: argparse.Namespace, logs: Path, deadline: float, parallel: int,
            timing: bool) -> tuple[dict[str, Outcome], dict[str, Run]]:
    """Run `variants` in order, `parallel` at a time, each within its limit and the overall `deadline`
    (perf_counter), printing each outcome as it comes. Returns the outcomes by name and, unless `timing`, the
    runs whose worker is ready, each waiting for its `go` (a ready run frees its place for the next variant)."""
    done: dict[str, Outcome] = {}
    ready: dict[str, Run] = {}
    waiting, running = list(variants), []
    while waiting or running:
        while waiting and len(running) < parallel:
            v = waiting.pop(0)
            left = deadline - time.perf_counter()
            if left < 1.0:
                done[v.name] = budget_spent(v)
                continue
            running.append(Run(v, args, min(v.limit_s or args.limit_s, left), logs, wait=not timing))
        for run in list(running):
            outcome = run.poll()
            if outcome is None:
                continue
            running.remove(run)
            done[outcome.name] = outcome
            if not run.timing and run.proc.poll() is None:
                ready[outcome.name] = run
            report(outcome, describe(outcome, None) if timing else describe_compile(outcome), args.verbose)
        time.sleep(0.2)
    return done, ready


def time_ready(runs: list[Run], args: argparse.Namespace, deadline: float) -> dict[str, Outcome]:
    """Let each ready run time its UNet, one after another (alone on the GPU), each within its limit and the
    overall `deadline`; returns their outcomes by name, printing each as it comes."""
    done: dict[str, Outcome] = {}
    for run in runs:
        v, left = run.variant, deadline - time.perf_counter()
        if left < 1.0:
            run.stop()
            done[v.name] = budget_spent(v)
            continue
        run.go(min(v.limit_s or args.limit_s, left))
        while (outcome := run.poll()) is None:
            time.sleep(0.1)
        done[v.name] = outcome
        report(outcome, describe(outcome, None), args.verbose)
    return done


def budget_spent(v: Variant) -> Outcome:
    """A variant the overall budget left no time for, said as it comes."""
    print(f"{v.name:<16} not run: the budget was spent", flush=True)
    return Outcome(v.name, v.flags, "not run", 0.0, 0.0, reason="the budget was spent")


def report(outcome: Outcome, line: str, verbose: bool) -> None:
    """Print an outcome's line, and where its time went when it timed out (always with --verbose)."""
    print(line, flush=True)
    if outcome.status == "timed out" or verbose:
        print(where_time_went(outcome), flush=True)


def best(outcomes: list[Outcome]) -> Outcome | None:
    """The fastest variant that finished."""
    done = [o for o in outcomes if o.ms_per_sample is not None]
    return min(done, key=lambda o: o.ms_per_sample) if done else None


def describe(o: Outcome, reference: Outcome | None) -> str:
    """One table line."""
    if o.ms_per_sample is None:
        why = o.reason if o.status == "failed" else \
            f"no result within {o.limit_s:.0f} s; it was in {telling_frame(o.stack)}"
        return f"{o.name:<16} {'-':>8} {'-':>9} {o.seconds:>8.1f}  {o.status}: {why}"
    ratio = f"{o.ms_per_sample / reference.ms_per_sample:.3f}" if reference and reference.ms_per_sample else "-"
    compiled = f"first ready in {o.compile_s:.1f} s beside the others; " if o.compile_s is not None else ""
    return f"{o.name:<16} {o.ms_per_sample:>8.3f} {ratio:>9} {o.seconds:>8.1f}  ok ({compiled}worker start " \
           f"{o.worker_start_s:.1f} s){': ' + o.unet_warmup if o.unet_warmup else ''}" \
           f"{'; ' + o.reason if o.reason else ''}"


def describe_compile(o: Outcome) -> str:
    """One line for a compile-only run."""
    if o.status == "ok":
        return f"{o.name:<16} ready in {o.seconds:.1f} s{': ' + o.unet_warmup if o.unet_warmup else ''}"
    why = o.reason if o.status == "failed" else \
        f"not compiled within {o.limit_s:.0f} s; it was in {telling_frame(o.stack)}"
    return f"{o.name:<16} {o.status}: {why}"


def kernel_lines(outcomes: list[Outcome]) -> list[str]:
    """'compiled: convolution 0.812, attention 0.501, ...' for each variant with a kernel profile."""
    from benchmarks.kernel_profile import one_line

    return [f"{o.name:<16} {one_line(o.kinds)}" for o in outcomes if o.kinds]


def where_time_went(o: Outcome) -> str:
    """'  stack samples: 5 x File "torch/_inductor/...", ...' (the most frequent first), or '' without samples."""
    if not o.samples:
        return ""
    counts = Counter(o.samples).most_common()
    return "  stack samples: " + "; ".join(f"{n} x {frame}" for frame, n in counts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", default=[], help="NAME=FLAGS or NAME@SECONDS=FLAGS "
                        "(bench_serving's / the server's flags, 'eager=' for the defaults; SECONDS: its own time "
                        "limit); repeat, in order of priority")
    parser.add_argument("--model", default="sd15-random", help="sd15-random, tiny, default or a pipeline folder")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA), float32, float16, bfloat16")
    parser.add_argument("--rows", type=int, default=64, help="UNet batch timed (rows, CFG included)")
    parser.add_argument("--repeats", type=int, default=5, help="timed UNet forwards per variant")
    parser.add_argument("--stack-dumps-every", type=float, default=30.0, help="seconds between a run's stack "
                        "samples (0: only the one at its time limit)")
    parser.add_argument("--parallel", type=int, default=1, help="variants compiled at once (CPU work) before they "
                        "are timed one after another, each in the process that compiled it")
    parser.add_argument("--limit-s", type=float, default=600.0, help="most seconds one variant may take")
    parser.add_argument("--budget-s", type=float, default=3600.0, help="most seconds all variants may take")
    parser.add_argument("--logs", default=None, help="folder of each variant's output (default: beside --json)")
    parser.add_argument("--json", default=None, help="write the outcomes here")
    parser.add_argument("--verbose", action="store_true", help="print every variant's stack samples (by default "
                        "only those of one stopped at its limit)")
    parser.add_argument("--kernel-profiles", action="store_true", help="also profile each timed variant's UNet by "
                        "kernel (benchmarks.kernel_profile): a table beside its log, ms per sample by kind in the JSON")
    parser.add_argument("--plot", default=None, help="with --kernel-profiles: a PNG of every variant's kernel time "
                        "by kind beside its timed ms per sample")
    parser.add_argument("--goal-ms", type=float, default=None, help="draw this ms per sample on the plot")
    parser.add_argument("--best-flags", default=None, help="write the fastest finished variant's flags here")
    args = parser.parse_args(argv)
    if not args.variant:
        parser.error("give at least one --variant NAME=FLAGS")
    if min(args.rows, args.repeats, args.parallel) < 1 or min(args.limit_s, args.budget_s) <= 0 \
            or args.stack_dumps_every < 0:
        parser.error("--rows, --repeats and --parallel take positive whole numbers, --limit-s and --budget-s "
                     "positive seconds, --stack-dumps-every seconds >= 0")
    try:
        args.variants = [parse_variant(v) for v in args.variant]
    except ValueError as exc:
        parser.error(str(exc))
    names = [v.name for v in args.variants]
    if len(set(names)) != len(names):
        parser.error(f"variant names must differ: {', '.join(names)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Compile (--parallel > 1) and time the variants; returns what it printed as a dict."""
    args = parse_args(argv)
    if args.best_flags:  # an earlier run's winner must not outlive a run where none finishes (or that is cut short)
        Path(args.best_flags).unlink(missing_ok=True)
    logs = Path(args.logs or (Path(args.json).parent if args.json else tempfile.mkdtemp(prefix="bench_variants-")))
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget_s
    result: dict = {"settings": {k: v for k, v in vars(args).items() if k != "variants"}, "variants": []}
    print(f"UNet ms per sample at {args.rows} rows, model {args.model}; logs in {logs}", flush=True)
    compiled: dict[str, Outcome] = {}
    if args.parallel > 1:
        print(f"compiling {len(args.variants)} variants, {args.parallel} at a time", flush=True)
        compiled, ready = run_all(args.variants, args, logs, deadline, args.parallel, timing=False)
        result["compiled"] = [asdict(o) for o in compiled.values()]
        write_json(result, args.json)  # a lease cut short keeps the compile phase's findings
        print(f"{'variant':<16} {'ms':>8} {'vs 1st ok':>9} {'run s':>8}  outcome", flush=True)
        try:
            timed = time_ready([ready[v.name] for v in args.variants if v.name in ready], args, deadline)
        finally:
            for run in ready.values():
                run.stop()
    else:
        print(f"{'variant':<16} {'ms':>8} {'vs 1st ok':>9} {'run s':>8}  outcome", flush=True)
        timed, _ = run_all(args.variants, args, logs, deadline, 1, timing=True)
    outcomes = []
    for v in args.variants:
        o = timed.get(v.name) or compiled[v.name]
        if v.name in compiled and v.name in timed:
            o.compile_s = compiled[v.name].seconds
        outcomes.append(o)
    result["variants"] = [asdict(o) for o in outcomes]
    reference = next((o for o in outcomes if o.ms_per_sample is not None), None)
    print("\nside by side:", flush=True)
    for o in outcomes:
        print(describe(o, reference), flush=True)
    if any(o.kinds for o in outcomes):
        print(f"\nkernel time by kind, ms per sample at {args.rows} rows (variant_NAME.kernels.txt):", flush=True)
        print("\n".join(kernel_lines(outcomes)), flush=True)
        if args.plot:
            from benchmarks.kernel_profile import plot_kinds

            profiled = {o.name: (o.ms_per_sample, o.kinds) for o in outcomes if o.kinds and o.ms_per_sample}
            print(f"plot: {plot_kinds(profiled, args.plot, args.goal_ms, args.rows)}", flush=True)
    winner = best(outcomes)
    result["best"] = winner.name if winner else None
    if winner:
        print(f"fastest: {winner.name} ({winner.ms_per_sample:.3f} ms per sample): {winner.flags or '(defaults)'}")
        if args.best_flags:
            Path(args.best_flags).write_text(winner.flags + "\n", encoding="utf-8")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
