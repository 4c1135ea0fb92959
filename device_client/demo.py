"""The main job's demo: a real edge server (local Ray) on 127.0.0.1 and several device clients at once.

Each client takes prompts from a shared queue and finishes its images locally; the demo writes every image,
a labelled grid per group, timeline.png (where each request's time went) and report.json (groups, measured UNet
saving vs independent sampling, bytes sent, latencies p50/p95), prints a short table and stops the server.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_client.config import (
    ADAPTER_AUTO,
    ADAPTER_NONE,
    DEFAULT_ADAPTER_CHOICE,
    DEFAULT_MODEL,
    TINY_MODEL,
    DeviceConfig,
)
from device_client.server_process import EdgeServerProcess, ServerStartError
from device_client.timeline import write_timeline
from sage_core.names import unet_samples_per_step
from sage_core.outputs import atomic_output_dir, check_output_dir

if TYPE_CHECKING:
    from rich.console import Console

STATUS_OK = "OK"
STATUS_LOST = "LOST"
TIMELINE = "timeline.png"  # where each request's time went (device_client.timeline)


class DemoError(RuntimeError):
    """The demo could not run (the server did not start); one-line message. Bad inputs are ValueErrors instead,
    raised by `check_inputs` before any work."""


class DemoIncomplete(DemoError):
    """The demo ran and wrote its report, but some requests ended without an image; `report` is that report."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs."""

    prompts_file: Path
    out_dir: Path
    n_clients: int = 8
    model: str | None = None  # None: the shipped default model if present, else the tiny random pipeline
    model_config: str | None = None  # with a single-file model: its component configs folder (server and devices)
    adapter: str = DEFAULT_ADAPTER_CHOICE
    steps: int = 0  # 0: server default
    seed: int = 0  # prompt i asks for seed + i
    negative_prompt: str = ""  # every device's (diffusers' negative_prompt); "": none
    max_wait_ms: float = 500.0  # server batching window: long enough for the clients' first requests to meet
    accepted_codecs: tuple[str, ...] = ()
    server_args: tuple[str, ...] = ()
    timeout_s: float = 300.0  # per request
    start_timeout_s: float = 240.0
    overwrite: bool = False  # replace a previous run's out_dir (sage_core.outputs.check_output_dir)

    def __post_init__(self) -> None:
        if self.n_clients < 1:
            raise ValueError(f"n_clients must be >= 1, got {self.n_clients}")
        if not (math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms must be a finite number of milliseconds >= 0, got {self.max_wait_ms:g}")
        if not self.start_timeout_s > 0:  # also false for NaN
            raise ValueError(f"start_timeout_s must be > 0 seconds, got {self.start_timeout_s:g}")


@dataclass
class RequestRecord:
    """What happened to one prompt."""

    index: int
    prompt: str
    client: str = ""
    status: str = STATUS_LOST
    error: str = ""
    started_ms: float = 0.0  # since the device clients started
    latency_ms: float = 0.0
    image: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def resolve_model(model: str | None) -> str:
    """The model both sides run: the given one, else the shipped default if present, else "tiny"."""
    from sage_core.names import DEFAULT_MODEL_DIR

    if model is not None:
        return model
    return str(DEFAULT_MODEL_DIR) if DEFAULT_MODEL_DIR.is_dir() else TINY_MODEL


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile; None for no values (no measurement, not 0 ms)."""
    return float(np.percentile(values, q)) if values else None


def make_device_config(config: DemoConfig, model_name: str) -> DeviceConfig:
    """What every demo device runs and asks for; ValueError for a setting a device refuses (steps, timeout)."""
    return DeviceConfig(model=model_name, model_config=config.model_config, adapter=config.adapter, steps=config.steps,
                        accepted_codecs=config.accepted_codecs, timeout_s=config.timeout_s)  # fmt: skip


def check_model(model_name: str, adapter: str, model_config: str | None = None) -> None:
    """ModelError (a ValueError) for a model that is no pipeline folder (or single file fitting `model_config`'s
    configs) or an adapter folder that does not exist: found before the server starts, not once it has loaded."""
    from sage_core.models import DEFAULT_MODEL_DIR, ModelError, check_pipeline_folder

    if model_name != TINY_MODEL:
        check_pipeline_folder(DEFAULT_MODEL_DIR if model_name == DEFAULT_MODEL else Path(model_name), model_config)
    if adapter not in (ADAPTER_AUTO, ADAPTER_NONE) and not Path(adapter).is_dir():
        raise ModelError(f"adapter folder {adapter} does not exist")


def check_inputs(config: DemoConfig) -> list[str]:
    """The prompts, read once, after every input is checked: a ValueError naming what is wrong (prompts file,
    seed range, output folder, model, adapter, device settings) is raised before the server starts."""
    from sage_core.generate import check_base_seed, check_negative_prompt, read_prompt_file

    prompts = read_prompt_file(config.prompts_file)
    check_base_seed(config.seed, len(prompts))  # prompt i asks for seed + i
    check_negative_prompt(config.negative_prompt)
    check_output_dir(config.out_dir, config.overwrite, inputs=(config.prompts_file,))
    model_name = resolve_model(config.model)
    make_device_config(config, model_name)
    check_model(model_name, config.adapter, config.model_config)
    return prompts


# ---------------------------------------------------------------------------------------------------- running


def run_clients(
    prompts: list[str],
    config: DemoConfig,
    device_config: DeviceConfig,
    model: Any,
    work_dir: Path,
    on_done: Callable[[RequestRecord], None] = lambda r: None,
) -> list[RequestRecord]:
    """N device clients in threads, pulling prompt indices from one queue; every request ends in a record."""
    from device_client.client import DeviceClient, DeviceError

    records = [RequestRecord(i, p) for i, p in enumerate(prompts)]
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(prompts)):
        todo.put(i)
    images_dir = work_dir / "images"
    t_clients = time.perf_counter()

    def worker(name: str) -> None:
        with DeviceClient(replace(device_config, client_id=name), model) as client:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                rec = records[i]
                rec.client = name
                t0 = time.perf_counter()
                rec.started_ms = (t0 - t_clients) * 1e3
                try:
                    result = client.generate(rec.prompt, seed=config.seed + i, negative_prompt=config.negative_prompt)
                    rec.metadata = result.metadata
                    rec.image = str(result.save(images_dir / f"{i:03d}.png").relative_to(work_dir))
                    rec.status = STATUS_OK
                except DeviceError as exc:
                    rec.status, rec.error = exc.code, exc.message
                except Exception as exc:  # noqa: BLE001 - a demo request must end with a record, never vanish
                    rec.status, rec.error = "INTERNAL", f"{type(exc).__name__}: {exc}"
                rec.latency_ms = (time.perf_counter() - t0) * 1e3
                on_done(rec)

    threads = [threading.Thread(target=worker, args=(f"device-{c}",), daemon=True) for c in range(config.n_clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + config.timeout_s * (len(prompts) / config.n_clients + 1) + 60
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    return records


def write_grids(records: list[RequestRecord], out_dir: Path) -> dict[str, list[int]]:
    """A labelled grid per group (members in prompt order); returns group id -> member indices."""
    from PIL import Image

    from sage_core.outputs import labelled_grid

    groups: dict[str, list[int]] = {}
    for rec in records:
        if rec.status == STATUS_OK:
            gid = rec.metadata.get("group_id") or f"local-{rec.index}"
            groups.setdefault(gid, []).append(rec.index)
    grid_dir = out_dir / "grids"
    grid_dir.mkdir(parents=True, exist_ok=True)
    for n, members in enumerate(groups.values()):
        images = [Image.open(out_dir / records[m].image).convert("RGB") for m in members]
        grid = labelled_grid(images, [records[m].prompt for m in members])
        grid.save(grid_dir / f"group_{n:03d}.png")
    return groups


def build_report(records: list[RequestRecord], groups: dict[str, list[int]], config: DemoConfig, extra: dict) -> dict:
    """Counts, groups, UNet evaluations (measured on devices + the shared phase once per group), bytes, latencies."""
    from sage_core.generate import saving_closed_form

    ok = [r for r in records if r.status == STATUS_OK]
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    cfg = {r.index: unet_samples_per_step(r.metadata.get("guidance", 0.0)) for r in ok}
    independent = sum(r.metadata["total_steps"] * cfg[r.index] for r in ok)
    device_evals = sum(r.metadata["device_unet_evals"] for r in ok)
    group_rows = []
    shared_evals = 0
    for n, (gid, members) in enumerate(groups.items()):
        first = records[members[0]].metadata
        k, steps, size = first.get("branch_step", 0), first["total_steps"], first.get("group_size", 1)
        shared_evals += k * cfg[members[0]]
        group_rows.append(
            {
                "id": gid,
                "grid": f"grids/group_{n:03d}.png",
                "size": size,
                "members": members,
                "prompts": [records[m].prompt for m in members],
                "branch_step": k,
                "total_steps": steps,
                "min_similarity": first.get("min_similarity", 1.0),
                "seed": first.get("seed"),
                "saving_closed_form": saving_closed_form(k, steps, size),
            }
        )
    used = shared_evals + device_evals
    lat = [r.latency_ms for r in ok]

    def timing(key: str) -> dict[str, float | None]:
        vals = [r.metadata.get("timings_ms", {}).get(key, 0.0) for r in ok]
        return {"p50": percentile(vals, 50), "p95": percentile(vals, 95)}

    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        **extra,
        "counts": {"requests": len(records), "ok": counts.get(STATUS_OK, 0), "lost": counts.get(STATUS_LOST, 0),
                   "errors": {k: v for k, v in counts.items() if k not in (STATUS_OK, STATUS_LOST)}},
        "groups": group_rows,
        "unet": {"independent": independent, "shared_phase": shared_evals, "branch_phase_devices": device_evals,
                 "used": used, "saving": 1.0 - used / independent if independent else 0.0},
        "bytes": {"payload_total": sum(r.metadata.get("payload_bytes", 0) for r in ok),
                  "wire_total": sum(r.metadata.get("wire_bytes", 0) for r in ok),
                  "payload_per_image": (sum(r.metadata.get("payload_bytes", 0) for r in ok) / len(ok)) if ok else 0,
                  "raw_fp32_latent": 4 * int(np.prod(ok[0].metadata.get("latent_shape", [0]))) if ok else 0},
        "latency_ms": {"total": {"p50": percentile(lat, 50), "p95": percentile(lat, 95)},
                       **{k: timing(k) for k in ("wait_accepted", "stream", "verify_decode", "branch_phase",
                                                 "vae_decode", "server_queue_wait", "server_shared_phase")}},
        "requests": [asdict(r) for r in records],
    }  # fmt: skip


def print_report(report: dict, out_dir: Path) -> None:
    """A short table of the groups, then counts, saving, bytes and latencies (when some request succeeded)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False, soft_wrap=True)  # prompts and paths print as given, never cut into lines
    table = Table(title=f"SAGE edge demo: {report['counts']['requests']} requests, {len(report['groups'])} groups")
    for col in ("group", "size", "k/T", "min sim", "prompts"):
        table.add_column(col, justify="left" if col == "prompts" else "right")
    for g in report["groups"]:
        prompts = "; ".join(g["prompts"])
        table.add_row(g["id"], str(g["size"]), f"{g['branch_step']}/{g['total_steps']}",
                      f"{g['min_similarity']:.3f}", prompts if len(prompts) < 90 else prompts[:89] + "…")  # fmt: skip
    console.print(table)
    c, u, b, lat = report["counts"], report["unet"], report["bytes"], report["latency_ms"]
    errors = ", ".join(f"{k}={v}" for k, v in sorted(c["errors"].items())) or "none"
    console.print(f"requests: ok={c['ok']} lost={c['lost']} errors: {errors}")
    for code, message in first_errors(report["requests"]).items():
        console.print(f"  {code}: {message}")
    if not c["ok"]:
        console.print("no request succeeded: no UNet saving, bytes or latencies to report")
    else:
        print_figures(console, u, b, lat)
    written = [f"{name}/" for name in ("images", "grids") if (out_dir / name).is_dir()]
    written += [name for name in (TIMELINE, "report.json") if (out_dir / name).is_file()]
    console.print(f"wrote {out_dir}/ ({', '.join(written)})")


