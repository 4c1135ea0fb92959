"""The Ray actor that holds the model: embeds prompts, groups them, runs the shared phase of a whole window in
one batched sampler call (sage_core.adaptive.run_shared_plan over sage_core.sampler.advance, the same step loop the
device's branch phase and the local CLI use; nested groups fork from their parents inside it), and encodes each
group's branch point with the latent codec.

Only plain data crosses the actor boundary (frozen dataclasses of str/int/float/bytes), so the front end never
imports torch or diffusers: they are imported inside the actor's methods.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from edge_server.config import ServerConfig


@dataclass(frozen=True)
class ModelInfo:
    """What the front end needs to know about the model a worker holds."""

    fingerprint: str
    scheduler_config_json: str
    default_height: int
    default_width: int
    pid: int
    device: str
    unet_warmup: str = ""  # how the shared-phase UNet was compiled and warmed at start ("" when it runs eager)


@dataclass(frozen=True)
class BucketSettings:
    """Settings every request of a compatibility bucket shares (one shared_phase call per bucket)."""

    steps: int
    guidance: float
    scheduler: str
    height: int
    width: int


@dataclass(frozen=True)
class MemberSpec:
    """One request as the worker sees it: its prompt, seed, sharing preference, negotiated codec and negative
    prompt (requests with different ones share a bucket's UNet calls, never a group)."""

    prompt: str
    seed: int
    share: float
    codec: str
    seed_explicit: bool = True
    negative_prompt: str = ""


@dataclass(frozen=True)
class BucketJob:
    """The requests of one bucket of a window, in arrival order."""

    settings: BucketSettings
    members: tuple[MemberSpec, ...]


@dataclass(frozen=True)
class Payload:
    """A group's branch point encoded with one codec: codec frames back to back (latent first)."""

    codec: str
    data: bytes
    frame_sizes: tuple[int, ...]
    frame_names: tuple[str, ...]


@dataclass(frozen=True)
class GroupResult:
    """One group of a bucket: its members (indices into the bucket's members), branch step and payloads."""

    members: tuple[int, ...]
    seed: int
    branch_step: int
    min_similarity: float
    latent_shape: tuple[int, ...]
    payloads: dict[str, Payload] = field(default_factory=dict)
    server_steps: int = 0  # trajectory steps the worker ran for this group (each shared step counted once)
    cached_steps: int = 0  # steps this group's latent took from the cross-window cache instead


@dataclass(frozen=True)
class BucketRefused:
    """A bucket whose settings the model's scheduler cannot run (e.g. DDIM at 1000 of the model's 1000 timesteps,
    where a raised max_steps lets a device ask for them): only its members fail, with this reason; the window's
    other buckets run."""

    reason: str


@dataclass(frozen=True)
class WindowResult:
    """Per bucket (same order as the jobs), its groups or why it was refused; and the time the shared phase took."""

    buckets: tuple[tuple[GroupResult, ...] | BucketRefused, ...]
    shared_phase_ms: float


@dataclass(frozen=True)
class Encodable:
    """A delivery after the shared phase: its GroupResult (no payloads yet), its latent and solver state on the
    host, and the codecs its members took."""

    result: GroupResult
    latent: Any
    solver_state: dict[str, Any]
    codecs: tuple[str, ...]


class WindowCancelled(RuntimeError):
    """Every member of the window left while it ran; the worker stopped at the next UNet call."""


class _PacedUNet:
    """Wraps a UNet: stops a cancelled window at the next call, reports each call to `beat` (the worker's progress)
    and, as a test hook, sleeps per call."""

    def __init__(self, unet: Any, stop: threading.Event, delay_s: float, beat: Callable[[], None]) -> None:
        self._unet, self._stop, self._delay_s, self._beat = unet, stop, delay_s, beat

    @property
    def dtype(self) -> Any:
        return self._unet.dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._stop.is_set():
            raise WindowCancelled("window cancelled: all of its requests left")
        if self._delay_s:
            self._stop.wait(self._delay_s)
            if self._stop.is_set():
                raise WindowCancelled("window cancelled: all of its requests left")
        self._beat()
        return self._unet(*args, **kwargs)


def resolve_dtype(name: str) -> Any:
    """torch dtype for a config name ("auto": float16 on CUDA, float32 otherwise)."""
    import torch

    if name == "auto":
        return torch.float16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def sharing_policy(config: ServerConfig) -> Any:
    """The sage_core.policy.SharingPolicy the config describes."""
    from sage_core.adaptive import DepthSchedule
    from sage_core.policy import SharingPolicy

    return SharingPolicy(
        mode=config.sharing,
        tau=config.tau,
        max_group_size=config.max_group_size,
        share=1.0,  # flat depth comes from each request's share (cap_depths)
        taus=config.adaptive_taus,
        max_sizes=config.adaptive_max_sizes,
        schedule=DepthSchedule(config.depth_schedule),
    )


def latent_cache(config: ServerConfig, policy: Any) -> Any:
    """The cross-window latent cache, or None when cache_mb is 0."""
    from sage_core.latent_cache import LatentCache

    return LatentCache(int(config.cache_mb * 2**20), policy.schedule) if config.cache_mb > 0 else None


def load_model(config: ServerConfig) -> Any:
    """The pipeline the config names: "tiny" (tests), "sd15-random" (SD v1.5 architectures with random weights,
    for timing), "default" (the shipped model), a folder, or a single file (into `model_config`'s configs)."""
    import torch

    from sage_core.models import (
        DEFAULT_MODEL_DIR,
        load_pipeline,
        sd15_architecture_pipeline,
        tiny_pipeline,
        verify_pin,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(config.dtype)
    if config.model == "sd15-random":
        return sd15_architecture_pipeline(dtype=dtype, device=device)
    if config.model == "tiny":
        pipe = tiny_pipeline(seed=0)
        return pipe if (device, dtype) == ("cpu", torch.float32) else pipe.to(device=device, dtype=dtype)
    path = None if config.model == "default" else config.model
    if config.model_sha256:  # the deployment's pin, checked on the node that reads the files
        verify_pin(path or DEFAULT_MODEL_DIR, config.model_sha256)
    return load_pipeline(path, dtype=dtype, device=device, config=config.model_config)


def apply_adapter(pipe: Any, choice: str, fingerprint: str) -> str:
    """Apply the configured SAGE LoRA to the pipeline's UNet (sage_core.adapters), merged into its weights (the
    server never switches adapters, and a merged UNet costs no extra matmuls); returns its folder or "none"."""
    from sage_core.adapters import ADAPTER_NONE, load_adapter, resolve_adapter

    folder = resolve_adapter(choice, fingerprint)
    if folder is None:
        return ADAPTER_NONE
    load_adapter(pipe, folder)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return str(folder)


SHARED_ENDS = 256  # ended shared phases kept for a shared_done call still to come (one never sent is pushed out)
EARLY_CANCELS = 256  # cancels kept for windows not come yet (one whose window never comes is pushed out later)
DEFAULT_BUCKETS = (8, 16, 32, 64, 128)  # UNet rows (CFG doubles the trajectories) when compiling without buckets


def worker_says(line: str) -> None:
    """A progress line from the worker's start, on its stderr (Ray forwards it to the server's console)."""
    print(f"sage-edge worker {os.getpid()}: {line}", file=sys.stderr, flush=True)


def serving_unet(pipe: Any, config: ServerConfig) -> tuple[Any, str]:
    """The UNet the shared phase calls: the pipeline's own, or compiled (sage_core.unet_buckets; TorchInductor's
    caches in config.compile_cache, so a restart reuses them) and run at fixed batch buckets, each warmed here at
    the model's default size so that compiling never lands on a request; its attention on the configured SDPA
    backend. With it, a line saying how long the warm-up took and what the compile cache held ("" when eager)."""
    from sage_core.unet_buckets import (
        CUDAGRAPH_MODES,
        STATIC_MODES,
        BucketedUNet,
        CacheCounts,
        compile_unet,
        float8_gemms_on_aten,
        use_compile_cache,
        warm_buckets,
        with_attention,
    )

    if config.unet_compile == "none" and not config.unet_buckets:
        return with_attention(pipe.unet, config.attention_backend), ""
    cache = use_compile_cache(config.compile_cache) if config.unet_compile != "none" else None
    before, start = CacheCounts.now() if cache else None, time.perf_counter()
    compiled = compile_unet(pipe.unet, config.unet_compile, tuning=config.unet_compile_tuning,
                            quantize=config.unet_quantize, channels_last=config.unet_channels_last,
                            calibrate=float8_calibration(pipe) if config.unet_quantize in STATIC_MODES else None)
    unet = BucketedUNet(with_attention(compiled, config.attention_backend), config.unet_buckets or DEFAULT_BUCKETS,
                        graphs=config.unet_compile in CUDAGRAPH_MODES)
    warm_buckets(unet, int(pipe.unet.config.sample_size), report=worker_says)
    aten = " (float8 GEMMs on ATen kernels)" if float8_gemms_on_aten(config.unet_compile, config.unet_quantize) else ""
    quantized = f", {config.unet_quantize}{aten}" if config.unet_quantize != "none" else ""
    summary = f"{config.unet_compile}{quantized}, buckets {','.join(map(str, unet.buckets))}: warmed in " \
              f"{time.perf_counter() - start:.1f} s"
    if before is not None:  # compiled into the cache folder
        counts = CacheCounts.now().since(before)
        summary += f"; compile cache {cache}: {counts.hits} graphs loaded, {counts.misses} compiled"
    return unet, summary


def float8_calibration(pipe: Any) -> Any:
    """Static float8's calibration for the pipeline's UNet: CALIBRATION_PROMPTS encoded by its text encoder, at
    the model's default latent size."""
    from sage_core.grouping import text_embeddings
    from sage_core.unet_buckets import CALIBRATION_PROMPTS, unet_calibration

    cond = text_embeddings(pipe, list(CALIBRATION_PROMPTS))[0]
    return unet_calibration(cond, int(pipe.unet.config.sample_size))


class EdgeWorker:
    """Holds one pipeline; runs one window's shared phase at a time (other threads: the windows in flight and their
    `shared_done`, `watch`, and `alive` / `cancel` / `info` / `stalled_s`)."""

    def __init__(self, config: ServerConfig, first_start: bool = False) -> None:
        import torch

        from sage_core.generate import negative_embedding
        from sage_core.models import ModelError, model_fingerprint

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, min(os.cpu_count() or 1, config.ray_num_cpus)))
        self.config = config
        self.load_error = ""  # why the model or adapter the config names cannot be used (`failure`)
        try:
            self.pipe = load_model(config)
            self.fingerprint = model_fingerprint(self.pipe)  # of the base weights, as devices compute it
            self.adapter = apply_adapter(self.pipe, config.adapter, self.fingerprint)
        except ModelError as exc:
            if not first_start or restarted_actor():  # later (a restart, a replacement): the actor dies, as Ray's
                raise  # watch and revival expect
            self.load_error = str(exc)  # at the server's start: for `failure` (raised, Ray printed its traceback)
            return
        torch.backends.cudnn.benchmark = config.cudnn_benchmark  # process-wide: this process holds one model
        self.unet, self.unet_warmup = serving_unet(self.pipe, config)  # compiled and bucketed if configured
        self.unet_dtype, self.unet_device = self.pipe.unet.dtype, self.pipe.unet.device  # read once: both walk it
        self.uncond = negative_embedding(self.pipe)  # the empty prompt's, for every request without a negative prompt
        self.embedder: Any = None  # prompts -> pooled embeddings [M, D], in place of the text encoder's (benchmarks)
        self.policy = sharing_policy(config)
        self.cache = latent_cache(config, self.policy)
        self._stops: dict[str, threading.Event] = {}
        self._early_cancels: OrderedDict[str, None] = OrderedDict()  # cancelled before their window came
        self._shared_ends: OrderedDict[str, threading.Event] = OrderedDict()  # set once a window's shared phase ended
        self._lock = threading.Lock()
        self._model = threading.Lock()  # one window's shared phase at a time
        self._beat_at: float | None = None  # while a window holds the model: its last sign of progress (monotonic)

    def failure(self) -> str:
        """Why this worker holds no model: the model or adapter its config names cannot be used (a model pin that
        does not match, an adapter trained on another model); "" when it holds one."""
        return self.load_error

    def info(self) -> ModelInfo:
        """Fingerprint, scheduler config and default image size of the model; this process's pid."""
        from sage_core.models import ModelError, model_fingerprint

        if self.load_error:
            raise ModelError(self.load_error)
        scale = self.pipe.vae_scale_factor
        side = int(self.pipe.unet.config.sample_size) * scale
        return ModelInfo(
            fingerprint=model_fingerprint(self.pipe),
            scheduler_config_json=json.dumps(dict(self.pipe.scheduler.config), sort_keys=True, default=str),
            default_height=side,
            default_width=side,
            pid=os.getpid(),
            device=str(self.pipe.unet.device),
            unet_warmup=self.unet_warmup,
        )

    def encode(self, prompts: list[str]) -> tuple[Any, Any]:
        """The prompts' token embeddings [M, L, D] and the pooled embeddings [M, D] (numpy) the grouping compares,
        from one text-encoder pass; `embedder`, when set, gives the pooled ones instead (a benchmark's hook)."""
        from sage_core.grouping import text_embeddings

        cond, pooled = text_embeddings(self.pipe, prompts)
        return cond, pooled.float().cpu().numpy() if self.embedder is None else self.embedder(prompts)

    def alive(self) -> int:
        """This process's pid. The engine sends this call just before each window: when it fails, the window
        reached a dead actor, rather than being run when the actor died (Engine._call_worker)."""
        return os.getpid()

    def watch(self) -> None:
        """Return only when this process ends: the engine keeps one such call open, and its failure tells it that
        the actor died, also while no window runs (Engine._watch). Holds one of the actor's threads."""
        threading.Event().wait()

    def stalled_s(self) -> float:
        """Seconds the window holding the model has gone without starting a UNet call (since it took the model
        when it has made none); 0 when no window holds it. The engine takes a long stall for a hung worker
        (Engine._watch_window). Whatever the window does while it holds the model counts: its text encoding and
        planning too."""
        beat = self._beat_at
        return 0.0 if beat is None else time.monotonic() - beat

    def _beat(self) -> None:
        """Progress: the window holding the model starts a UNet call."""
        self._beat_at = time.monotonic()

    def cancel(self, window_id: str) -> bool:
        """Ask the running window `window_id` to stop at its next UNet call; False if it is not running. A cancel
        that comes before its window (the two calls race from the engine) stops that window when it comes."""
        with self._lock:
            event = self._stops.get(window_id)
            if event is None:
                remember(self._early_cancels, window_id, None, EARLY_CANCELS)
                return False
        event.set()
        return True

    def run_window(self, window_id: str, jobs: list[BucketJob]) -> WindowResult:
        """Group each bucket's prompts and run the shared phase of every group of the window, then encode the
        deliveries. Only the first part holds the model: it ends with `shared_done`, and the engine then sends the
        next window, whose shared phase runs while this one's latents go through the codec."""
        stop, shared_end = threading.Event(), self._shared_end(window_id)
        with self._lock:
            self._stops[window_id] = stop
            if window_id in self._early_cancels:  # cancelled before it came
                del self._early_cancels[window_id]
                stop.set()
        try:
            refusals = [self._refusal(job.settings) for job in jobs]
            with self._model:
                start = time.perf_counter()
                self._beat()
                try:
                    if stop.is_set():
                        raise WindowCancelled("window cancelled: all of its requests left")
                    ready = [
                        () if refused else self._shared_bucket(job, stop)
                        for job, refused in zip(jobs, refusals, strict=True)
                    ]
                finally:
                    self._beat_at = None
            shared_end.set()
            buckets = tuple(
                BucketRefused(refused) if refused else self._encode_bucket(items)
                for refused, items in zip(refusals, ready, strict=True)
            )
            return WindowResult(buckets, (time.perf_counter() - start) * 1000.0)
        finally:
            shared_end.set()  # also when refused, cancelled or failed
            with self._lock:
                self._stops.pop(window_id, None)

    def shared_done(self, window_id: str) -> None:
        """Return once window `window_id`'s shared phase has ended (the window no longer holds the model, or never
        will: refused, cancelled, failed). Sent with the window (its run_window first): the engine then sends this
        worker its next window, so that a window waiting for the model waits in the engine, where requests that
        come meanwhile still join windows, not here. Holds one of the actor's threads."""
        self._shared_end(window_id).wait(self.config.max_deadline_s + self.config.hung_window_s)  # never for good
        with self._lock:
            self._shared_ends.pop(window_id, None)

    def _shared_end(self, window_id: str) -> threading.Event:
        """The event set when window `window_id`'s shared phase has ended (made by its run_window or its
        shared_done, whichever comes first; the last SHARED_ENDS kept when shared_done never came)."""
        with self._lock:
            return remember(self._shared_ends, window_id, threading.Event(), SHARED_ENDS)

    def _refusal(self, settings: BucketSettings) -> str:
        """Why the model's scheduler cannot run a bucket's settings ("" when it can): checked before the window
        takes the model, so that one device's request does not fail the others' buckets. The engine refuses such a
        request at admission (from ModelInfo's copy of the scheduler config); this is the model's own word."""
        from sage_core.sampler import scheduler_refusal

        return scheduler_refusal(dict(self.pipe.scheduler.config), settings.scheduler, settings.steps)

    def _run_bucket(self, job: BucketJob, stop: threading.Event) -> tuple[GroupResult, ...]:
        """One bucket's whole edge path: its shared phase, then its deliveries encoded."""
        return self._encode_bucket(self._shared_bucket(job, stop))

    def _shared_bucket(self, job: BucketJob, stop: threading.Event) -> tuple[Encodable, ...]:
        """Algorithm 1 lines 1-8 for one bucket: encode, plan the groups (sage_core.policy), start each root group
        from its shared noise or a cached latent, run the plan's shared steps batched, and bring each delivery's
        latent to the host."""
        import torch

        from sage_core.adaptive import cap_depths, deliveries, run_shared_plan
        from sage_core.generate import latent_shape
        from sage_core.grouping import token_keys
        from sage_core.latent_cache import CacheSettings
        from sage_core.policy import cached_starts, file_plan, parts_by, plan_parts
        from sage_core.sampler import BranchPoint, SamplingConfig, initial_noises, make_scheduler

        s, pipe = job.settings, self.pipe
        config = SamplingConfig(
            steps=s.steps, guidance=s.guidance, share=0.0, scheduler=s.scheduler, height=s.height, width=s.width,
            shared_condition=self.config.shared_condition,
        )
        prompts = [m.prompt for m in job.members]
        # a negative prompt is guidance's unconditional half: without guidance (omega <= 1) it does nothing; with
        # it, negative prompts are told apart as the text encoder reads them (their tokens)
        negatives = [m.negative_prompt if config.uses_cfg() else "" for m in job.members]
        keys = token_keys(pipe.tokenizer, negatives)
        # 1. encode and plan the groups (lines 1-2), never across negative prompts; no group shares more than any
        #    member asked for
        cond, pooled = self.encode(prompts)
        uncond = self.unconds(negatives, keys)
        roots = plan_parts(pooled, list(parts_by(keys).values()), self.policy, s.steps)
        roots = cap_depths(roots, [round(m.share * s.steps) for m in job.members])
        settings = [CacheSettings(self.fingerprint, s.steps, s.height, s.width, s.guidance, None, s.scheduler,
                                  keys[r.members[0]]) for r in roots]  # each root's: its negative prompt's key
        # 2. each root starts from a cached latent of a close enough earlier group, or from its shared noise
        #    (seeded by its first member's seed; a request that named its seed only reuses that seed's noise)
        shape = latent_shape(pipe, config)
        noise_scheduler = make_scheduler(pipe.scheduler.config, s.scheduler, s.steps)
        leads = [job.members[r.members[0]] for r in roots]
        hits: list = [None] * len(roots)
        if self.cache is not None:
            named = [m.seed if m.seed_explicit else None for m in leads]
            hits = cached_starts(self.cache, settings, roots, pooled, named)
        fresh = [lead.seed for lead, hit in zip(leads, hits, strict=True) if hit is None]
        noises = iter(initial_noises(shape, fresh, noise_scheduler, self.unet_dtype, self.unet_device))
        starts = [hit.point if hit is not None else BranchPoint(next(noises), 0) for hit in hits]
        seeds = [hit.entry.seed if hit is not None else lead.seed for lead, hit in zip(leads, hits, strict=True)]
        cached = [hit.point.step if hit is not None else 0 for hit in hits]
        # 3. the plan's shared steps, all groups of every level (and of every negative prompt) in one batched UNet
        #    call per round (lines 4-8)
        unet = _PacedUNet(self.unet, stop, self.config.worker_step_delay_ms / 1000.0, self._beat)
        with torch.inference_mode():
            points = run_shared_plan(unet, pipe.scheduler.config, roots, starts, cond, uncond, config)
        root_of = {m: r for r, root in enumerate(roots) for m in root.members}
        # 4. keep every level's latent for later windows; encode each delivery once per codec its members took
        if self.cache is not None:
            file_plan(self.cache, settings, roots, pooled, points, seeds, cached)
        ready = []
        plan = deliveries(roots)
        latents = torch.cat([points[id(d.node)].latents for d in plan]).cpu().split(1)  # one device-host copy
        for d, host_latent in zip(plan, latents, strict=True):
            point, r = points[id(d.node)], root_of[d.members[0]]
            result = GroupResult(
                members=d.members,
                seed=seeds[r],
                branch_step=point.step,
                min_similarity=d.node.min_similarity,
                latent_shape=tuple(int(x) for x in point.latents.shape),
                server_steps=d.server_steps - (cached[r] if roots[r].members[0] in d.members else 0),
                cached_steps=cached[r],
            )
            state = {k: v.detach().cpu() for k, v in point.solver_state.items()}
            codecs = tuple(sorted({job.members[m].codec for m in d.members}))
            ready.append(Encodable(result, host_latent, state, codecs))
        return tuple(ready)

    def unconds(self, negatives: list[str], keys: list[str]) -> Any:
        """Guidance's unconditional embeddings for a bucket's members (their negative prompts and those prompts'
        `token_keys`): one [1, L, D] when they share their key, else one per member [M, L, D]; the empty key's is the
        one made at start, the others are encoded in one text-encoder pass, each once (from its first text)."""
        import torch

        from sage_core.grouping import text_embeddings

        firsts: dict[str, str] = {}
        for text, key in zip(negatives, keys, strict=True):
            if key:
                firsts.setdefault(key, text)
        encoded = {"": self.uncond}
        if firsts:
            encoded.update(zip(firsts, text_embeddings(self.pipe, list(firsts.values()))[0].split(1), strict=True))
        if len(set(keys)) == 1:
            return encoded[keys[0]]
        return torch.cat([encoded[k] for k in keys])

    def _encode_bucket(self, ready: tuple[Encodable, ...]) -> tuple[GroupResult, ...]:
        """Each delivery with its payload in every codec its members took (host only: no model, no GPU)."""
        return tuple(
            replace(e.result, payloads={c: self._encode(e.latent, e.solver_state, c) for c in e.codecs})
            for e in ready
        )

    def _encode(self, latent: Any, solver_state: dict[str, Any], mode: str) -> Payload:
        """The latent (on the host), then solver-state tensors, as codec frames. Non-float state goes as lossless
        fp32."""
        import torch

        from sage_core.codec import CodecSpec, LatentCodec

        codec = LatentCodec(CodecSpec(mode=mode, level=self.config.zstd_level))
        lossless = LatentCodec(CodecSpec(mode="fp32", level=self.config.zstd_level))
        frames, names = [codec.encode(latent)], ["latent"]
        for name, t in sorted(solver_state.items()):
            if t.dtype.is_floating_point:
                frames.append(codec.encode(t))
            else:
                frames.append(lossless.encode(t.to(torch.float32).reshape(max(1, t.numel()))))
            names.append(name)
        return Payload(mode, b"".join(frames), tuple(len(f) for f in frames), tuple(names))


