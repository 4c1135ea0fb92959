"""One typed configuration for the edge server: defaults < config file (YAML or TOML) < CLI flags.

Light on imports on purpose: the front end must not pull in torch or diffusers. The few names it needs from
sage_core (scheduler kinds, codec modes) are mirrored here; tests/test_edge_server.py checks they still match.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_core.config_files import ConfigFileError, read_mapping
from sage_core.config_types import check_fields, unknown_settings
from sage_core.names import (  # torch-free: the front end checks settings without importing torch
    ATTENTION_BACKENDS,
    CODEC_MODES,
    COMPILE_MODES,
    QUANTIZE_MODES,
    SCHEDULER_NAMES,
    SHARED_CONDITIONS,
    TUNING_LEVEL_NAMES,
)

SHARING_MODES: tuple[str, ...] = ("flat", "adaptive")
BUILTIN_MODELS: tuple[str, ...] = ("default", "tiny", "sd15-random")  # model names that are no folder or file
LOG_FORMATS = ("text", "json")
GRPC_MESSAGE_LIMIT = 4 * 2**20


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message names the setting."""


# the sequence settings, each as the tuple it is stored as (a file may give them as lists)
_SEQUENCES: dict[str, Callable[[Any], tuple]] = {
    "codecs": tuple,
    "unet_buckets": lambda v: tuple(int(b) for b in v),
    "adaptive_taus": lambda v: tuple(float(t) for t in v),
    "adaptive_max_sizes": lambda v: tuple(int(n) for n in v),
    "depth_schedule": lambda v: tuple((float(a), float(b)) for a, b in v),
}