def print_figures(console: Console, u: dict, b: dict, lat: dict) -> None:
    """The UNet saving, bytes and latency lines of a run in which some request succeeded."""
    console.print(f"UNet evaluations: {u['used']} used vs {u['independent']} independent -> saving {u['saving']:.1%}")
    console.print(f"bytes sent: {b['payload_total']} B latent payload ({b['payload_per_image']:.0f} B per image; "
                  f"raw fp32 latent {b['raw_fp32_latent']} B), {b['wire_total']} B on the wire")  # fmt: skip
    console.print(f"latency ms: total p50 {lat['total']['p50']:.0f} / p95 {lat['total']['p95']:.0f}; "
                  f"wait for Accepted p50 {lat['wait_accepted']['p50']:.0f}; "
                  f"branch phase p50 {lat['branch_phase']['p50']:.0f}")  # fmt: skip


def first_errors(requests: list[dict]) -> dict[str, str]:
    """The first message of each error code among the report's requests (what went wrong, not just its code)."""
    found: dict[str, str] = {}
    for r in requests:
        if r["status"] not in (STATUS_OK, STATUS_LOST):
            found.setdefault(r["status"], r["error"])
    return found


def check_complete(report: dict, out_dir: Path) -> None:
    """DemoIncomplete when a request ended without an image: a demo whose every request failed must not exit 0."""
    c = report["counts"]
    failed = c["requests"] - c["ok"]
    if failed:
        codes = ", ".join(f"{k}={v}" for k, v in sorted({**c["errors"], "LOST": c["lost"]}.items()) if v)
        raise DemoIncomplete(f"{failed} of {c['requests']} requests ended without an image ({codes}); "
                             f"see {out_dir / 'report.json'}", report)  # fmt: skip


