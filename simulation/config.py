"""Simulation settings: typed, frozen dataclasses loaded from YAML or JSON and validated up front.

One `SimConfig` is built from a file (or a dict), checked once, and passed down explicitly. Every check raises
`ConfigError` with a one-line message that names the offending key by its dotted path, e.g. `arrivals.rate must be
> 0, got -3`. Data becomes dataclasses through sage_core.config_types (the project's one annotation walker), so a
value of the wrong type is refused as in every other config: `arrivals.rate must be a number, got 'fast'`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_server.config import ConfigError as EdgeConfigError
from edge_server.config import ServerConfig as EdgeServerConfig
from sage_core.config_files import ConfigFileError, read_mapping
from sage_core.config_types import from_mapping
from sage_core.names import unet_samples_per_step

MODES = ("sage", "server", "device", "sage_server")
GROUPED_MODES = ("sage", "sage_server")  # the modes that group requests: what sharing settings change
GROUPED_NAMES = {"sage": "SAGE", "sage_server": "SAGE on server"}  # short names in tables and plot labels
ARRIVAL_PROCESSES = ("poisson", "bursty", "diurnal")
PROMPT_ORDERS = ("shuffle", "uniform", "sequential", "zipf")
DIST_KINDS = ("constant", "uniform", "lognormal", "choice")
DIST_KEYS = {  # per kind: (keys it needs, keys it may have); keys of other kinds are errors, not ignored
    "constant": (("value",), ()),
    "uniform": (("low", "high"), ()),
    "lognormal": (("median",), ("sigma",)),
    "choice": (("values",), ("weights",)),
}
EMBEDDERS = ("minilm", "pipeline", "hashed")  # and pipeline:PATH, pipeline:tiny
DEFAULT_DATASETS_DIR = "../shared/datasets"
DEFAULT_CACHE_DIR = "~/.cache/sage-edge/embeddings"
DEFAULT_STEP_TIMES = Path(__file__).resolve().parent / "step_times.json"


class ConfigError(ValueError):
    """A bad setting; the message names the key and says what is wrong."""


@dataclass(frozen=True)
class Dist:
    """A random quantity: constant (value), uniform (low, high), lognormal (median, sigma) or choice
    (values, weights)."""

    dist: str = "constant"
    value: float = 0.0
    low: float = 0.0
    high: float = 0.0
    median: float = 1.0
    sigma: float = 0.0
    values: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()

    def check(self, name: str, minimum: float, maximum: float = float("inf")) -> None:
        """Raise ConfigError unless every value this distribution can take lies in [minimum, maximum]."""
        _require(self.dist in DIST_KINDS, f"{name}.dist must be one of {', '.join(DIST_KINDS)}, got {self.dist!r}")
        if self.dist == "constant":
            bounds = [self.value]
        elif self.dist == "uniform":
            _require(self.low <= self.high, f"{name}: uniform needs low <= high, got {self.low} > {self.high}")
            bounds = [self.low, self.high]
        elif self.dist == "lognormal":
            _require(self.median > 0, f"{name}.median must be > 0 for a lognormal, got {self.median}")
            _require(self.sigma >= 0, f"{name}.sigma must be >= 0, got {self.sigma}")
            _require(self.sigma == 0 or math.isinf(maximum),
                     f"{name}: a lognormal with sigma > 0 has no upper bound, but {name} must stay <= {maximum}; "
                     "use a uniform or a choice distribution")  # fmt: skip
            bounds = [self.median]
        else:
            _require(len(self.values) > 0, f"{name}: choice needs a non-empty list of values")
            _require(
                not self.weights or len(self.weights) == len(self.values),
                f"{name}: choice needs as many weights as values ({len(self.weights)} vs {len(self.values)})",
            )
            _require(all(w >= 0 for w in self.weights), f"{name}.weights must be >= 0")
            _require(not self.weights or sum(self.weights) > 0, f"{name}.weights must not all be 0")
            bounds = list(self.values)
        for b in bounds:
            _require(minimum <= b <= maximum, f"{name} must lie in [{minimum}, {maximum}], got {b}")

    @staticmethod
    def check_keys(values: dict[str, Any]) -> None:
        """Raise ConfigError when a distribution's data lacks a key its kind needs or has one of another kind (which
        would be ignored); an unknown kind is left to check. sage_core.config_types calls it while reading one."""
        kind = values.get("dist", "constant")
        if kind not in DIST_KEYS:
            return
        needed, optional = DIST_KEYS[kind]
        foreign = sorted(k for k in values if k not in ("dist", *needed, *optional))
        _require(
            not foreign,
            f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to a {kind} distribution "
            f"(its keys: {', '.join((*needed, *optional))})",
        )
        missing = [k for k in needed if k not in values]
        _require(not missing, f"a {kind} distribution needs {' and '.join(missing)}")


DIST_FIELDS = frozenset(f.name for f in dataclasses.fields(Dist))


def dist_data(data: dict[str, Any]) -> dict[str, Any]:
    """A distribution's data with only the keys of its kind (as to_dict writes it)."""
    needed, optional = DIST_KEYS.get(data.get("dist", "constant"), ((), ()))
    return {k: v for k, v in data.items() if k in ("dist", *needed, *optional)}