@dataclass(frozen=True)
class ServerConfig:
    """Everything the edge server needs, passed down explicitly (no globals)."""

    # network
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port (printed as `SAGE_EDGE_LISTENING port=N`)
    # model and workers
    model: str = "default"  # "default": the shipped model; "tiny": a tiny random pipeline (tests); a folder or file
    model_config: str | None = None  # with a single-file model: the folder of its component configs (SD v1.5's: None)
    adapter: str = "none"  # SAGE LoRA: "none" (sage_core.adapters.DEFAULT_ADAPTER_CHOICE), "auto" (the shipped one
    # when made for this model) or a folder
    dtype: str = "auto"  # "auto": float16 on CUDA, float32 on CPU; or "float32" / "float16" / "bfloat16"
    ray_address: str | None = None  # None: start a local Ray; "auto" or "host:port": join that cluster
    ray_num_cpus: int = 2  # CPUs of a local Ray; on a machine without a GPU also each worker's torch threads
    num_workers: int = 1  # Ray actors holding the model (num_gpus=1 each on a GPU machine)
    worker_pipeline: int = 2  # windows in flight per worker: the next one, taken when the last one leaves the model,
    #                           runs its shared phase while that one encodes
    worker_max_restarts: int = 3
    worker_step_delay_ms: float = 0.0  # test/demo hook: sleep this long per UNet call (a slower accelerator)
    # batching and grouping
    max_wait_ms: float = 50.0
    max_batch: int = 32
    max_queue: int = 256  # admitted, unfinished requests; beyond it: RESOURCE_EXHAUSTED at once
    max_streams_per_client: int = 16  # keyed on the token's client id, else on the id the device declares
    # open streams per peer host (IPv4 address, IPv6 /64, or all unix-socket peers); 0: off, since devices behind
    # one NAT share an address. Without tokens the only cap a device cannot dodge by declaring new client ids
    max_streams_per_host: int = 0
    tau: float = 0.8
    max_group_size: int = 5
    # sharing policy (sage_core.policy): "flat" is Algorithm 1 (tau, max_group_size, each request's share);
    # "adaptive" nests tighter groups in looser ones and sets each group's depth from its similarity
    sharing: str = "flat"
    adaptive_taus: tuple[float, ...] = (0.6, 0.75, 0.9)
    adaptive_max_sizes: tuple[int, ...] = (16, 8, 5)
    depth_schedule: tuple[tuple[float, float], ...] = ((0.70, 0.0), (0.80, 0.2), (0.90, 0.4), (0.97, 0.5))
    cache_mb: float = 0.0  # cross-window latent cache (sage_core.latent_cache); 0: off
    # what a group's shared steps run on: "medoid" (the member closest to the others; measured better on the
    # shipped model) or "mean" (the paper's mean of the members' token embeddings)
    shared_condition: str = "medoid"
    # sampling defaults (used when a request leaves a field unset)
    default_steps: int = 30
    default_guidance: float = 7.5
    default_share: float = 0.4
    default_scheduler: str = "ddim"
    # admission limits
    max_steps: int = 200
    max_prompt_chars: int = 1000
    max_image_side: int = 1024
    max_deadline_s: float = 600.0  # server-side cap on any request's lifetime (also applies with no deadline)
    # a window whose requests all left is cancelled, and its worker stops at its next UNet call; one still running
    # this long after the cancel is taken as hung: its model actor is killed and restarted (engine._stop_hung). So
    # is one that does not answer the engine's progress question this long while it runs a window
    hung_window_s: float = 30.0
    # a running window whose worker starts no UNet call for this long is taken as hung too (a stuck GPU): 0 is off,
    # as one UNet call of a large batch on a CPU, or a compile inside a call, may take minutes (engine._watch_window)
    stall_s: float = 0.0
    # HTTP/2 keepalive: a connection quiet this long is pinged, and one whose device does not answer within
    # keepalive_timeout_s is closed, its requests cancelled (a device that left the network frees its queue slots)
    keepalive_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    # transport
    codecs: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "fp8", "int6", "int5", "int4")  # preference
    # shared-phase UNet: torch.compile mode ("none", "default", "reduce-overhead", ...) and fixed batch buckets
    # (UNet rows, CFG included) warmed at start, so compilation never lands on a request; () = no padding
    unet_compile: str = "none"
    unet_buckets: tuple[int, ...] = ()
    # TorchInductor options for diffusion UNets (sage_core.unet_buckets.TUNING_LEVELS): none, light (1x1
    # convolutions as matmuls), full (and coordinate-descent tuning: minutes of compiling more)
    unet_compile_tuning: str = "none"
    unet_channels_last: bool = True  # with unet_compile: weights and skip concatenations channels-last
    attention_backend: str = "auto"  # the shared-phase UNet's SDPA kernel: auto (PyTorch's choice), flash, cudnn, ...
    cudnn_benchmark: bool = False  # let cuDNN time its convolution algorithms per shape (needs unet_buckets)
    # with unet_compile: "fp8" runs the UNet's linear layers in float8 (torchao; GPU 8.9+); "fp8-rowwise" its linear
    # layers and 1x1 convolutions, with row-wise scales (torch._scaled_mm; Hopper GPUs); "fp8-static" the same
    # layers with one scale per tensor, the inputs' calibrated at start; "fp8-static-geglu" also fuses each
    # transformer feed-forward's GEGLU into one Triton kernel, "fp8-static-conv" also runs the 3x3 convolutions in
    # float8 (Triton; sage_core.fp8_kernels)
    unet_quantize: str = "none"
    # TorchInductor's caches when unet_compile is set: a restart loads the compiled kernels instead of compiling
    compile_cache: str = "~/.cache/sage-edge/torch-compile"
    zstd_level: int = 3
    chunk_size: int = 256 * 1024
    # security (docs/deployment.md): TLS when tls_cert + tls_key are set, mutual TLS when tls_client_ca is too;
    # bearer tokens on every method but health when auth_tokens_file is set (lines `token` or `client_id:token`)
    tls_cert: str | None = None  # PEM server certificate chain
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA bundle that client certificates must chain to (mutual TLS)
    auth_tokens_file: str | None = None
    model_sha256: str | None = None  # pin: sage_core.models.folder_sha256 of the model (folder or file), at load
    # metrics (Prometheus text format on http://metrics_host:metrics_port/metrics); None: off, 0: a free port
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # lifecycle and logs
    grace_s: float = 10.0
    log_format: str = "text"
    log_level: str = "INFO"
    extra: Mapping[str, Any] = field(default_factory=dict)  # unused keys are refused; kept for forward compat

    def __post_init__(self) -> None:
        for name, convert in _SEQUENCES.items():
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, convert(value))
            except (TypeError, ValueError, OverflowError):
                pass  # kept as given: check_fields names the bad item (`adaptive_taus[1] must be a number, got 'x'`)
        try:
            check_fields(self)  # each value of its annotated type (a quoted "8" is no integer), named if not
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        for problem in _problems(self):
            raise ConfigError(problem)

    def to_json(self) -> str:
        """The effective configuration as one JSON object (logged at start)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


def _problems(c: ServerConfig) -> list[str]:
    """Every invalid setting of `c`, as clear messages (empty when valid)."""
    out: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            out.append(message)

    need(0 <= c.port <= 65535, f"port must be in [0, 65535], got {c.port}")
    need(bool(c.host), "host must not be empty")
    need(bool(c.model), "model must not be empty (use 'default', 'tiny', a pipeline folder or a .safetensors file)")
    need(c.model_config is None or c.model not in BUILTIN_MODELS,
         f"model_config is for a single-file model; model {c.model!r} is built in")
    need(
        c.dtype in ("auto", "float32", "float16", "bfloat16"),
        f"dtype must be auto/float32/float16/bfloat16, got {c.dtype!r}",
    )
    need(c.ray_num_cpus >= 1, f"ray_num_cpus must be >= 1, got {c.ray_num_cpus}")
    need(c.num_workers >= 1, f"num_workers must be >= 1, got {c.num_workers}")
    need(1 <= c.worker_pipeline <= 4, f"worker_pipeline must be in [1, 4], got {c.worker_pipeline}")
    need(c.worker_max_restarts >= 0, f"worker_max_restarts must be >= 0, got {c.worker_max_restarts}")
    need(c.worker_step_delay_ms >= 0, f"worker_step_delay_ms must be >= 0, got {c.worker_step_delay_ms}")
    need(c.max_wait_ms >= 0, f"max_wait_ms must be >= 0, got {c.max_wait_ms}")
    need(c.max_batch >= 1, f"max_batch must be >= 1, got {c.max_batch}")
    need(c.max_queue >= 1, f"max_queue must be >= 1, got {c.max_queue}")
    need(c.max_streams_per_client >= 1, f"max_streams_per_client must be >= 1, got {c.max_streams_per_client}")
    need(c.max_streams_per_host >= 0, f"max_streams_per_host must be >= 0 (0: off), got {c.max_streams_per_host}")
    need(-1.0 <= c.tau <= 1.0, f"tau must be a cosine similarity in [-1, 1], got {c.tau}")
    need(c.max_group_size >= 1, f"max_group_size must be >= 1, got {c.max_group_size}")
    need(c.sharing in SHARING_MODES, f"sharing must be one of {', '.join(SHARING_MODES)}, got {c.sharing!r}")
    need(c.shared_condition in SHARED_CONDITIONS,
         f"shared_condition must be one of {', '.join(SHARED_CONDITIONS)}, got {c.shared_condition!r}")
    need(
        len(c.adaptive_taus) == len(c.adaptive_max_sizes) > 0 and list(c.adaptive_taus) == sorted(c.adaptive_taus),
        "adaptive_taus must go from loose to tight, one adaptive_max_sizes entry each",
    )
    need(all(n >= 1 for n in c.adaptive_max_sizes), "adaptive_max_sizes must be >= 1")
    sims = [a for a, _ in c.depth_schedule]
    shares = [b for _, b in c.depth_schedule]
    need(
        bool(sims) and sims == sorted(set(sims)) and shares == sorted(shares) and all(0 <= b <= 1 for b in shares),
        "depth_schedule must be (similarity, share) pairs, similarities increasing, shares non-decreasing in [0, 1]",
    )
    need(c.cache_mb >= 0, f"cache_mb must be >= 0, got {c.cache_mb}")
    need(1 <= c.max_steps <= 1000, f"max_steps must be in [1, 1000], got {c.max_steps}")
    need(1 <= c.default_steps <= c.max_steps, f"default_steps must be in [1, max_steps={c.max_steps}]")
    need(0.0 <= c.default_guidance <= 100.0, f"default_guidance must be in [0, 100], got {c.default_guidance}")
    need(0.0 <= c.default_share <= 1.0, f"default_share must be in [0, 1], got {c.default_share}")
    need(c.default_scheduler in SCHEDULER_NAMES, f"default_scheduler must be one of {SCHEDULER_NAMES}")
    need(1 <= c.max_prompt_chars <= 100_000, f"max_prompt_chars must be in [1, 100000], got {c.max_prompt_chars}")
    need(8 <= c.max_image_side <= 4096, f"max_image_side must be in [8, 4096], got {c.max_image_side}")
    need(c.max_deadline_s > 0, f"max_deadline_s must be > 0, got {c.max_deadline_s}")
    need(0.1 <= c.hung_window_s <= 86_400, f"hung_window_s must be in [0.1, 86400] seconds, got {c.hung_window_s}")
    need(c.stall_s == 0 or 0.1 <= c.stall_s <= 86_400, f"stall_s must be 0 (off) or in [0.1, 86400] seconds, got "
         f"{c.stall_s}")
    for name in ("keepalive_s", "keepalive_timeout_s"):
        need(0.1 <= getattr(c, name) <= 86_400, f"{name} must be in [0.1, 86400] seconds, got {getattr(c, name)}")
    modes = ", ".join(COMPILE_MODES)
    need(c.unet_compile in COMPILE_MODES, f"unet_compile must be one of {modes}, got {c.unet_compile!r}")
    need(all(b >= 1 for b in c.unet_buckets), f"unet_buckets must be positive batch sizes, got {list(c.unet_buckets)}")
    need(not c.cudnn_benchmark or bool(c.unet_buckets),
         "cudnn_benchmark needs unet_buckets: cuDNN times its algorithms on each new shape's first call, which "
         "must happen at warm-up, not on a request")
    need(c.unet_compile_tuning in TUNING_LEVEL_NAMES,
         f"unet_compile_tuning must be one of {', '.join(TUNING_LEVEL_NAMES)}, got {c.unet_compile_tuning!r}")
    need(c.unet_compile != "none" or (c.unet_compile_tuning == "none" and c.unet_channels_last),
         "unet_compile_tuning and unet_channels_last shape the compiled UNet: they need unet_compile")
    need(c.unet_quantize in QUANTIZE_MODES,
         f"unet_quantize must be one of {', '.join(QUANTIZE_MODES)}, got {c.unet_quantize!r}")
    need(c.unet_quantize == "none" or c.unet_compile != "none",
         "unet_quantize needs unet_compile: eager, float8's scaling kernels cost more than its matmuls save")
    cache = Path(c.compile_cache).expanduser()
    need(bool(c.compile_cache) and not (cache.exists() and not cache.is_dir()),
         f"compile_cache must be a folder (made if missing), got {c.compile_cache!r}")
    need(c.attention_backend in ATTENTION_BACKENDS,
         f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {c.attention_backend!r}")
    need(len(c.codecs) > 0, "codecs must name at least one codec mode")
    unknown = [m for m in c.codecs if m not in CODEC_MODES]
    need(not unknown, f"unknown codec modes {unknown}; known: {', '.join(CODEC_MODES)}")
    need(-7 <= c.zstd_level <= 22, f"zstd_level must be in [-7, 22], got {c.zstd_level}")
    need(
        1024 <= c.chunk_size <= GRPC_MESSAGE_LIMIT // 2,
        f"chunk_size must be in [1024, {GRPC_MESSAGE_LIMIT // 2}] bytes (well under gRPC's 4 MiB), got {c.chunk_size}",
    )
    need(bool(c.tls_cert) == bool(c.tls_key), "tls_cert and tls_key must be set together")
    need(not c.tls_client_ca or bool(c.tls_cert), "tls_client_ca (mutual TLS) needs tls_cert and tls_key")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file"):
        path = getattr(c, name)
        need(not path or Path(path).is_file(), f"{name}: file {path} does not exist")
    need(
        c.model_sha256 is None
        or (len(c.model_sha256) == 64 and all(ch in "0123456789abcdef" for ch in c.model_sha256)),
        "model_sha256 must be 64 lowercase hex digits (sage-edge-server model-sha256 MODEL prints it)",
    )
    need(
        c.model_sha256 is None or c.model not in ("tiny", "sd15-random"),
        "model_sha256 pins a model folder or file; the in-memory 'tiny' and 'sd15-random' models have none",
    )
    need(
        c.metrics_port is None or 0 <= c.metrics_port <= 65535,
        f"metrics_port must be in [0, 65535], got {c.metrics_port}",
    )
    need(bool(c.metrics_host), "metrics_host must not be empty")
    need(c.grace_s >= 0, f"grace_s must be >= 0, got {c.grace_s}")
    need(c.log_format in LOG_FORMATS, f"log_format must be one of {LOG_FORMATS}, got {c.log_format!r}")
    need(str(c.log_level).upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), f"bad log_level {c.log_level!r}")
    need(not c.extra, unknown_settings(sorted(c.extra), setting_names()))
    return out


def setting_names() -> frozenset[str]:
    """The settings a ServerConfig takes: its fields but `extra`, which holds the unknown ones."""
    return frozenset(f.name for f in dataclasses.fields(ServerConfig)) - {"extra"}


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a YAML (.yaml/.yml) or TOML (.toml) file; a `server:` / `[server]` section is optional."""
    try:
        data = read_mapping(path, suffixes=(".yaml", ".yml", ".toml"))
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from None
    settings = data.get("server", data)
    if not isinstance(settings, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings (optionally under `server:`)")
    return dict(settings)


def build_config(file: Path | None = None, overrides: Mapping[str, Any] | None = None) -> ServerConfig:
    """Defaults, then the file's settings, then non-None `overrides` (CLI flags). Unknown keys are an error."""
    values: dict[str, Any] = read_config_file(file) if file is not None else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    names = setting_names()
    unknown = {k: v for k, v in values.items() if k not in names}
    known = {k: v for k, v in values.items() if k in names}
    if isinstance(known.get("codecs"), str):
        known["codecs"] = tuple(m.strip() for m in known["codecs"].split(",") if m.strip())
    if isinstance(known.get("unet_buckets"), str):
        try:
            known["unet_buckets"] = tuple(int(b) for b in known["unet_buckets"].split(",") if b.strip())
        except ValueError as exc:
            bad = known["unet_buckets"]
            raise ConfigError(f"unet_buckets must be comma-separated batch sizes, got {bad!r}") from exc
    if isinstance(known.get("unet_compile_tuning"), bool):  # the switch it was before it had levels
        known["unet_compile_tuning"] = "full" if known["unet_compile_tuning"] else "none"
    if known.get("ray_address") in ("", "local", "none", "None"):
        known["ray_address"] = None
    try:
        return ServerConfig(**known, extra=unknown)
    except TypeError as exc:
        raise ConfigError(f"bad configuration: {exc}") from exc
