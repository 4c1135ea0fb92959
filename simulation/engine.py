"""The discrete-event model of the edge server, the device links and the devices.

What is an event and what is a vector:
- Per request, everything that does not depend on other requests is numpy over all requests at once: uplink and
  downlink times from each link's bandwidth, RTT and loss, and device compute time and energy.
- The server is a simpy model of edge_server.engine's batch loop: a window opens at the first queued request and
  collects until `window_s` after that request arrived or until `max_window_requests` are queued (a backlog is
  taken at once); the loop then waits for a free GPU worker, with one worker tops the window up with the requests
  that arrived meanwhile (up to `max_window_requests`), and hands it the whole window as one job, and collects the
  next window while the job runs. The worker plans the window with the edge worker's sharing
  policy (sage_core.policy.plan_window: flat Algorithm 1 or adaptive hierarchical groups, depths capped by the
  requests' share) and, with a cross-window latent cache (one per worker), starts groups from cached latents
  (sage_core.policy.reuse_cached).
- A job's duration comes from the measured step-time table: each batched UNet pass of the plan's shared phase
  (in rounds, as sage_core.adaptive.run_shared_plan runs it; cached steps cost nothing), the members'
  remaining steps where the server runs them, VAE decode where the server decodes, plus text encoding, one
  latent encoding per delivery and a per-window overhead.

Modes (all from the same workload, so the comparison is paired):
- sage: shared phase on the server (flat: k = round(beta T) steps per group; adaptive: each group's own depth),
  latent to every member's device, the remaining T - depth steps and VAE decode on the device.
- server: independent sampling on the server (T steps per request, batched per window), image to the device.
- device: everything on the device, no server and no network.
- sage_server: shared sampling entirely on the server (shared + branch + decode), image to the device.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import simpy
import torch

from edge_server.worker import sharing_policy as edge_sharing_policy
from sage_core.adaptive import GroupNode, cap_depths, deliveries, leaf_of, plan_nodes
from sage_core.grouping import normalize
from sage_core.latent_cache import CacheSettings, LatentCache
from sage_core.policy import SharingPolicy, plan_window, reuse_cached
from sage_core.sampler import Span, plan_rounds
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
    """Where the steps of one request run, and what crosses the network. The step counts are those of the flat
    policy (k = round(beta T)); a window's plan sets each request's own shared depth."""

    name: str
    uses_server: bool
    grouped: bool
    server_shared_steps: int  # steps per group on the server
    server_branch_steps: int  # steps per member on the server
    server_decodes: bool
    device_steps: int  # steps per request on the device
    payload: str  # "latent" | "image" | "none"

    @property
    def server_branches(self) -> bool:
        """Whether the server also runs each request's steps after its shared depth (no device sampling)."""
        return self.uses_server and self.device_steps == 0


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


@dataclass(frozen=True)
class WindowPlan:
    """One window as the edge worker runs it: its root groups, the shared steps each request gets, and the
    trajectories of every batched UNet pass of the shared phase."""

    groups: list[list[int]] | None  # root groups' members (window-local); None: every request alone
    group_sizes: list[int]
    depth: np.ndarray  # [m] steps each request's latent has (the depth of its deepest group)
    shared_passes: np.ndarray  # trajectories in each UNet pass of the shared phase, in order
    deliveries: int  # distinct latents encoded and sent (one per deepest group)
    cached_steps: int = 0  # steps the roots took from the latent cache instead of the GPU
    lookups: int = 0
    hits: int = 0


