"""The discrete-event model of the edge server, the device links and the devices.

What is an event and what is a vector:
- Per request, everything that does not depend on other requests is numpy over all requests at once: uplink and
  downlink times from each link's bandwidth, RTT and loss, and device compute time and energy.
- The server is a simpy model of edge_server.engine's batch loop: a window opens at the first queued request and
  collects until `window_s` after that request arrived or until `max_window_requests` are queued (a backlog is
  taken at once); the loop then waits for a free GPU worker and hands it the whole window as one job, and
  collects the next window while the job runs. The worker groups the window with
  sage_core.grouping.group_by_similarity on its prompts' embeddings, as the edge worker does.
- A job's duration comes from the measured step-time table: shared steps batched over the window's groups,
  branch steps over its members (where the server runs them), VAE decode where the server decodes, plus text
  encoding, latent encoding and a per-window overhead.

Modes (all from the same workload, so the comparison is paired):
- sage: shared phase on the server (k = round(beta T) steps per group), latent to every member's device,
  branch phase (T - k steps) and VAE decode on the device.
- server: independent sampling on the server (T steps per request, batched per window), image to the device.
- device: everything on the device, no server and no network.
- sage_server: shared sampling entirely on the server (shared + branch + decode), image to the device.
"""

from __future__ import annotations

import bisect
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
    text_encode_ms_per_prompt: float = 0.0  # server-side text encoding (conditioning and grouping)
    latent_encode_ms_per_group: float = 0.0  # codec encoding of a group's branch point
    window_overhead_ms: float = 0.0  # per window: dispatch to the worker and back, noise, bookkeeping

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
    extras = {}
    for key in ("text_encode_ms_per_prompt", "latent_encode_ms_per_group", "window_overhead_ms"):
        value = t.get(key, 0.0)
        if not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{path}:{name}.{key} must be a number >= 0, got {value!r}")
        extras[key] = float(value)
    return StepTable(name, ub, ums, vb, vms, **extras)


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


# ------------------------------------------------------------------------------------------------ the server
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


class Grouper:
    """Groups one window's prompts as the edge worker does: group_by_similarity on the window's embeddings.
    A window with no pair reaching tau is all singletons under that function (every pair of a group must reach
    tau), so the call is skipped for it after a small numpy check with a safety margin. `config=None` gives
    independent sampling: every request its own group."""

    def __init__(self, embeddings: np.ndarray, config: GroupingConfig | None, margin: float = 1e-4) -> None:
        self.embeddings = embeddings
        self.config = config
        self.unit = normalize(embeddings) if config is not None else embeddings
        self.threshold = config.tau - margin if config is not None else 0.0
        self.calls = 0
        self.seconds = 0.0  # inside group_by_similarity
        self.members: list[list[int]] | None = None

    def __call__(self, prompt_ids: np.ndarray) -> list[int]:
        """Group sizes of the window, groups in group_by_similarity's order. `self.members` is left with each
        group's member indices (window-local) when grouping ran, None when every request is a singleton."""
        m = prompt_ids.shape[0]
        self.members = None
        cfg = self.config
        if cfg is None or m == 1 or cfg.max_group_size == 1:
            return [1] * m
        u = torch.from_numpy(self.unit[prompt_ids])  # torch on one thread: numpy's BLAS threads cost more here
        sims = u @ u.T
        sims.fill_diagonal_(-torch.inf)
        if float(sims.max()) < self.threshold:
            return [1] * m
        self.calls += 1
        t0 = time.perf_counter()
        self.members = group_by_similarity(self.embeddings[prompt_ids], cfg)
        self.seconds += time.perf_counter() - t0
        return [len(g) for g in self.members]


@dataclass(frozen=True)
class ServerTrace:
    """What the server did. Windows are in dispatch order; requests in server-arrival order ("sorted")."""

    bounds: np.ndarray  # [W + 1]: window w holds sorted requests bounds[w]:bounds[w + 1]
    close_s: np.ndarray  # [W] the window stops collecting
    dispatch_s: np.ndarray  # [W] a GPU worker takes it
    finish_s: np.ndarray  # [W] its shared phase (or whole job) is done
    duration_s: np.ndarray  # [W]
    groups: np.ndarray  # [W] groups in the window
    group_of: np.ndarray  # [n] group id of each sorted request
    group_size: np.ndarray  # [G]


JobSeconds = Callable[[int, int], float]  # (groups, members) of a window -> GPU seconds of its job


