"""Validation against the real system: one workload file (prompts, arrival times, settings) replayed through a
real edge server and device clients on 127.0.0.1, and through the simulator; the two are compared on UNet
evaluations, bytes and latency.

    sage-sim workload simulation/configs/validation_tiny.yaml --out runs/sim/validation/workload.json
    sage-sim validate runs/sim/validation/workload.json --model tiny --out docs/results/simulation/validation \
        --overwrite

(`--overwrite` replaces only a previous `validate` folder, one with report.json; docs/simulation.md.)

`validate` starts `python -m edge_server serve` with the workload's settings (window -> --max-wait-ms, size cap
-> --max-batch, tau, group size, workers, steps, share, codec, and server.step_delay_ms -> the server's
--worker-step-delay-ms hook that emulates a slower accelerator), unless --server names a running one.
"""

from __future__ import annotations

import contextlib
import queue
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from sage_core.names import unet_samples_per_step
from simulation.config import ConfigError, SimConfig
from simulation.workload import Workload

if TYPE_CHECKING:
    from device_client.config import DeviceConfig

TOLERANCE = {"unet_evals": 0.10, "bytes_per_image": 0.10, "latency_p50_s": 0.25}


def server_args(cfg: SimConfig, model: str, model_config: str | None = None) -> list[str]:
    """edge_server CLI flags that reproduce the simulated server's settings (and run `model`, a single file with
    `model_config`'s configs)."""
    s, g, p = cfg.server, cfg.grouping, cfg.sampling
    configs = [] if model_config is None else ["--model-config", model_config]
    return [
        "--model", model,
        *configs,
        "--max-wait-ms", f"{s.window_s * 1000:g}",
        "--max-batch", str(s.max_window_requests),
        "--max-queue", str(max(256, 4 * s.max_window_requests)),
        "--tau", f"{g.tau:g}",
        "--max-group-size", str(g.max_group_size),
        "--num-workers", str(s.gpu_workers),
        "--ray-num-cpus", str(max(1, s.gpu_workers)),
        "--default-steps", str(p.steps),
        "--default-share", f"{p.share:g}",
        "--codecs", cfg.codec.mode,
        "--worker-step-delay-ms", f"{s.step_delay_ms:g}",
        "--sharing", g.sharing,
        "--cache-mb", f"{g.cache_mb:g}",
        "--log-level", "WARNING",
    ]  # fmt: skip


def policy_file(cfg: SimConfig, folder: Path) -> Path:
    """The adaptive policy's levels and depth schedule as an edge server config file (no CLI flags for them)."""
    g = cfg.grouping
    path = folder / "policy.yaml"
    body = {
        "adaptive_taus": list(g.adaptive_taus),
        "adaptive_max_sizes": list(g.adaptive_max_sizes),
        "depth_schedule": [list(pair) for pair in g.depth_schedule],
    }
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


def device_config(
    cfg: SimConfig, model: str, model_config: str | None = None, server: str | None = None
) -> DeviceConfig:
    """What every replaying device runs and asks for: the server's model ('default' is the shipped one) without an
    adapter, and the workload's settings. A ConfigError, before any server starts, for a model (or configs) the
    devices cannot load or a bad server address."""
    from device_client.config import DeviceConfig
    from device_client.demo import check_model

    try:
        device = DeviceConfig(
            server=server,
            model=model,
            model_config=model_config,
            adapter="none",
            steps=cfg.sampling.steps,
            guidance=cfg.sampling.guidance,
            share=cfg.sampling.share,
            accepted_codecs=(cfg.codec.mode,),
            timeout_s=600.0,
        )
    except ValueError as exc:  # the server address, or configs beside a built-in model
        raise ConfigError(str(exc)) from None
    try:
        check_model(model, "none", model_config)
    except ValueError as exc:  # a ModelError
        raise ConfigError(f"--model {model}: {exc}") from None
    return device