def level_passes(lengths: np.ndarray) -> np.ndarray:
    """Trajectories in each UNet pass of one batched sage_core.sampler.advance call over trajectories that run
    `lengths` steps (denoise: one pass per round over every trajectory still running)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rounds = np.arange(int(lengths.max(initial=0)))
    return (lengths[None, :] > rounds[:, None]).sum(axis=1)


def singleton_plan(m: int, depth: int) -> WindowPlan:
    """Every request its own group of `depth` steps: `depth` passes over all m trajectories."""
    return WindowPlan(None, [1] * m, np.full(m, depth, dtype=np.int64), np.full(depth, m, dtype=np.int64), m)


def plan_arrays(roots: Sequence[GroupNode], m: int, starts: Sequence[int]) -> WindowPlan:
    """A WindowPlan from a sage_core plan whose roots start at `starts` (0, or a cached latent's step); all its
    groups run in one batched loop, each sub-group from the round its parent ends (sage_core.sampler.plan_rounds,
    as sage_core.adaptive.run_shared_plan runs them)."""
    leaves = leaf_of(roots)
    start_of = {id(r): s for r, s in zip(roots, starts, strict=True)}
    nodes, parents = plan_nodes(roots)
    spans = [Span(start_of[id(n)] if p is None else n.start(), n.depth, p) for n, p in zip(nodes, parents, strict=True)]
    passes = [len(rd.rows) for rd in plan_rounds(spans) if rd.rows]
    return WindowPlan(
        groups=[r.members for r in roots],
        group_sizes=[len(r.members) for r in roots],
        depth=np.fromiter((leaves[i].depth for i in range(m)), dtype=np.int64, count=m),
        shared_passes=np.array(passes, dtype=np.int64),
        deliveries=len(deliveries(roots)),
        cached_steps=int(sum(starts)),
    )


class WindowPlanner:
    """Plans each window as edge_server.worker's _shared_bucket does for requests without negative prompts (the
    simulated load has none; the worker plans each negative prompt's requests apart, sage_core.policy.plan_parts):
    sage_core.policy.plan_window on the window's embeddings, every group's depth capped by the requests' share
    (cap_depths), then, with a latent cache (one
    per GPU worker, as each edge worker holds its own), roots start from cached latents and the window's latents
    are filed at every level of the plan, as stand-in latents of the codec's shape (sage_core.policy.reuse_cached:
    the worker's cached_starts and file_plan). `policy=None` is
    independent sampling: every request alone, all steps on the server. Without a cache, a window in which no
    pair reaches the first grouping tau is all singletons under plan_window (every pair of a group must reach
    it), so the call is skipped after a small check with a safety margin."""

    def __init__(
        self,
        embeddings: np.ndarray,
        policy: SharingPolicy | None,
        steps: int,
        cap: int,
        cache_bytes: int = 0,
        latent_shape: tuple[int, ...] = (1, 4, 64, 64),
        margin: float = 1e-4,
    ) -> None:
        self.embeddings, self.policy, self.steps, self.cap = embeddings, policy, steps, cap
        self.cache_bytes, self.latent_shape = cache_bytes if policy is not None else 0, latent_shape
        self.unit = normalize(embeddings) if policy is not None else embeddings
        tau, self.first_size = first_level(policy) if policy is not None else (-1.0, 1)
        self.threshold = tau - margin
        self.settings = CacheSettings("sim", steps, latent_shape[-2], latent_shape[-1], 0.0, None, "ddim")
        self.caches: dict[int, LatentCache] = {}
        self.alone = self._singleton_depth()
        self.windows = 0
        self.calls = 0
        self.seconds = 0.0  # inside sage_core's planning and cache calls

    def _singleton_depth(self) -> int:
        """The depth a request alone in its window gets (all steps under independent sampling)."""
        if self.policy is None:
            return self.steps
        roots = plan_window(self.embeddings[:1], self.policy, self.steps)
        roots = cap_depths(roots, [self.cap])
        return roots[0].depth

    def _all_alone(self, prompt_ids: np.ndarray) -> bool:
        """Whether plan_window would make every request of the window a singleton (and no cache is asked)."""
        if self.policy is None:
            return True
        if self.cache_bytes:
            return False
        if prompt_ids.shape[0] == 1 or self.first_size == 1:
            return True
        u = torch.from_numpy(self.unit[prompt_ids])  # torch on one thread: numpy's BLAS threads cost more here
        sims = u @ u.T
        sims.fill_diagonal_(-torch.inf)
        return float(sims.max()) < self.threshold

    def __call__(self, prompt_ids: np.ndarray, worker: int = 0) -> WindowPlan:
        """The plan of one window (prompt indices in server-arrival order) run by GPU worker `worker`."""
        self.windows += 1
        m = prompt_ids.shape[0]
        if self._all_alone(prompt_ids):
            return singleton_plan(m, self.alone)
        assert self.policy is not None
        self.calls += 1
        t0 = time.perf_counter()
        emb = self.embeddings[prompt_ids]
        roots = plan_window(emb, self.policy, self.steps)
        roots = cap_depths(roots, [self.cap] * m)
        starts = self._use_cache(roots, emb, worker) if self.cache_bytes else (0, 0, [0] * len(roots))
        plan = dataclasses.replace(plan_arrays(roots, m, starts[2]), lookups=starts[0], hits=starts[1])
        self.seconds += time.perf_counter() - t0
        return plan

    def _use_cache(self, roots: list[GroupNode], emb: np.ndarray, worker: int) -> tuple[int, int, list[int]]:
        """Start roots from the worker's cache and file the window's latents in it, as the edge worker does
        (sage_core.policy.reuse_cached); (lookups, hits, each root's start step)."""
        assert self.policy is not None
        cache = self.caches.setdefault(worker, LatentCache(self.cache_bytes, self.policy.schedule))
        before = (cache.stats.hits, cache.stats.misses)
        starts = reuse_cached(cache, self.settings, roots, emb, self.windows, self.latent_shape)
        hits = cache.stats.hits - before[0]
        return hits + cache.stats.misses - before[1], hits, starts


def first_level(policy: SharingPolicy) -> tuple[float, int]:
    """tau and largest group of a policy's first (loosest) grouping."""
    if policy.mode == "flat":
        return policy.tau, policy.max_group_size
    return policy.taus[0], policy.max_sizes[0]


def sharing_policy(cfg: SimConfig) -> SharingPolicy:
    """The SharingPolicy the edge worker builds from the same settings (edge_server.worker.sharing_policy)."""
    return edge_sharing_policy(cfg.grouping.edge_config())


def window_planner(cfg: SimConfig, spec: ModeSpec, embeddings: np.ndarray) -> WindowPlanner:
    """The planner of a mode: the config's policy and cache for grouped modes, independent sampling otherwise."""
    if not spec.grouped:
        return WindowPlanner(embeddings, None, cfg.sampling.steps, cfg.sampling.steps)
    return WindowPlanner(
        embeddings,
        sharing_policy(cfg),
        cfg.sampling.steps,
        cfg.sampling.shared_steps,
        cache_bytes=int(cfg.grouping.cache_mb * 2**20),
        latent_shape=(1, *cfg.codec.latent_shape),
    )


@dataclass(frozen=True)
class ServerTrace:
    """What the server did. Windows are in dispatch order; requests in server-arrival order ("sorted")."""

    bounds: np.ndarray  # [W + 1]: window w holds sorted requests bounds[w]:bounds[w + 1]
    close_s: np.ndarray  # [W] the window stops collecting
    dispatch_s: np.ndarray  # [W] a GPU worker takes it
    finish_s: np.ndarray  # [W] its shared phase (or whole job) is done
    duration_s: np.ndarray  # [W]
    groups: np.ndarray  # [W] root groups in the window
    group_of: np.ndarray  # [n] root group id of each sorted request
    group_size: np.ndarray  # [G]
    depth: np.ndarray  # [n] shared steps of each sorted request's latent
    shared_steps: np.ndarray  # [W] trajectory steps of the window's shared phase (cached steps excluded)
    shared_passes: np.ndarray  # [W] UNet passes of the window's shared phase
    deliveries: np.ndarray  # [W] latents the window sends
    cached_steps: int = 0
    cache_lookups: int = 0
    cache_hits: int = 0


JobSeconds = Callable[[WindowPlan], float]  # a window's plan -> GPU seconds of its job


def run_server(
    arrival: np.ndarray,
    prompt_ids: np.ndarray,
    window_s: float,
    max_requests: int,
    workers: int,
    planner: WindowPlanner,
    job_seconds: JobSeconds,
    progress: ProgressFn | None = None,
) -> ServerTrace:
    """simpy model of edge_server.engine's batch loop over sorted server-side arrival times:
    1. wait for a first queued request; 2. collect until window_s after that request arrived or until
    max_requests are queued (a backlog is taken at once, up to max_requests); 3. wait for a free GPU worker
    (FIFO) and, with one worker, top the window up with the requests that arrived meanwhile (up to max_requests);
    4. the worker plans the window and runs one batched job; meanwhile the loop collects the next window.
    """
    n = arrival.shape[0]
    arr = arrival.tolist()
    bounds, close, dispatch, groups = [0], [], [], []
    finish: list[float] = []
    duration: list[float] = []
    plans: list[WindowPlan] = []
    group_of = np.empty(n, dtype=np.int64)
    depth = np.empty(n, dtype=np.int64)
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
            worker = yield free.get()  # 3. a free worker (the loop waits here while every worker is busy)
            now = max(now, env.now)
            taken_until = now if workers == 1 else end  # one worker: the arrivals meanwhile too (Engine's top-up)
            j = min(i + max_requests, bisect.bisect_right(arr, taken_until, lo=i))
            plan = planner(prompt_ids[i:j], worker)  # 4. the worker plans the window (its cache) and runs it
            first = len(sizes)
            if plan.groups is None:
                group_of[i:j] = np.arange(first, first + j - i)
            else:
                for g, members in enumerate(plan.groups):
                    group_of[i + np.asarray(members)] = first + g
            depth[i:j] = plan.depth
            sizes.extend(plan.group_sizes)
            seconds = job_seconds(plan)
            plans.append(plan)
            bounds.append(j)
            close.append(end)
            dispatch.append(now)
            groups.append(len(plan.group_sizes))
            duration.append(seconds)
            finish.append(now + seconds)
            done = env.timeout(seconds)  # the worker returns when done; the loop collects the next window
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
        depth=depth,
        shared_steps=np.asarray([int(p.shared_passes.sum()) for p in plans], dtype=np.int64),
        shared_passes=np.asarray([p.shared_passes.shape[0] for p in plans], dtype=np.int64),
        deliveries=np.asarray([p.deliveries for p in plans], dtype=np.int64),
        cached_steps=sum(p.cached_steps for p in plans),
        cache_lookups=sum(p.lookups for p in plans),
        cache_hits=sum(p.hits for p in plans),
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
    grouping_s: float = 0.0  # wall time inside sage_core's planning (plan_window, cap_depths, the cache)
    depth: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # shared steps per request
    deliveries: int = 0  # latents sent by the server (one per deepest group)
    cached_steps: int = 0  # trajectory steps taken from the latent cache instead of the GPU
    cache_lookups: int = 0
    cache_hits: int = 0


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


def server_mode_names(cfg: SimConfig) -> list[str]:
    """The modes of cfg.modes that run requests through the server model (what simulate's progress counts)."""
    return [m for m in cfg.modes if mode_spec(m, cfg).uses_server]


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
    server_modes = server_mode_names(cfg)
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
    """GPU seconds of one window's job from its plan: each UNet pass of the shared phase at its batch, the
    members' remaining steps batched where the server runs them, the server's VAE decode, text encoding, one
    latent encoding per delivery, overheads."""
    per_step = cfg.sampling.unet_samples_per_step
    most = cfg.server.max_window_requests
    passes = table.unet_seconds(np.arange(per_step * most + 1)) + cfg.server.step_delay_ms / 1e3
    unet = np.where(np.arange(per_step * most + 1) > 0, passes, 0.0)
    vae = table.vae_seconds(np.arange(most + 1)).tolist() if spec.server_decodes else [0.0] * (most + 1)
    text_s = table.text_encode_ms_per_prompt / 1e3
    encode_s = table.latent_encode_ms_per_group / 1e3 if spec.payload == "latent" else 0.0
    fixed_s = (table.window_overhead_ms + cfg.server.job_overhead_ms) / 1e3
    steps = cfg.sampling.steps

    def seconds(plan: WindowPlan) -> float:
        members = plan.depth.shape[0]
        gpu = float(unet[per_step * plan.shared_passes].sum())
        if spec.server_branches:
            gpu += float(unet[per_step * level_passes(steps - plan.depth)].sum())
        return gpu + vae[members] + text_s * members + encode_s * plan.deliveries + fixed_s

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
    n, steps = workload.n, cfg.sampling.steps
    per_step = cfg.sampling.unet_samples_per_step
    dev = _device_arrays(cfg, workload)
    zeros = np.zeros(n)
    if not spec.uses_server:
        device_s = dev["text_s"] + steps * per_step * dev["unet_s"] + dev["vae_s"]
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
            unet_evals_device=int(n * steps * per_step),
            depth=np.zeros(n, dtype=np.int64),
        )
    # 1. the server (simpy): windows, plans, GPU workers
    planner = window_planner(cfg, spec, embeddings)
    server_arrival = workload.arrival_s + uplink
    trace = run_server(
        server_arrival[order],
        workload.prompt_ids[order],
        cfg.server.window_s,
        cfg.server.max_window_requests,
        cfg.server.gpu_workers,
        planner,
        job_seconds_fn(cfg, spec, table),
        progress,
    )
    # 2. back to requests in original order
    window_sizes = np.diff(trace.bounds)
    window_of = np.empty(n, dtype=np.int64)
    window_of[order] = np.repeat(np.arange(window_sizes.shape[0]), window_sizes)
    depth = np.empty(n, dtype=np.int64)
    depth[order] = trace.depth
    rest = steps - depth  # steps after each request's shared depth: on its device, or on the server
    # 3. downlink and the device's part (vectorized)
    payload = (latent_bytes if spec.payload == "latent" else cfg.codec.image_bytes) + cfg.codec.overhead_bytes
    downlink = transfer_seconds(payload, workload.rtt_s, goodput)
    received = trace.finish_s[window_of] + downlink
    device_steps = np.zeros(n, dtype=np.int64) if spec.server_branches else rest
    if spec.payload != "image":  # the device encodes its own prompt while it waits for the latent
        device_compute = device_steps * per_step * dev["unet_s"] + dev["vae_s"]
        done = np.maximum(received, workload.arrival_s + dev["text_s"]) + device_compute
        device_s = dev["text_s"] + device_compute
    else:
        done, device_s = received, zeros
    bytes_down = np.full(n, float(payload))
    bytes_up = np.full(n, float(cfg.codec.request_bytes))
    # 4. counts: the shared phase per window, plus each request's remaining steps where the server runs them
    branch = branch_passes = np.zeros_like(window_sizes)
    if spec.server_branches:  # one batched advance over the window's members: as many passes as the longest
        branch = np.add.reduceat(steps - trace.depth, trace.bounds[:-1])
        branch_passes = np.maximum.reduceat(steps - trace.depth, trace.bounds[:-1])
    server_steps = trace.shared_steps + branch
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
        unet_evals_server=int(per_step * server_steps.sum()),
        unet_evals_device=int(per_step * device_steps.sum()),
        group_sizes=trace.group_size,
        window_sizes=window_sizes,
        job_batch_samples=per_step * server_steps / np.maximum(trace.shared_passes + branch_passes, 1),
        grouping_calls=planner.calls,
        grouping_s=planner.seconds,
        depth=depth,
        deliveries=int(trace.deliveries.sum()),
        cached_steps=trace.cached_steps,
        cache_lookups=trace.cache_lookups,
        cache_hits=trace.cache_hits,
    )


def simulate_config(
    cfg: SimConfig, embeddings: np.ndarray, prompts: list[str] | tuple[str, ...], progress: ProgressFn | None = None
) -> SimResult:
    """Build the synthetic workload of a config over a prompt pool and simulate it."""
    from simulation.workload import build_workload

    return simulate(cfg, build_workload(cfg, prompts), embeddings, progress)