def run_server(
    arrival: np.ndarray,
    prompt_ids: np.ndarray,
    window_s: float,
    max_requests: int,
    workers: int,
    grouper: Grouper,
    job_seconds: JobSeconds,
    progress: ProgressFn | None = None,
) -> ServerTrace:
    """simpy model of edge_server.engine's batch loop over sorted server-side arrival times:
    1. wait for a first queued request; 2. collect until window_s after that request arrived or until
    max_requests are queued (a backlog is taken at once, up to max_requests); 3. wait for a free GPU worker
    (FIFO); 4. the worker groups the window and runs one batched job; meanwhile the loop collects the next window.
    """
    n = arrival.shape[0]
    arr = arrival.tolist()
    bounds, close, dispatch, groups = [0], [], [], []
    finish: list[float] = []
    duration: list[float] = []
    group_of = np.empty(n, dtype=np.int64)
    sizes: list[int] = []
    env = simpy.Environment()
    free = simpy.Store(env)
    for w in range(workers):
        free.put(w)
    report_every = max(1, n // 200)

    def batcher():
        i, now = 0, 0.0
        while i < n:
            if arr[i] > now:  # 1. idle until a request arrives
                yield env.timeout(arr[i] - env.now)
                now = arr[i]
            full = i + max_requests - 1
            end = max(now, min(arr[i] + window_s, arr[full] if full < n else np.inf))
            if end > now:  # 2. collect
                yield env.timeout(end - env.now)
                now = end
            j = min(i + max_requests, bisect.bisect_right(arr, now, lo=i))
            window_sizes = grouper(prompt_ids[i:j])
            first = len(sizes)
            if grouper.members is None:
                group_of[i:j] = np.arange(first, first + j - i)
            else:
                for g, members in enumerate(grouper.members):
                    for member in members:
                        group_of[i + member] = first + g
            sizes.extend(window_sizes)
            seconds = job_seconds(len(window_sizes), j - i)
            worker = yield free.get()  # 3. a free worker (the loop waits here while every worker is busy)
            now = max(now, env.now)
            bounds.append(j)
            close.append(end)
            dispatch.append(now)
            groups.append(len(window_sizes))
            duration.append(seconds)
            finish.append(now + seconds)
            done = env.timeout(seconds)  # 4. run it (the worker returns when done); collect the next window
            done.callbacks.append(lambda _event, worker=worker: free.put(worker))
            if progress and (j // report_every != i // report_every or j == n):
                progress(j, n)
            i = j

    with single_torch_thread():
        env.process(batcher())
        env.run()
    return ServerTrace(
        bounds=np.asarray(bounds, dtype=np.int64),
        close_s=np.asarray(close),
        dispatch_s=np.asarray(dispatch),
        finish_s=np.asarray(finish),
        duration_s=np.asarray(duration),
        groups=np.asarray(groups, dtype=np.int64),
        group_of=group_of,
        group_size=np.asarray(sizes, dtype=np.int64),
    )


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
    window_wait_s: np.ndarray  # server arrival until its window stops collecting
    queue_wait_s: np.ndarray  # window closed until a GPU worker takes it
    gpu_job_s: np.ndarray  # duration of the GPU job that served the request
    downlink_s: np.ndarray
    device_s: np.ndarray  # device compute on the critical path and off it (text encode, branch, decode)
    energy_j: np.ndarray
    bytes_down: np.ndarray
    bytes_up: np.ndarray
    gpu_seconds: float = 0.0
    gpu_busy_span_s: float = 0.0  # first dispatch to last finish
    unet_evals_server: int = 0
    unet_evals_device: int = 0
    group_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    window_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    job_batch_samples: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    grouping_calls: int = 0
    grouping_s: float = 0.0  # wall time inside group_by_similarity


@dataclass
class SimResult:
    """Everything a run produced."""

    cfg: SimConfig
    n: int
    modes: dict[str, ModeResult]
    latent_bytes: int
    latent_bytes_source: str
    step_table: str
    wall_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def window_sizes(self) -> np.ndarray:
        """Window sizes of the first server mode (sage first)."""
        for m in sorted(self.modes.values(), key=lambda m: m.name != "sage"):
            if m.window_sizes.size:
                return m.window_sizes
        return np.zeros(0, dtype=np.int64)


def simulate(
    cfg: SimConfig,
    workload: Workload,
    embeddings: np.ndarray,
    progress: ProgressFn | None = None,
) -> SimResult:
    """Run every mode of cfg.modes on the same workload; `embeddings` rows belong to workload.prompts.
    `progress(done, total)` counts requests through the server models of all server modes."""
    t_start = time.perf_counter()
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
    # 3. the server sees requests in order of arrival at the server
    order = np.argsort(workload.arrival_s + uplink, kind="stable")
    # 4. each mode: server model (simpy), then links and devices (numpy)
    server_modes = [s.name for s in specs if s.uses_server]
    results, timings = {}, {}
    for spec in specs:
        t0 = time.perf_counter()
        offset = n * server_modes.index(spec.name) if spec.uses_server else 0
        mode_progress = (lambda d, _t, o=offset: progress(o + d, n * len(server_modes))) if progress else None
        results[spec.name] = _run_mode(
            cfg, spec, workload, embeddings, table, latent_bytes, goodput, uplink, order, mode_progress
        )
        timings[f"mode_{spec.name}"] = time.perf_counter() - t0
    return SimResult(
        cfg=cfg,
        n=n,
        modes=results,
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


def job_seconds_fn(cfg: SimConfig, spec: ModeSpec, table: StepTable) -> JobSeconds:
    """GPU seconds of one window's job from (groups, members): the shared steps batched over the groups, the
    branch steps over the members, the server's VAE decode, text encoding and latent encoding, overheads."""
    per_step = cfg.sampling.unet_samples_per_step
    most = cfg.server.max_window_requests
    passes = table.unet_seconds(np.arange(per_step * most + 1)) + cfg.server.step_delay_ms / 1e3
    unet = np.where(np.arange(per_step * most + 1) > 0, passes, 0.0).tolist()
    vae = table.vae_seconds(np.arange(most + 1)).tolist() if spec.server_decodes else [0.0] * (most + 1)
    text_s = table.text_encode_ms_per_prompt / 1e3
    encode_s = table.latent_encode_ms_per_group / 1e3 if spec.payload == "latent" else 0.0
    fixed_s = (table.window_overhead_ms + cfg.server.job_overhead_ms) / 1e3
    k, b = spec.server_shared_steps, spec.server_branch_steps

    def seconds(groups: int, members: int) -> float:
        return (
            k * unet[per_step * groups]
            + b * unet[per_step * members]
            + vae[members]
            + text_s * members
            + encode_s * groups
            + fixed_s
        )

    return seconds


def _run_mode(
    cfg: SimConfig,
    spec: ModeSpec,
    workload: Workload,
    embeddings: np.ndarray,
    table: StepTable,
    latent_bytes: int,
    goodput: np.ndarray,
    uplink: np.ndarray,
    order: np.ndarray,
    progress: ProgressFn | None,
) -> ModeResult:
    """One mode over the whole workload."""
    n = workload.n
    per_step = cfg.sampling.unet_samples_per_step
    dev = _device_arrays(cfg, workload)
    zeros = np.zeros(n)
    # 1. device compute (vectorized)
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
    # 2. the server (simpy): windows, grouping, GPU workers
    gcfg = None
    if spec.grouped:
        g = cfg.grouping
        gcfg = GroupingConfig(tau=g.tau, max_group_size=g.max_group_size, candidates=g.candidates)
    grouper = Grouper(embeddings, gcfg)
    server_arrival = workload.arrival_s + uplink
    trace = run_server(
        server_arrival[order],
        workload.prompt_ids[order],
        cfg.server.window_s,
        cfg.server.max_window_requests,
        cfg.server.gpu_workers,
        grouper,
        job_seconds_fn(cfg, spec, table),
        progress,
    )
    # 3. back to requests in original order
    window_sizes = np.diff(trace.bounds)
    window_of = np.empty(n, dtype=np.int64)
    window_of[order] = np.repeat(np.arange(window_sizes.shape[0]), window_sizes)
    # 4. downlink and the device's part (vectorized)
    payload = (latent_bytes if spec.payload == "latent" else cfg.codec.image_bytes) + cfg.codec.overhead_bytes
    downlink = transfer_seconds(payload, workload.rtt_s, goodput)
    received = trace.finish_s[window_of] + downlink
    if decode_on_device:  # the device encodes its own prompt while it waits for the latent
        done = np.maximum(received, workload.arrival_s + dev["text_s"]) + device_compute
        device_s = dev["text_s"] + device_compute
    else:
        done, device_s = received, zeros
    bytes_down = np.full(n, float(payload))
    bytes_up = np.full(n, float(cfg.codec.request_bytes))
    n_groups = int(trace.group_size.shape[0])
    evals_server = per_step * (spec.server_shared_steps * n_groups + spec.server_branch_steps * n)
    batch_units = trace.groups if spec.server_branch_steps == 0 else window_sizes
    return ModeResult(
        name=spec.name,
        latency_s=done - workload.arrival_s,
        uplink_s=uplink,
        window_wait_s=trace.close_s[window_of] - server_arrival,
        queue_wait_s=(trace.dispatch_s - trace.close_s)[window_of],
        gpu_job_s=trace.duration_s[window_of],
        downlink_s=downlink,
        device_s=device_s,
        energy_j=device_s * dev["power_w"] + (bytes_down + bytes_up) * dev["radio_j_per_b"],
        bytes_down=bytes_down,
        bytes_up=bytes_up,
        gpu_seconds=float(trace.duration_s.sum()),
        gpu_busy_span_s=float(trace.finish_s.max() - trace.dispatch_s.min()),
        unet_evals_server=int(evals_server),
        unet_evals_device=int(n * spec.device_steps * per_step),
        group_sizes=trace.group_size,
        window_sizes=window_sizes,
        job_batch_samples=batch_units * per_step,
        grouping_calls=grouper.calls,
        grouping_s=grouper.seconds,
    )


def simulate_config(
    cfg: SimConfig, embeddings: np.ndarray, prompts: list[str] | tuple[str, ...], progress: ProgressFn | None = None
) -> SimResult:
    """Build the synthetic workload of a config over a prompt pool and simulate it."""
    from simulation.workload import build_workload

    return simulate(cfg, build_workload(cfg, prompts), embeddings, progress)