def remember(items: OrderedDict, key: str, value: Any, limit: int) -> Any:
    """items[key], set to `value` when missing; beyond `limit` entries the oldest are forgotten."""
    kept = items.setdefault(key, value)
    while len(items) > limit:
        items.popitem(last=False)
    return kept


def restarted_actor() -> bool:
    """Whether this process is a Ray actor that Ray restarted (False outside an actor)."""
    import warnings

    import ray

    if not ray.is_initialized():
        return False
    try:
        with warnings.catch_warnings():  # Ray's property reads its own deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - not in a Ray actor
        return False


def make_worker_actor(config: ServerConfig, first_start: bool = False) -> Any:
    """A Ray actor of EdgeWorker: num_gpus=1 on a GPU machine, else num_cpus=1; restarts, no task retries.
    `first_start`: one of the server's start, which keeps a model or adapter it cannot use for `failure` (the
    server then stops with one error line) instead of dying."""
    import ray

    use_gpu = _cluster_has_gpu()
    actor_cls = ray.remote(EdgeWorker).options(
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
        max_restarts=config.worker_max_restarts,
        max_task_retries=0,
        max_concurrency=2 * config.worker_pipeline + 3,  # windows in flight, their `shared_done`, `watch`, and two for
        #                                                  `alive` / `cancel` / `info` / `stalled_s`
    )
    return actor_cls.remote(config, first_start)


def worker_slots() -> int:
    """How many worker actors the Ray cluster's resources hold now: one GPU each, else (no GPU) one CPU each."""
    import ray

    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)) if _cluster_has_gpu() else int(resources.get("CPU", 0))


def _cluster_has_gpu() -> bool:
    """Whether the Ray cluster offers a GPU (the actor then takes one)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) >= 1.0