def run_demo(
    prompts_file: str | Path, out_dir: str | Path, n_clients: int = 8, progress: bool = False, **options: Any
) -> dict:
    """Start an edge server subprocess, run `n_clients` device clients over the prompts, write images, grids
    and report.json under `out_dir`, print a summary and stop the server. Returns the report.
    `options` are further DemoConfig fields (model, adapter, steps, seed, max_wait_ms, server_args, ...).
    DemoIncomplete (its `report` attached) when a request ended without an image."""
    return run_demo_config(DemoConfig(Path(prompts_file), Path(out_dir), n_clients, **options), progress)


def run_demo_config(config: DemoConfig, progress: bool = False, prompts: list[str] | None = None) -> dict:
    """`run_demo` for a ready DemoConfig and the prompts `check_inputs` returned for it (checked and read here
    when not given): ValueError for a bad input before any work; DemoIncomplete when a request ended without an
    image."""
    # 1. inputs; the output folder is written atomically (a failed run leaves nothing half-written)
    if prompts is None:
        prompts = check_inputs(config)
    model_name = resolve_model(config.model)
    if config.model is None and model_name == TINY_MODEL:
        print("note: the shipped default model is not installed yet; the demo runs the tiny random pipeline")
    with atomic_output_dir(config.out_dir, overwrite=config.overwrite, inputs=(config.prompts_file,)) as work_dir:
        report = run_in(work_dir, prompts, model_name, config, progress)
    print_report(report, config.out_dir)
    check_complete(report, config.out_dir)
    return report