@contextlib.contextmanager
def running_server(
    cfg: SimConfig, model: str, model_config: str | None = None, start_timeout_s: float = 300.0
) -> Iterator[str]:
    """Start an edge server subprocess on 127.0.0.1 with the config's settings; yields host:port; stops it. A
    ConfigError with the end of its output if it exits (a model it cannot load) or does not listen in time."""
    from device_client.server_process import EdgeServerProcess, ServerStartError

    env = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="sage-sim-") as tmp:
        args = [*server_args(cfg, model, model_config), "--config", str(policy_file(cfg, Path(tmp)))]
        server = EdgeServerProcess(None, args, start_timeout_s=start_timeout_s, stop_timeout_s=60.0, env=env)
        try:
            try:
                address = server.start()
            except ServerStartError as exc:
                raise ConfigError(str(exc)) from None
            yield address
        finally:
            server.stop()


def replay(
    cfg: SimConfig, workload: Workload, device: DeviceConfig, concurrency: int = 64, seeds: list[int] | None = None
) -> list[dict[str, Any]]:
    """Send each request at its arrival time from a pool of device clients (own channel and client id each,
    one shared model) and finish it on the device; one record per request. `start_delay_s` records how late a
    request left because every client was busy (it should stay near 0: raise `concurrency` otherwise)."""
    from device_client.client import DeviceClient, DeviceError, DeviceModel

    shared_model = DeviceModel.load(device)
    free: queue.Queue[Any] = queue.Queue()
    clients = []
    for i in range(concurrency):
        client = DeviceClient(replace(device, client_id=f"sim-device-{i}"), shared_model)
        client.connect()
        clients.append(client)
        free.put(client)
    clients[0].generate("a warm-up request", seed=1)  # first-call costs (channel, kernels) stay out of the data
    records: list[dict[str, Any]] = [{} for _ in range(workload.n)]

    def one(i: int, due: float) -> None:
        client = free.get()
        sent = time.perf_counter()
        prompt = workload.prompts[int(workload.prompt_ids[i])]
        try:
            res = client.generate(prompt, seed=None if seeds is None else seeds[i])
            md = res.metadata
            rec = {
                "group_id": md["group_id"],
                "group_size": md["group_size"],
                "branch_step": md["branch_step"],
                "total_steps": md["total_steps"],
                "guidance": md["guidance"],
                "payload_bytes": md["payload_bytes"],
                "wire_bytes": md["wire_bytes"],
                "device_unet_evals": md["device_unet_evals"],
                "timings_ms": {k: round(v, 3) for k, v in res.timings_ms.items()},
            }
        except DeviceError as exc:
            rec = {"error": str(exc)}
        finally:
            free.put(client)
        done = time.perf_counter()
        records[i] = {"id": i, "latency_s": done - due, "start_delay_s": sent - due, **rec}

    t0 = time.perf_counter() + 1.0
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for i in range(workload.n):
            due = t0 + float(workload.arrival_s[i])
            time.sleep(max(0.0, due - time.perf_counter()))
            pool.submit(one, i, due)
    for c in clients:
        c.close()
    return records


def real_totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """UNet evaluations (server: 2 per shared step per distinct group with CFG; device: counted by the client),
    bytes and latency of a replay."""
    ok = [r for r in records if "error" not in r]
    groups = {r["group_id"]: r for r in ok}
    server = sum(unet_samples_per_step(r["guidance"]) * r["branch_step"] for r in groups.values())
    device = sum(r["device_unet_evals"] for r in ok)
    lat = np.asarray([r["latency_s"] for r in ok])
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "groups": len(groups),
        "mean_group_size": len(ok) / max(1, len(groups)),
        "unet_evals": server + device,
        "unet_evals_server": server,
        "unet_evals_device": device,
        "bytes_per_image": float(np.mean([r["wire_bytes"] for r in ok])) if ok else 0.0,
        "latency_p50_s": float(np.median(lat)) if ok else 0.0,
        "latency_p95_s": float(np.percentile(lat, 95)) if ok else 0.0,
        "mean_server_queue_wait_s": float(np.mean([r["timings_ms"]["server_queue_wait"] for r in ok]) / 1e3),
        "mean_shared_phase_s": float(np.mean([r["timings_ms"]["server_shared_phase"] for r in ok]) / 1e3),
        "mean_branch_phase_s": float(np.mean([r["timings_ms"]["branch_phase"] for r in ok]) / 1e3),
        "max_start_delay_s": float(max(r["start_delay_s"] for r in records)),
    }


