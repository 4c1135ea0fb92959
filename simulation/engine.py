"""The discrete-event model of the edge server, the device links and the devices.

What is an event and what is a vector:
- Per request, everything that does not depend on other requests is numpy over all requests at once: uplink and
  downlink times from each link's bandwidth, RTT and loss, and device compute time and energy.
- Batching windows are formed from the server-side arrival times (a window opens at its first request and
  closes `window_s` later, or when it holds `max_window_requests`); each window is grouped with
  sage_core.grouping.group_by_similarity on its prompts' embeddings, exactly as the edge server groups.
- The GPU workers are a simpy Resource: each window releases its jobs (its groups in chunks of at most
  `max_batch_samples` UNet samples) when it closes, and the jobs queue FIFO for `gpu_workers` GPUs. A job's
  duration comes from the measured step-time table: shared steps at the batch of its groups, branch steps at
  the batch of its members, plus the VAE decode where the server decodes.

Modes (all from the same workload, so the comparison is paired):
- sage: shared phase on the server (k = round(beta T) steps per group), latent to every member's device,
  branch phase (T - k steps) and VAE decode on the device.
- server: independent sampling on the server (T steps per request, batched per window), image to the device.
- device: everything on the device, no server and no network.
- sage_server: shared sampling entirely on the server (shared + branch + decode), image to the device.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import simpy
import torch

from sage_core.grouping import GroupingConfig, group_by_similarity, normalize
from simulation.config import DEFAULT_STEP_TIMES, CodecSettings, ConfigError, SimConfig, resolve_path
from simulation.workload import Workload

ProgressFn = Callable[[int, int], None]
MATHIS_C = float(np.sqrt(1.5))  # TCP throughput ~ MSS * sqrt(3/2) / (RTT * sqrt(p))


# ---------------------------------------------------------------------------------------------- step-time table
@dataclass(frozen=True)
class StepTable:
    """Measured GPU times: one UNet forward pass and one VAE decode call, as functions of batch size."""

    name: str
    unet_batch: np.ndarray  # measured batch sizes, ascending
    unet_pass_ms: np.ndarray  # time of one forward pass at that batch (batch * ms per sample)
    vae_batch: np.ndarray
    vae_call_ms: np.ndarray
    text_encode_ms_per_prompt: float = 0.0

    def unet_seconds(self, batch: np.ndarray) -> np.ndarray:
        """Seconds of one UNet pass over `batch` samples: linear between measured points; below the smallest
        measured batch the smallest pass time (overhead-bound, or padded to a compiled shape); above the
        largest, the largest batch's per-sample time. Zero for an empty batch."""
        return _batched_seconds(np.asarray(batch, dtype=np.float64), self.unet_batch, self.unet_pass_ms)

    def vae_seconds(self, images: np.ndarray) -> np.ndarray:
        """Seconds of one VAE decode call over `images` latents (same rules as unet_seconds)."""
        return _batched_seconds(np.asarray(images, dtype=np.float64), self.vae_batch, self.vae_call_ms)


def _batched_seconds(b: np.ndarray, xs: np.ndarray, ms: np.ndarray) -> np.ndarray:
    t = np.interp(b, xs, ms)
    t = np.where(b > xs[-1], b * ms[-1] / xs[-1], t)
    return np.where(b > 0, t, 0.0) / 1e3


def _table_points(raw: object, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(batch sizes, ms per call) from a {batch: ms per sample} mapping."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where} must be a non-empty mapping of batch size to ms per sample")
    try:
        pts = sorted((int(k), float(v)) for k, v in raw.items())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: batch sizes must be integers and times numbers ({exc})") from exc
    if any(b < 1 or v <= 0 for b, v in pts):
        raise ConfigError(f"{where}: batch sizes must be >= 1 and times > 0")
    batch = np.asarray([b for b, _ in pts], dtype=np.float64)
    return batch, batch * np.asarray([v for _, v in pts], dtype=np.float64)