@dataclass(frozen=True)
class BurstConfig:
    """Two-state Markov-modulated Poisson process: bursts at `factor` x the base rate, on a fraction of the
    time, each burst lasting `mean_on_s` on average. The long-run mean rate stays `arrivals.rate`."""

    factor: float = 5.0
    on_fraction: float = 0.1
    mean_on_s: float = 10.0


@dataclass(frozen=True)
class DiurnalConfig:
    """Sinusoidal rate: rate * (1 + amplitude * sin(2 pi (t + phase_s) / period_s))."""

    period_s: float = 86_400.0
    amplitude: float = 0.6
    phase_s: float = 0.0


@dataclass(frozen=True)
class ArrivalConfig:
    """When requests reach the system."""

    process: str = "poisson"
    rate: float = 50.0  # mean requests per second
    burst: BurstConfig = field(default_factory=BurstConfig)
    diurnal: DiurnalConfig = field(default_factory=DiurnalConfig)


@dataclass(frozen=True)
class PromptConfig:
    """Which prompt text the requests carry and how it is embedded for grouping."""

    dataset: str = "coco"  # coco | diffusiondb | a path to .txt (one prompt a line), .json (list) or .csv (prompt)
    datasets_dir: str = DEFAULT_DATASETS_DIR  # relative paths resolve against the repository root
    order: str = "shuffle"  # shuffle (permutation, reshuffled each pass) | uniform | sequential | zipf
    zipf_s: float = 1.1
    embedder: str = "minilm"  # minilm | pipeline | pipeline:PATH | pipeline:tiny | hashed (lexical, for tests)
    model_config: str = ""  # a config folder a pipeline:FILE single-file checkpoint loads into ("": SD v1.5's)
    cache_dir: str = DEFAULT_CACHE_DIR
    limit: int = 0  # use only the first `limit` prompts of the dataset (0: all)


@dataclass(frozen=True)
class SamplingSettings:
    """The sampler: T steps, sharing ratio beta (k = round(beta * T) shared steps), CFG."""

    steps: int = 30
    share: float = 0.4
    guidance: float = 7.5

    @property
    def shared_steps(self) -> int:
        """k: steps run once per group (SamplingConfig.branch_step() in sage_core.sampler)."""
        return int(round(self.share * self.steps))

    @property
    def unet_samples_per_step(self) -> int:
        """UNet sample evaluations per trajectory step: 2 with classifier-free guidance, else 1."""
        return unet_samples_per_step(self.guidance)