def sim_totals(result: Any) -> dict[str, Any]:
    """The same quantities from a simulation's sage mode."""
    m = result.modes["sage"]
    return {
        "requests": result.n,
        "groups": int(m.group_sizes.shape[0]),
        "mean_group_size": result.n / max(1, m.group_sizes.shape[0]),
        "unet_evals": m.unet_evals_server + m.unet_evals_device,
        "unet_evals_server": m.unet_evals_server,
        "unet_evals_device": m.unet_evals_device,
        "bytes_per_image": float(m.bytes_down.mean()),
        "latency_p50_s": float(np.median(m.latency_s)),
        "latency_p95_s": float(np.percentile(m.latency_s, 95)),
        "mean_server_queue_wait_s": float((m.window_wait_s + m.queue_wait_s).mean()),
        "mean_shared_phase_s": float(m.gpu_job_s.mean()),
        "mean_branch_phase_s": float(m.device_s.mean()),
    }


def compare(sim: dict[str, Any], real: dict[str, Any]) -> dict[str, Any]:
    """Relative differences (sim - real) / real on the acceptance quantities, each with its tolerance."""
    checks = {}
    for key, tol in TOLERANCE.items():
        diff = (sim[key] - real[key]) / real[key] if real[key] else float("inf")
        checks[key] = {"sim": sim[key], "real": real[key], "rel_diff": diff, "tolerance": tol, "ok": abs(diff) <= tol}
    return {"checks": checks, "pass": all(c["ok"] for c in checks.values())}


def report_markdown(
    cfg: SimConfig, command: str, sim: dict[str, Any], real: dict[str, Any], comparison: dict[str, Any]
) -> str:
    """The committed validation report."""
    rows = [
        "| quantity | simulator | real system | difference | tolerance | |",
        "|---|---|---|---|---|---|",
    ]
    for key, c in comparison["checks"].items():
        rows.append(
            f"| {key} | {c['sim']:.4g} | {c['real']:.4g} | {c['rel_diff']:+.1%} | {c['tolerance']:.0%} | "
            f"{'ok' if c['ok'] else 'FAIL'} |"
        )
    detail = ["| detail | simulator | real system |", "|---|---|---|"]
    for key in (
        "groups", "mean_group_size", "unet_evals_server", "unet_evals_device", "latency_p95_s",
        "mean_server_queue_wait_s", "mean_shared_phase_s", "mean_branch_phase_s",
    ):  # fmt: skip
        detail.append(f"| {key} | {sim[key]:.4g} | {real[key]:.4g} |")
    s, a = cfg.server, cfg.arrivals
    return "\n".join(
        [
            "# Simulator vs the real edge server and device clients (127.0.0.1)",
            "",
            f"Command: `{command}`",
            "",
            f"Workload: {real['requests']} requests ({real['errors']} failed), {a.process} arrivals at "
            f"{a.rate:g} req/s, prompts from {cfg.prompts.dataset} (embedder {cfg.prompts.embedder}), "
            f"window {s.window_s:g} s, at most {s.max_window_requests} per window, tau {cfg.grouping.tau:g}, "
            f"T = {cfg.sampling.steps}, beta = {cfg.sampling.share:g}, {s.gpu_workers} worker, step table "
            f"{s.step_table} + {s.step_delay_ms:g} ms per UNet pass (the server's --worker-step-delay-ms).",
            "",
            f"Result: **{'PASS' if comparison['pass'] else 'FAIL'}**",
            "",
            *rows,
            "",
            *detail,
            "",
            "![validation](validation.png)",
            "",
        ]
    )