def load_step_table(cfg: SimConfig) -> StepTable:
    """The table named by server.step_table in server.step_times_file (default simulation/step_times.json)."""
    path = resolve_path(cfg, cfg.server.step_times_file) if cfg.server.step_times_file else DEFAULT_STEP_TIMES
    if not path.is_file():
        raise ConfigError(f"server.step_times_file: {path} does not exist")
    try:
        tables = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"server.step_times_file: {path} is not valid JSON: {exc}") from exc
    name = cfg.server.step_table
    if name not in tables:
        raise ConfigError(f"server.step_table: no table {name!r} in {path} (has: {', '.join(sorted(tables))})")
    t = tables[name]
    ub, ums = _table_points(t.get("unet_ms_per_sample"), f"{path}:{name}.unet_ms_per_sample")
    vb, vms = _table_points(t.get("vae_ms_per_image"), f"{path}:{name}.vae_ms_per_image")
    return StepTable(name, ub, ums, vb, vms, float(t.get("text_encode_ms_per_prompt", 0.0)))


def latent_payload_bytes(codec: CodecSettings, samples: int = 4) -> tuple[int, str]:
    """Bytes of one encoded intermediate latent and where the number came from: sage_core.codec encoding
    seeded Gaussian latents of codec.latent_shape (an intermediate latent is near-Gaussian), or the config's
    fallback when the codec package is not there."""
    try:
        import torch

        from sage_core.codec import CodecSpec, LatentCodec
    except ImportError:
        return codec.fallback_latent_bytes, "fallback"
    try:
        enc = LatentCodec(CodecSpec(codec.mode, codec.level))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"codec: sage_core.codec refuses mode {codec.mode!r} level {codec.level}: {exc}") from exc
    gen = torch.Generator().manual_seed(0)
    sizes = [len(enc.encode(torch.randn(tuple(codec.latent_shape), generator=gen))) for _ in range(samples)]
    return int(round(float(np.mean(sizes)))), f"sage_core.codec {codec.mode}/{codec.level}"


# ------------------------------------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class ModeSpec:
    """Where the steps of one request run, and what crosses the network."""

    name: str
    uses_server: bool
    grouped: bool
    server_shared_steps: int  # steps per group on the server
    server_branch_steps: int  # steps per member on the server
    server_decodes: bool
    device_steps: int  # steps per request on the device
    payload: str  # "latent" | "image" | "none"


def mode_spec(mode: str, cfg: SimConfig) -> ModeSpec:
    """The ModeSpec of a mode name under the config's sampler settings."""
    t, k = cfg.sampling.steps, cfg.sampling.shared_steps
    specs = {
        "sage": ModeSpec("sage", True, True, k, 0, False, t - k, "latent"),
        "server": ModeSpec("server", True, False, t, 0, True, 0, "image"),
        "device": ModeSpec("device", False, False, 0, 0, False, t, "none"),
        "sage_server": ModeSpec("sage_server", True, True, k, t - k, True, 0, "image"),
    }
    return specs[mode]


# ------------------------------------------------------------------------------------------- windows, groups
def form_windows(server_arrival: np.ndarray, window_s: float, max_requests: int) -> tuple[np.ndarray, np.ndarray]:
    """Batching windows over sorted server-side arrival times: (bounds [W+1] into the sorted requests,
    close time [W]). A window opens at its first request and closes window_s later or at its
    max_requests-th request, whichever comes first."""
    n = server_arrival.shape[0]
    bounds, closes = [0], []
    i = 0
    while i < n:
        t0 = server_arrival[i]
        j = int(np.searchsorted(server_arrival, t0 + window_s, side="right"))
        if j - i >= max_requests:
            j = i + max_requests
            closes.append(float(server_arrival[j - 1]))
        else:
            closes.append(float(t0 + window_s))
        bounds.append(j)
        i = j
    return np.asarray(bounds, dtype=np.int64), np.asarray(closes, dtype=np.float64)