@dataclass(frozen=True)
class GroupingSettings:
    """The edge server's sharing policy, under edge_server.config.ServerConfig's names and defaults: the worker
    builds a sage_core.policy.SharingPolicy and, with cache_mb > 0, a LatentCache from them. `flat` is
    Algorithm 1 (tau, max_group_size, depth round(sampling.share * steps)); `adaptive` nests groups at
    adaptive_taus (largest adaptive_max_sizes) with depths from depth_schedule, capped by sampling.share."""

    tau: float = EdgeServerConfig.tau
    max_group_size: int = EdgeServerConfig.max_group_size
    candidates: int = 64  # offline ideal only: neighbours walked before a full scan (speed, not the grouping)
    sharing: str = EdgeServerConfig.sharing  # flat | adaptive
    adaptive_taus: tuple[float, ...] = EdgeServerConfig.adaptive_taus
    adaptive_max_sizes: tuple[int, ...] = EdgeServerConfig.adaptive_max_sizes
    # pairs (similarity, share); any length is read, so check_policy's message can name what a row must hold
    depth_schedule: tuple[tuple[float, ...], ...] = EdgeServerConfig.depth_schedule
    cache_mb: float = EdgeServerConfig.cache_mb  # per GPU worker (each edge worker holds its own cache); 0: off

    def edge_config(self) -> EdgeServerConfig:
        """The edge server settings of this policy (validated there; other settings at their defaults)."""
        return EdgeServerConfig(
            tau=self.tau,
            max_group_size=self.max_group_size,
            sharing=self.sharing,
            adaptive_taus=self.adaptive_taus,
            adaptive_max_sizes=self.adaptive_max_sizes,
            depth_schedule=self.depth_schedule,
            cache_mb=self.cache_mb,
        )


@dataclass(frozen=True)
class ServerConfig:
    """The edge server (edge_server.engine's batch loop): a window collects from its first queued request until
    window_s after that request arrived (edge server: max_wait_ms) or until max_window_requests are queued
    (max_batch), then waits for a free GPU worker (num_workers), with one worker takes the requests that arrived
    meanwhile (up to max_window_requests), and hands the worker the whole window as one job."""

    window_s: float = 0.5
    max_window_requests: int = 256
    gpu_workers: int = 1
    step_table: str = "h100_sd15_fp16"  # a table name in step_times_file
    step_times_file: str = ""  # default: simulation/step_times.json
    job_overhead_ms: float = 0.0  # fixed cost per GPU job (scheduling, transfers to and from the actor)
    step_delay_ms: float = 0.0  # added to every UNet pass: mirrors the edge server's --worker-step-delay-ms hook


@dataclass(frozen=True)
class CodecSettings:
    """Bytes on the wire. The latent size comes from sage_core.codec when it is installed, else the fallback."""

    mode: str = "fp16"  # a sage_core.codec mode: fp32, fp16, bf16 (lossless), int8, int6, int5, int4, fp8
    level: int = 3
    latent_shape: tuple[int, ...] = (4, 64, 64)
    fallback_latent_bytes: int = 30_720  # fp16 4x64x64 is 32 KiB; zstd saves 5 to 12 % on near-Gaussian data
    image_bytes: int = 60_000  # what the server baselines send: an encoded image
    request_bytes: int = 400  # the request: prompt, settings, framing
    overhead_bytes: int = 200  # per response: headers, accepted/done messages, checksums


@dataclass(frozen=True)
class NetworkConfig:
    """Each request's device link, drawn independently per request."""

    bandwidth_mbps: Dist = field(default_factory=lambda: Dist("lognormal", median=50.0, sigma=0.8))
    rtt_ms: Dist = field(default_factory=lambda: Dist("lognormal", median=30.0, sigma=0.5))
    loss: Dist = field(default_factory=lambda: Dist("choice", values=(0.0, 0.001, 0.01), weights=(0.7, 0.2, 0.1)))
    mss_bytes: int = 1460


@dataclass(frozen=True)
class DeviceClass:
    """A kind of client device: how fast it runs the UNet (per sample, batch of 2 with CFG) and the VAE."""

    name: str = "phone"
    share: float = 1.0  # fraction of requests from this class (normalised over classes)
    unet_ms_per_sample: float = 150.0
    vae_decode_ms: float = 800.0
    text_encode_ms: float = 20.0
    power_w: float = 6.0  # while computing
    radio_j_per_mb: float = 0.2  # radio energy per MB received or sent


