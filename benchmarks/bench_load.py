"""Load test of the edge server + device clients: every request must end with an image or a clear error.

    python -m benchmarks.bench_load                               # starts a tiny-model server, 64 requests
    python -m benchmarks.bench_load --requests 200 --concurrency 32 --branch
    python -m benchmarks.bench_load --server 127.0.0.1:50051      # an already running server
    python -m benchmarks.bench_load --server-arg --max-batch --server-arg 8   # a flag for the started server

Each of `concurrency` simulated devices (own channel, own client id) takes requests from one queue. By default a
device only fetches, verifies (sha256, frame table, fingerprint) and decodes the latent, so the load is on the
server; `--branch` also runs the branch phase and the VAE on the device. Prints the counts (ok, each error code,
lost = requests that never ended) and the latency percentiles of the successful requests; exits 1 if any request
was lost or none succeeded, 2 for a bad setting or input (before a server starts).
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/bench_load.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_client.client import DeviceClient, DeviceError, DeviceModel  # noqa: E402
from device_client.config import ADAPTER_NONE, TINY_MODEL, DeviceConfig  # noqa: E402
from device_client.demo import check_model  # noqa: E402
from device_client.server_process import EdgeServerProcess, ServerStartError  # noqa: E402
from sage_core.generate import read_prompt_file  # noqa: E402
from sage_core.models import ModelError  # noqa: E402
from sage_core.names import MODEL_CONFIG_HELP  # noqa: E402

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "examples" / "prompts.txt"
LOST = "LOST"


SERVER_ARG = "--server-arg"


def attach_server_args(argv: Sequence[str]) -> list[str]:
    """`argv` with each `--server-arg VALUE` written `--server-arg=VALUE`: argparse would take a VALUE that starts
    with '-' (a server flag, `--server-arg --max-batch`) for an option of this command and refuse it."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        value = next(args, None) if arg == SERVER_ARG else None
        out.append(arg if value is None else f"{SERVER_ARG}={value}")  # a last one without a value: argparse says so
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", help="host:port of a running edge server; default: start one (local Ray)")
    p.add_argument("--model", default=TINY_MODEL, help="model of the started server and the devices: 'tiny', "
                   "'default' (the shipped model), a pipeline folder or an SD v1.x .safetensors file")
    p.add_argument("--model-config", help=MODEL_CONFIG_HELP)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--branch", action="store_true", help="also run the branch phase + VAE on the device")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request deadline (s)")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--max-wait-ms", type=float, default=100.0, help="batching window of the started server")
    p.add_argument(SERVER_ARG, action="append", default=[],
                   help="an argument for the started server (repeat for each: --server-arg --max-batch --server-arg 8)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON too")
    return p.parse_args(attach_server_args(argv))


def device_config(args: argparse.Namespace, address: str | None = None) -> DeviceConfig:
    """What every simulated device runs and asks for; ValueError for a setting it refuses (steps, timeout)."""
    return DeviceConfig(server=address, model=args.model, model_config=args.model_config, adapter="none",
                        steps=args.steps, timeout_s=args.timeout)  # fmt: skip


def check_inputs(args: argparse.Namespace) -> list[str]:
    """The prompts, once the settings are known good; ValueError naming what is wrong, before a server starts."""
    if args.requests < 1 or args.concurrency < 1:
        raise ValueError("--requests and --concurrency must be >= 1")
    if not (math.isfinite(args.max_wait_ms) and args.max_wait_ms >= 0):
        raise ValueError(f"--max-wait-ms must be a finite number >= 0, got {args.max_wait_ms:g}")
    device_config(args, args.server)
    check_model(args.model, ADAPTER_NONE, args.model_config)  # ModelError, a ValueError: the devices load it too
    return read_prompt_file(args.prompts)


def run_load(address: str, model: DeviceModel, args: argparse.Namespace, prompts: list[str]) -> dict:
    """Fire `args.requests` requests from `args.concurrency` devices; return counts and latencies."""
    config = device_config(args, address)
    todo: queue.Queue[int] = queue.Queue()
    for i in range(args.requests):
        todo.put(i)
    status: list[str] = [LOST] * args.requests
    latency: list[float] = [0.0] * args.requests
    messages: dict[str, str] = {}

    def device(d: int) -> None:
        with DeviceClient(replace(config, client_id=f"load-{d}"), model) as client:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                try:
                    prompt = prompts[i % len(prompts)]
                    if args.branch:
                        client.generate(prompt, seed=i)
                    else:
                        client.request_latent(prompt, seed=i)
                    status[i] = "OK"
                except DeviceError as exc:
                    status[i] = exc.code
                    messages.setdefault(exc.code, exc.message)
                except Exception as exc:  # noqa: BLE001 - counted, never lost
                    status[i] = f"CLIENT_{type(exc).__name__}"
                    messages.setdefault(status[i], str(exc))
                latency[i] = (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    threads = [threading.Thread(target=device, args=(d,), daemon=True) for d in range(args.concurrency)]
    for t in threads:
        t.start()
    per_request = config.connect_timeout_s + config.timeout_s  # reaching the server is not in --timeout
    deadline = time.monotonic() + per_request * (args.requests / args.concurrency + 2)
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    wall = time.perf_counter() - t0
    counts = Counter(status)
    ok_lat = [latency[i] for i in range(args.requests) if status[i] == "OK"]
    pct = {f"p{q}": float(np.percentile(ok_lat, q)) if ok_lat else None for q in (50, 95, 99)}  # None: no sample
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "ok": counts.get("OK", 0),
        "errors": {k: v for k, v in sorted(counts.items()) if k not in ("OK", LOST)},
        "lost": counts.get(LOST, 0),
        "error_examples": messages,
        "latency_ms": pct,
        "wall_s": wall,
        "throughput_rps": args.requests / wall if wall else 0.0,
    }


def print_summary(summary: dict) -> None:
    """The counts, the latencies of the successful requests (or that there were none) and each error's message."""
    errors = " ".join(f"{k}={v}" for k, v in summary["errors"].items())
    print(f"requests={summary['requests']} ok={summary['ok']} {errors + ' ' if errors else ''}lost={summary['lost']}")
    lat = summary["latency_ms"]
    latency = (f"latency ms p50={lat['p50']:.0f} p95={lat['p95']:.0f} p99={lat['p99']:.0f}" if summary["ok"]
               else "latency: no request succeeded")  # fmt: skip
    print(f"{latency}; {summary['throughput_rps']:.2f} requests/s ended over {summary['wall_s']:.1f} s")
    for code, message in summary["error_examples"].items():
        print(f"  {code}: {message}")


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    try:
        prompts = check_inputs(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    try:
        summary = run_with_server(args, prompts)
    except (ServerStartError, ModelError) as exc:  # the server did not come up, the weights did not load
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 1 if summary["lost"] or not summary["ok"] else 0


def run_with_server(args: argparse.Namespace, prompts: list[str]) -> dict:
    """run_load against `--server`, or against an edge server started here (stopped at the end)."""
    server = None
    if args.server is None:
        server_args = ["--max-wait-ms", f"{args.max_wait_ms:g}", *args.server_arg]
        server = EdgeServerProcess(args.model, server_args, model_config=args.model_config)
        server.launch()
    try:
        model = DeviceModel.load(device_config(args))
        address = server.wait_listening() if server is not None else args.server
        return run_load(address, model, args, prompts)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