def run_in(work_dir: Path, prompts: list[str], model_name: str, config: DemoConfig, progress: bool) -> dict:
    """Start the server, load the device model meanwhile, run the clients, stop the server, write outputs."""
    import torch

    from device_client.client import DeviceModel

    # 2. start the server and load the device model meanwhile
    server_args = ("--max-wait-ms", f"{config.max_wait_ms:g}", *config.server_args)
    server = EdgeServerProcess(model=model_name, args=server_args, start_timeout_s=config.start_timeout_s,
                               model_config=config.model_config)  # fmt: skip
    t_start = time.perf_counter()
    print(f"starting the edge server ({model_name}) and loading the device model...", flush=True)
    server.launch()
    try:
        if config.n_clients >= (os.cpu_count() or 1):
            torch.set_num_threads(1)
        devices = make_device_config(config, model_name)
        model = DeviceModel.load(devices)
        try:
            address = server.wait_listening()
        except ServerStartError as exc:
            raise DemoError(str(exc)) from None
        t_ready = time.perf_counter()
        print(f"edge server ready at {address} after {t_ready - t_start:.1f} s", flush=True)
        devices = replace(devices, server=address)
        # 3. the device clients
        t0 = time.perf_counter()
        records = run_with_progress(prompts, config, devices, model, work_dir, progress)
        wall = time.perf_counter() - t0
    finally:
        exit_code = server.stop()
    # 4. grids, timeline and report
    groups = write_grids(records, work_dir)
    write_timeline(records, groups, work_dir / TIMELINE)
    extra = {"server": {"address": address, "model": model_name, "start_s": t_ready - t_start, "exit_code": exit_code},
             "model_fingerprint": model.fingerprint, "adapter": model.adapter,
             "negative_prompt": config.negative_prompt, "wall_s": wall}  # fmt: skip
    report = build_report(records, groups, config, extra)
    (work_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def run_with_progress(
    prompts: list[str], config: DemoConfig, device_config: DeviceConfig, model: Any, work_dir: Path, progress: bool
) -> list[RequestRecord]:
    """run_clients, with a rich progress bar when asked."""
    if not progress:
        return run_clients(prompts, config, device_config, model, work_dir)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(f"{config.n_clients} devices", total=len(prompts))
        return run_clients(prompts, config, device_config, model, work_dir, on_done=lambda r: bar.advance(task))