@dataclass(frozen=True)
class SweepConfig:
    """Grid for `sage-sim sweep`: every combination is one run (empty list: keep the base value)."""

    window_s: tuple[float, ...] = ()
    tau: tuple[float, ...] = ()
    share: tuple[float, ...] = ()
    rate: tuple[float, ...] = ()
    requests: int = 20_000


@dataclass(frozen=True)
class PolicyVariant:
    """One sharing policy of `sage-sim policies`: the base config with these `grouping` keys and the requests'
    `sampling.share` (the cap on every group's depth) changed; same workload, so the comparison is paired."""

    name: str = "flat"
    grouping: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)


def default_policies() -> tuple[PolicyVariant, ...]:
    """Flat (Algorithm 1), adaptive, and adaptive with a 64 MiB cross-window latent cache."""
    return (
        PolicyVariant("flat", {"sharing": "flat", "cache_mb": 0.0}),
        PolicyVariant("adaptive", {"sharing": "adaptive", "cache_mb": 0.0}),
        PolicyVariant("adaptive+cache", {"sharing": "adaptive", "cache_mb": 64.0}),
    )


@dataclass(frozen=True)
class SimConfig:
    """Everything one simulation run needs."""

    seed: int = 0
    requests: int = 10_000
    modes: tuple[str, ...] = ("sage", "server", "device")
    slo_s: float = 10.0
    arrivals: ArrivalConfig = field(default_factory=ArrivalConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    grouping: GroupingSettings = field(default_factory=GroupingSettings)
    server: ServerConfig = field(default_factory=ServerConfig)
    codec: CodecSettings = field(default_factory=CodecSettings)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    devices: tuple[DeviceClass, ...] = (DeviceClass(),)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    policies: tuple[PolicyVariant, ...] = field(default_factory=default_policies)
    base_dir: str = "."  # where relative paths resolve: the repository root (set by the loader)

    def replace(self, **changes: Any) -> SimConfig:
        """A copy with top-level fields changed, validated again."""
        cfg = dataclasses.replace(self, **changes)
        validate(cfg)
        return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _build(cls: type, data: dict[str, Any], name: str = "") -> Any:
    """Dataclass `cls` from plain YAML/JSON data by sage_core.config_types (unknown keys are errors: a typo must
    not pass silently); its ValueError becomes a ConfigError."""
    try:
        return from_mapping(cls, data, name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate(cfg: SimConfig) -> None:
    """Raise ConfigError on the first bad setting."""
    _require(cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}")
    _require(cfg.requests >= 1, f"requests must be >= 1, got {cfg.requests}")
    _require(len(cfg.modes) > 0, "modes must name at least one of " + ", ".join(MODES))
    for m in cfg.modes:
        _require(m in MODES, f"modes: unknown mode {m!r} (known: {', '.join(MODES)})")
    _require(len(set(cfg.modes)) == len(cfg.modes), f"modes must name each mode once, got {', '.join(cfg.modes)}")
    _require(cfg.slo_s > 0, f"slo_s must be > 0, got {cfg.slo_s}")
    a = cfg.arrivals
    _require(a.process in ARRIVAL_PROCESSES, f"arrivals.process must be one of {', '.join(ARRIVAL_PROCESSES)}")
    _require(a.rate > 0, f"arrivals.rate must be > 0 requests/s, got {a.rate}")
    _require(a.burst.factor >= 1, f"arrivals.burst.factor must be >= 1, got {a.burst.factor}")
    _require(0 < a.burst.on_fraction < 1, f"arrivals.burst.on_fraction must lie in (0, 1), got {a.burst.on_fraction}")
    _require(
        a.burst.factor * a.burst.on_fraction < 1 or a.process != "bursty",
        f"arrivals.burst: factor * on_fraction must be < 1 so the quiet rate stays >= 0, "
        f"got {a.burst.factor} * {a.burst.on_fraction}",
    )
    _require(a.burst.mean_on_s > 0, f"arrivals.burst.mean_on_s must be > 0, got {a.burst.mean_on_s}")
    _require(a.diurnal.period_s > 0, f"arrivals.diurnal.period_s must be > 0, got {a.diurnal.period_s}")
    _require(0 <= a.diurnal.amplitude < 1, f"arrivals.diurnal.amplitude must lie in [0, 1), got {a.diurnal.amplitude}")
    p = cfg.prompts
    _require(p.order in PROMPT_ORDERS, f"prompts.order must be one of {', '.join(PROMPT_ORDERS)}, got {p.order!r}")
    _require(p.zipf_s > 0, f"prompts.zipf_s must be > 0, got {p.zipf_s}")
    _require(p.limit >= 0, f"prompts.limit must be >= 0, got {p.limit}")
    _require(
        p.embedder in EMBEDDERS or p.embedder.startswith("pipeline:"),
        f"prompts.embedder must be minilm, pipeline, pipeline:PATH or hashed, got {p.embedder!r}",
    )
    _require(
        not p.model_config or (p.embedder.startswith("pipeline:") and p.embedder != "pipeline:tiny"),
        f"prompts.model_config is for a single-file checkpoint embedder (pipeline:FILE), got embedder {p.embedder!r}",
    )
    s = cfg.sampling
    _require(s.steps >= 1, f"sampling.steps must be >= 1, got {s.steps}")
    _require(0 <= s.share <= 1, f"sampling.share (beta) must lie in [0, 1], got {s.share}")
    _require(s.guidance >= 0, f"sampling.guidance must be >= 0, got {s.guidance}")
    g = cfg.grouping
    _require(-1 <= g.tau <= 1, f"grouping.tau must lie in [-1, 1] (a cosine similarity), got {g.tau}")
    _require(g.max_group_size >= 1, f"grouping.max_group_size must be >= 1, got {g.max_group_size}")
    _require(g.candidates >= 1, f"grouping.candidates must be >= 1, got {g.candidates}")
    check_policy(g, "grouping")
    sv = cfg.server
    _require(sv.window_s >= 0, f"server.window_s must be >= 0, got {sv.window_s}")
    _require(sv.max_window_requests >= 1, f"server.max_window_requests must be >= 1, got {sv.max_window_requests}")
    _require(sv.gpu_workers >= 1, f"server.gpu_workers must be >= 1, got {sv.gpu_workers}")
    _require(sv.job_overhead_ms >= 0, f"server.job_overhead_ms must be >= 0, got {sv.job_overhead_ms}")
    _require(sv.step_delay_ms >= 0, f"server.step_delay_ms must be >= 0, got {sv.step_delay_ms}")
    c = cfg.codec
    _require(len(c.latent_shape) > 0 and all(d > 0 for d in c.latent_shape), "codec.latent_shape must be positive")
    for key in ("fallback_latent_bytes", "image_bytes", "request_bytes", "overhead_bytes"):
        _require(getattr(c, key) >= 0, f"codec.{key} must be >= 0, got {getattr(c, key)}")
    n = cfg.network
    n.bandwidth_mbps.check("network.bandwidth_mbps", 1e-9)
    n.rtt_ms.check("network.rtt_ms", 0.0)
    n.loss.check("network.loss", 0.0, 0.5)
    _require(n.mss_bytes > 0, f"network.mss_bytes must be > 0, got {n.mss_bytes}")
    _require(len(cfg.devices) > 0, "devices must list at least one device class")
    for i, d in enumerate(cfg.devices):
        for key in ("share", "unet_ms_per_sample", "vae_decode_ms", "text_encode_ms", "power_w", "radio_j_per_mb"):
            _require(getattr(d, key) >= 0, f"devices[{i}].{key} must be >= 0, got {getattr(d, key)}")
    _require(sum(d.share for d in cfg.devices) > 0, "devices: the shares must not all be 0")
    sw = cfg.sweep
    _require(all(w >= 0 for w in sw.window_s), "sweep.window_s values must be >= 0")
    _require(all(-1 <= t <= 1 for t in sw.tau), "sweep.tau values must lie in [-1, 1]")
    _require(all(0 <= b <= 1 for b in sw.share), "sweep.share values must lie in [0, 1]")
    _require(all(r > 0 for r in sw.rate), "sweep.rate values must be > 0")
    _require(sw.requests >= 1, f"sweep.requests must be >= 1, got {sw.requests}")
    names = [v.name for v in cfg.policies]
    _require(all(names) and len(set(names)) == len(names), f"policies need distinct, non-empty names, got {names}")
    for i in range(len(cfg.policies)):
        policy_config(cfg, i)


def grouped_modes(cfg: SimConfig, purpose: str) -> tuple[str, ...]:
    """The config's modes that group requests (sage, sage_server); ConfigError if none, since sweeping or
    comparing sharing settings (`purpose`) would then report another mode's numbers."""
    modes = tuple(m for m in cfg.modes if m in GROUPED_MODES)
    _require(bool(modes), f"modes must include {' or '.join(GROUPED_MODES)} {purpose}, got {', '.join(cfg.modes)}")
    return modes


def check_policy(g: GroupingSettings, where: str) -> None:
    """Raise ConfigError unless the edge server accepts this sharing policy (its own checks, one line)."""
    _require(
        all(len(pair) == 2 for pair in g.depth_schedule),
        f"{where}.depth_schedule must be a list of [similarity, share] pairs, got {list(g.depth_schedule)}",
    )
    try:
        g.edge_config()
    except EdgeConfigError as exc:
        raise ConfigError(f"{where}.{exc}") from None


def policy_config(cfg: SimConfig, index: int) -> SimConfig:
    """The config of cfg.policies[index]: its grouping and sampling keys over the base ones, validated."""
    v, where = cfg.policies[index], f"policies[{index}]"
    _require(isinstance(v.grouping, dict), f"{where}.grouping must be a mapping")
    _require(isinstance(v.sampling, dict), f"{where}.sampling must be a mapping")
    _require(set(v.sampling) <= {"share"}, f"{where}.sampling may set only share, got {sorted(v.sampling)}")
    # the base keys are all known, so an unknown key is the override's, named by its path (policies[0].grouping.x)
    grouping = _build(GroupingSettings, {**to_dict(cfg.grouping), **v.grouping}, f"{where}.grouping")
    sampling = _build(SamplingSettings, {**to_dict(cfg.sampling), **v.sampling}, f"{where}.sampling")
    out = dataclasses.replace(cfg, grouping=grouping, sampling=sampling, policies=())
    try:
        validate(out)
    except ConfigError as exc:
        raise ConfigError(f"{where} ({v.name}): {exc}") from None
    return out


def config_from_dict(data: dict[str, Any], base_dir: str | Path = ".") -> SimConfig:
    """Build and validate a SimConfig from plain data; relative paths resolve against `base_dir`."""
    _require(isinstance(data, dict), "a simulation config must be a mapping at the top level")
    data = dict(data)
    data.setdefault("base_dir", str(base_dir))
    cfg = _build(SimConfig, data)
    validate(cfg)
    return cfg


def repo_root() -> Path:
    """The repository root (the folder above this package)."""
    return Path(__file__).resolve().parent.parent


def load_config(path: str | Path) -> SimConfig:
    """Read a YAML or JSON config file; relative dataset paths resolve against the repository root. A file
    without settings is refused: it is far more often a mistake than a wish for every default."""
    try:
        data = read_mapping(path)
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from None
    _require(bool(data), f"config file {path} holds no settings; an empty config is refused rather than run on "
             "every default (see simulation/configs/ for examples)")
    return config_from_dict(data, base_dir=repo_root())


def resolve_path(cfg: SimConfig, path: str) -> Path:
    """A user path: ~ expanded, relative paths taken from cfg.base_dir."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(cfg.base_dir) / p


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (for JSON output and workload files); a distribution keeps only its kind's keys."""
    return json.loads(json.dumps(dataclasses.asdict(cfg, dict_factory=_plain)))


def _plain(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A dataclass's fields as a dict (dataclasses.asdict's dict_factory), a Dist's pruned by dist_data."""
    data = dict(pairs)
    return dist_data(data) if data.keys() == DIST_FIELDS else data