@dataclass(frozen=True)
class Groups:
    """A partition of the (sorted) requests into groups, each inside one window."""

    label: np.ndarray  # [n] group id of each sorted request
    window: np.ndarray  # [G] window of each group (non-decreasing)
    size: np.ndarray  # [G] members per group


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run small torch ops on one thread (windows are small: thread start-up costs more than it saves, and far
    more on a shared machine), restoring the thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def windows_with_a_pair(
    embeddings: np.ndarray, prompt_ids_sorted: np.ndarray, bounds: np.ndarray, tau: float, margin: float = 1e-4
) -> np.ndarray:
    """For each window, whether some pair of its prompts has cosine similarity >= tau - margin. A window with
    no such pair is all singletons under group_by_similarity (every pair in a group must reach tau), so only
    windows flagged here need the grouping call. Batched over windows of similar size; exact up to `margin`."""
    sizes = np.diff(bounds)
    flagged = sizes >= 2
    if tau - margin <= 0.0:  # zero padding rows could reach such a threshold: group every multi-request window
        return flagged
    unit = normalize(embeddings)
    todo = np.flatnonzero(flagged)
    todo = todo[np.argsort(sizes[todo], kind="stable")]
    lo = 0
    while lo < todo.shape[0]:
        m = int(sizes[todo[min(todo.shape[0] - 1, lo)]])
        c = max(1, min(4096, 2_000_000 // (m * max(m, unit.shape[1]))))
        chunk = todo[lo : lo + c]
        m = int(sizes[chunk].max())
        offs = np.arange(m)
        valid = offs[None, :] < sizes[chunk][:, None]
        pos = np.minimum(bounds[chunk][:, None] + offs[None, :], prompt_ids_sorted.shape[0] - 1)
        x = unit[prompt_ids_sorted[pos]] * valid[..., None]
        sims = x @ x.transpose(0, 2, 1)
        sims[:, offs, offs] = -np.inf
        flagged[chunk] = sims.max(axis=(1, 2)) >= tau - margin
        lo += c
    return flagged


def group_windows(
    prompt_ids_sorted: np.ndarray,
    embeddings: np.ndarray,
    bounds: np.ndarray,
    config: GroupingConfig,
    progress: ProgressFn | None = None,
) -> Groups:
    """Group each window's requests with the project's grouping (one call per window, as the server does)."""
    n = prompt_ids_sorted.shape[0]
    label = np.empty(n, dtype=np.int64)
    windows: list[int] = []
    sizes: list[int] = []
    n_windows = bounds.shape[0] - 1
    report_every = max(1, n_windows // 200)
    needs_grouping = (
        windows_with_a_pair(embeddings, prompt_ids_sorted, bounds, config.tau)
        if config.max_group_size > 1
        else np.zeros(n_windows, dtype=bool)
    )
    with single_torch_thread():
        _group_each_window(
            prompt_ids_sorted, embeddings, bounds, needs_grouping, config, label, windows, sizes, report_every, progress
        )
    return Groups(label, np.asarray(windows, dtype=np.int64), np.asarray(sizes, dtype=np.int64))


def _group_each_window(
    prompt_ids_sorted: np.ndarray,
    embeddings: np.ndarray,
    bounds: np.ndarray,
    needs_grouping: np.ndarray,
    config: GroupingConfig,
    label: np.ndarray,
    windows: list[int],
    sizes: list[int],
    report_every: int,
    progress: ProgressFn | None,
) -> None:
    """The per-window loop of group_windows (fills label, windows, sizes)."""
    n, n_windows = prompt_ids_sorted.shape[0], bounds.shape[0] - 1
    for w in range(n_windows):
        lo, hi = int(bounds[w]), int(bounds[w + 1])
        if not needs_grouping[w]:  # no pair reaches tau: group_by_similarity would return singletons
            label[lo:hi] = np.arange(len(sizes), len(sizes) + hi - lo)
            windows.extend([w] * (hi - lo))
            sizes.extend([1] * (hi - lo))
        else:
            for members in group_by_similarity(embeddings[prompt_ids_sorted[lo:hi]], config):
                label[lo + np.asarray(members, dtype=np.int64)] = len(sizes)
                windows.append(w)
                sizes.append(len(members))
        if progress and (w % report_every == 0 or w == n_windows - 1):
            progress(int(hi), n)


def singleton_groups(window_of_request: np.ndarray) -> Groups:
    """Every request its own group (independent sampling)."""
    n = window_of_request.shape[0]
    return Groups(np.arange(n, dtype=np.int64), window_of_request.astype(np.int64), np.ones(n, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------- GPU jobs
@dataclass(frozen=True)
class Jobs:
    """GPU jobs: chunks of one window's groups, run as one batch each."""

    of_group: np.ndarray  # [G] job of each group
    window: np.ndarray  # [J] window of each job
    groups: np.ndarray  # [J] groups in each job
    members: np.ndarray  # [J] requests in each job


def chunk_jobs(groups: Groups, units_per_group: np.ndarray, cap_units: int) -> Jobs:
    """Split each window's groups, in order, into jobs of at most cap_units batch units (a group that alone
    exceeds the cap gets a job of its own). One unit per group packs by arithmetic; varying units greedily."""
    g = groups.window.shape[0]
    if g == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Jobs(empty, empty, empty, empty)
    new_window = np.r_[True, groups.window[1:] != groups.window[:-1]]
    if np.all(units_per_group == 1):
        first = np.maximum.accumulate(np.where(new_window, np.arange(g), 0))
        local_chunk = (np.arange(g) - first) // cap_units
        starts = new_window | np.r_[True, local_chunk[1:] != local_chunk[:-1]]
    else:
        starts = np.zeros(g, dtype=bool)
        used = 0
        for i in range(g):
            u = int(units_per_group[i])
            if new_window[i] or used + u > cap_units:
                starts[i], used = True, 0
            used += u
    of_group = np.cumsum(starts) - 1
    jobs = int(of_group[-1]) + 1
    return Jobs(
        of_group=of_group,
        window=groups.window[starts],
        groups=np.bincount(of_group, minlength=jobs),
        members=np.bincount(of_group, weights=groups.size, minlength=jobs).astype(np.int64),
    )


def run_gpu_pool(release_s: np.ndarray, duration_s: np.ndarray, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """simpy model of `workers` GPUs serving jobs FIFO in release order: (start, finish) per job. Jobs must
    be given in non-decreasing release order; all jobs released at one instant enter the queue together."""
    n = release_s.shape[0]
    start, finish = [0.0] * n, [0.0] * n
    env = simpy.Environment()
    gpus = simpy.Resource(env, capacity=workers)
    release, duration = release_s.tolist(), duration_s.tolist()

    def job(i: int):
        with gpus.request() as turn:
            yield turn
            start[i] = env.now
            yield env.timeout(duration[i])
            finish[i] = env.now

    def batcher():
        i = 0
        while i < n:
            yield env.timeout(max(0.0, release[i] - env.now))
            now = release[i]
            while i < n and release[i] <= now:
                env.process(job(i))
                i += 1

    env.process(batcher())
    env.run()
    return np.asarray(start), np.asarray(finish)


# ------------------------------------------------------------------------------------------------------ network
def goodput_bps(workload: Workload, mss_bytes: int) -> np.ndarray:
    """Bytes per second a long transfer gets on each link: bandwidth less lost packets, capped by TCP's
    loss-limited rate (Mathis et al.) where there is loss."""
    bw = workload.bandwidth_bps * (1.0 - workload.loss)
    with np.errstate(divide="ignore"):
        mathis = np.where(
            workload.loss > 0,
            mss_bytes * MATHIS_C / (np.maximum(workload.rtt_s, 1e-6) * np.sqrt(workload.loss)),
            np.inf,
        )
    return np.minimum(bw, mathis)


def transfer_seconds(nbytes: float, rtt_s: np.ndarray, goodput: np.ndarray) -> np.ndarray:
    """One-way delivery of nbytes: half an RTT of propagation plus serialization at the link's goodput."""
    return rtt_s / 2.0 + nbytes / goodput


# -------------------------------------------------------------------------------------------------- the model
@dataclass
class ModeResult:
    """Per-request timings (original request order) and totals of one mode."""

    name: str
    latency_s: np.ndarray
    uplink_s: np.ndarray
    window_wait_s: np.ndarray
    queue_wait_s: np.ndarray
    gpu_job_s: np.ndarray  # duration of the GPU job that served the request
    downlink_s: np.ndarray
    device_s: np.ndarray  # device compute on the critical path and off it (text encode, branch, decode)
    energy_j: np.ndarray
    bytes_down: np.ndarray
    bytes_up: np.ndarray
    gpu_seconds: float = 0.0
    gpu_busy_span_s: float = 0.0  # first job start to last job finish
    unet_evals_server: int = 0
    unet_evals_device: int = 0
    group_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    job_batch_samples: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass
class SimResult:
    """Everything a run produced."""

    cfg: SimConfig
    n: int
    modes: dict[str, ModeResult]
    window_sizes: np.ndarray
    latent_bytes: int
    latent_bytes_source: str
    step_table: str
    wall_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def simulate(
    cfg: SimConfig,
    workload: Workload,
    embeddings: np.ndarray,
    progress: ProgressFn | None = None,
) -> SimResult:
    """Run every mode of cfg.modes on the workload; `embeddings` rows belong to workload.prompts."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    # 1. check inputs
    if embeddings.shape[0] != len(workload.prompts):
        raise ValueError(f"{embeddings.shape[0]} embeddings for {len(workload.prompts)} prompts")
    table = load_step_table(cfg)
    latent_bytes, latent_source = latent_payload_bytes(cfg.codec)
    specs = [mode_spec(m, cfg) for m in cfg.modes]
    n = workload.n
    # 2. links: uplink to the server, goodput for the downlink
    goodput = goodput_bps(workload, cfg.network.mss_bytes)
    uplink = transfer_seconds(cfg.codec.request_bytes, workload.rtt_s, goodput)
    # 3. windows over server-side arrivals
    server_arrival = workload.arrival_s + uplink
    order = np.argsort(server_arrival, kind="stable")
    s_sorted = server_arrival[order]
    window_sizes = np.zeros(0, dtype=np.int64)
    bounds = closes = window_of_sorted = None
    if any(s.uses_server for s in specs):
        t0 = time.perf_counter()
        bounds, closes = form_windows(s_sorted, cfg.server.window_s, cfg.server.max_window_requests)
        window_sizes = np.diff(bounds)
        window_of_sorted = np.repeat(np.arange(closes.shape[0]), window_sizes)
        timings["windows"] = time.perf_counter() - t0
    # 4. group each window (shared by every grouped mode)
    grouped = None
    if any(s.grouped for s in specs):
        t0 = time.perf_counter()
        gcfg = GroupingConfig(
            tau=cfg.grouping.tau, max_group_size=cfg.grouping.max_group_size, candidates=cfg.grouping.candidates
        )
        grouped = group_windows(workload.prompt_ids[order], embeddings, bounds, gcfg, progress)
        timings["grouping"] = time.perf_counter() - t0
    # 5. each mode: GPU jobs through the simpy pool, then links and devices
    results = {}
    for spec in specs:
        t0 = time.perf_counter()
        results[spec.name] = _run_mode(
            cfg, spec, workload, table, latent_bytes, goodput, uplink, order, closes, window_of_sorted, grouped
        )
        timings[f"mode_{spec.name}"] = time.perf_counter() - t0
    return SimResult(
        cfg=cfg,
        n=n,
        modes=results,
        window_sizes=window_sizes,
        latent_bytes=latent_bytes,
        latent_bytes_source=latent_source,
        step_table=table.name,
        wall_s=time.perf_counter() - t_start,
        timings=timings,
    )


def _device_arrays(cfg: SimConfig, workload: Workload) -> dict[str, np.ndarray]:
    """Per-request device-class parameters."""
    ids = workload.device_ids
    get = lambda key: np.asarray([getattr(d, key) for d in cfg.devices], dtype=np.float64)[ids]  # noqa: E731
    return {
        "unet_s": get("unet_ms_per_sample") / 1e3,
        "vae_s": get("vae_decode_ms") / 1e3,
        "text_s": get("text_encode_ms") / 1e3,
        "power_w": get("power_w"),
        "radio_j_per_b": get("radio_j_per_mb") / 1e6,
    }


def _run_mode(
    cfg: SimConfig,
    spec: ModeSpec,
    workload: Workload,
    table: StepTable,
    latent_bytes: int,
    goodput: np.ndarray,
    uplink: np.ndarray,
    order: np.ndarray,
    closes: np.ndarray | None,
    window_of_sorted: np.ndarray | None,
    grouped: Groups | None,
) -> ModeResult:
    """One mode over the whole workload."""
    n = workload.n
    per_step = cfg.sampling.unet_samples_per_step
    dev = _device_arrays(cfg, workload)
    zeros = np.zeros(n)
    device_compute = spec.device_steps * per_step * dev["unet_s"]
    decode_on_device = spec.payload != "image"
    if decode_on_device:
        device_compute = device_compute + dev["vae_s"]
    if not spec.uses_server:
        device_s = dev["text_s"] + device_compute
        return ModeResult(
            name=spec.name,
            latency_s=device_s,
            uplink_s=zeros,
            window_wait_s=zeros,
            queue_wait_s=zeros,
            gpu_job_s=zeros,
            downlink_s=zeros,
            device_s=device_s,
            energy_j=device_s * dev["power_w"],
            bytes_down=zeros,
            bytes_up=zeros,
            unet_evals_device=int(n * spec.device_steps * per_step),
        )
    assert closes is not None and window_of_sorted is not None
    groups = grouped if spec.grouped else singleton_groups(window_of_sorted)
    assert groups is not None
    # GPU jobs: batch units are groups while only shared steps run, members once branch steps run
    units = groups.size if spec.server_branch_steps > 0 else np.ones_like(groups.size)
    jobs = chunk_jobs(groups, units, max(1, cfg.server.max_batch_samples // per_step))
    duration = (
        spec.server_shared_steps * table.unet_seconds(jobs.groups * per_step)
        + spec.server_branch_steps * table.unet_seconds(jobs.members * per_step)
        + (table.vae_seconds(jobs.members) if spec.server_decodes else 0.0)
        + jobs.members * table.text_encode_ms_per_prompt / 1e3
        + cfg.server.job_overhead_ms / 1e3
    )
    release = closes[jobs.window]
    start, finish = run_gpu_pool(release, duration, cfg.server.gpu_workers)
    # back to requests (sorted positions, then original order)
    job_of_sorted = jobs.of_group[groups.label]
    inv = np.empty(n, dtype=np.int64)
    inv[order] = np.arange(n)
    job = job_of_sorted[inv]
    server_arrival = workload.arrival_s + uplink
    payload = (latent_bytes if spec.payload == "latent" else cfg.codec.image_bytes) + cfg.codec.overhead_bytes
    downlink = transfer_seconds(payload, workload.rtt_s, goodput)
    received = finish[job] + downlink
    if decode_on_device:  # the device encodes its own prompt while it waits for the latent
        done = np.maximum(received, workload.arrival_s + dev["text_s"]) + device_compute
        device_s = dev["text_s"] + device_compute
    else:
        done, device_s = received, zeros
    bytes_down = np.full(n, float(payload))
    bytes_up = np.full(n, float(cfg.codec.request_bytes))
    evals_server = per_step * (spec.server_shared_steps * int(groups.size.shape[0]) + spec.server_branch_steps * n)
    return ModeResult(
        name=spec.name,
        latency_s=done - workload.arrival_s,
        uplink_s=uplink,
        window_wait_s=closes[window_of_sorted[inv]] - server_arrival,
        queue_wait_s=start[job] - release[job],
        gpu_job_s=duration[job],
        downlink_s=downlink,
        device_s=device_s,
        energy_j=device_s * dev["power_w"] + (bytes_down + bytes_up) * dev["radio_j_per_b"],
        bytes_down=bytes_down,
        bytes_up=bytes_up,
        gpu_seconds=float(duration.sum()),
        gpu_busy_span_s=float(finish.max() - start.min()) if len(start) else 0.0,
        unet_evals_server=int(evals_server),
        unet_evals_device=int(n * spec.device_steps * per_step),
        group_sizes=groups.size,
        job_batch_samples=(jobs.groups if spec.server_branch_steps == 0 else jobs.members) * per_step,
    )


def simulate_config(
    cfg: SimConfig, embeddings: np.ndarray, prompts: list[str] | tuple[str, ...], progress: ProgressFn | None = None
) -> SimResult:
    """Build the synthetic workload of a config over a prompt pool and simulate it."""
    from simulation.workload import build_workload

    return simulate(cfg, build_workload(cfg, prompts), embeddings, progress)


__all__ = [
    "ModeResult",
    "SimResult",
    "StepTable",
    "chunk_jobs",
    "form_windows",
    "group_windows",
    "load_step_table",
    "mode_spec",
    "run_gpu_pool",
    "simulate",
    "simulate_config",
]
