"""Fixed UNet batch shapes for compiled serving: every call's batch is padded up to a bucket (batches beyond the
largest bucket are cut into largest-bucket pieces) and the output sliced back, so a UNet compiled with
torch.compile (or captured in CUDA graphs) sees only the bucket shapes, all of them warmed before requests come.

The sampler calls `unet(x, t, encoder_hidden_states=c, return_dict=False)[0]` with per-row timesteps; a
BucketedUNet takes that call and returns the same rows as the bare UNet (padding rows repeat the last row and
are dropped; the UNet treats rows independently).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sage_core.fp8 import device_name, fits_float8_gemm, to_float8_rowwise, to_float8_static
from sage_core.names import ATTENTION_BACKENDS, COMPILE_MODES, QUANTIZE_MODES  # noqa: F401  (re-exported)

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs
# QUANTIZE_MODES, the compiled UNet's matmuls: as they are; float8 linear layers (torchao); float8 linear layers and
# 1x1 convolutions with row-wise scales, or with one scale per tensor, the inputs' calibrated at start (sage_core.fp8,
# torch._scaled_mm alone); static with each transformer feed-forward's GEGLU fused into one kernel; and that with
# the 3x3 convolutions in float8 too (sage_core.fp8_kernels)
STATIC_MODES: dict[str, dict[str, bool]] = {  # the modes that need a calibration run: to_float8_static's options
    "fp8-static": {}, "fp8-static-geglu": {"fuse_geglu": True}, "fp8-static-conv": {"fuse_geglu": True, "convs": True}}
# static float8's calibration (`unet_calibration`): the empty prompt (guidance's unconditional half) and captions of
# everyday scenes, at timesteps across the schedule
CALIBRATION_PROMPTS = ("", "a photograph of a dog running on a beach", "a red car parked in front of an old building",
                       "a bowl of fruit on a wooden table", "a painting of mountains at sunset",
                       "two people playing tennis on a court")
CALIBRATION_TIMESTEPS = (999, 800, 600, 400, 200, 1)
# TorchInductor options for diffusion UNets (PyTorch's "Accelerating Generative AI III: Diffusion, Fast"): "light"
# computes 1x1 convolutions as matmuls; "full" adds coordinate-descent tuning of every generated kernel (minutes of
# compiling more) without epilogue fusion
TUNING_LEVELS = {
    "none": {},
    "light": {"conv_1x1_as_mm": True},
    "full": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
             "coordinate_descent_check_all_directions": True, "epilogue_fusion": False},
}
# float8 GEMMs on ATen's kernels (cuBLAS, CUTLASS) alone: Inductor otherwise lists its Triton float8 GEMM templates for
# every torch._scaled_mm shape even outside max-autotune (torch/_inductor/kernel/mm.py, tuned_scaled_mm:
# check_max_autotune=False), compiling and benchmarking each of their configurations at the first call
FLOAT8_GEMMS_ON_ATEN = {"max_autotune_gemm_backends": "ATEN"}
AUTOTUNE_MODES = ("max-autotune", "max-autotune-no-cudagraphs")  # where GEMM autotuning is what was asked for
FP8_CAPABILITY = (8, 9)  # CUDA compute capability with float8 tensor cores (Ada, Hopper and newer)
SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds n rows (n must not exceed the largest bucket)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} rows exceed the largest bucket {max(buckets)}")


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with its last row repeated up to `rows` rows."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x[-1:].expand(rows - x.shape[0], *x.shape[1:])])


class UNetProxy:
    """Base of the UNet wrappers: holds `unet` and answers the attributes the sampler reads from it."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def config(self) -> Any:
        return self.unet.config


class BucketedUNet(UNetProxy):
    """Wraps a UNet so that every call runs at a bucket batch size; counts the padding rows it added."""

    def __init__(self, unet: Any, buckets: Sequence[int], graphs: bool = False) -> None:
        if not buckets or any(int(b) < 1 for b in buckets):
            raise ValueError(f"buckets must be positive batch sizes, got {list(buckets)}")
        super().__init__(unet)
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        self.graphs = graphs  # CUDA-graph replays reuse their output memory: copy each output out before the next
        self.padded_rows = 0

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 return_dict: bool = False, **kwargs: Any) -> tuple[torch.Tensor]:
        """The bare UNet's `(prediction,)` for these rows, computed in bucket-sized pieces."""
        if return_dict:
            raise ValueError("BucketedUNet returns tuples only (call it with return_dict=False)")
        n, largest = sample.shape[0], self.buckets[-1]
        per_row_t = torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] == n
        outs = []
        for lo in range(0, n, largest):
            hi = min(n, lo + largest)
            size = bucket_for(hi - lo, self.buckets)
            self.padded_rows += size - (hi - lo)
            t = _pad_rows(timestep[lo:hi], size) if per_row_t else timestep
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            pred = self.unet(_pad_rows(sample[lo:hi], size), t,
                             encoder_hidden_states=_pad_rows(encoder_hidden_states[lo:hi], size),
                             return_dict=False, **kwargs)[0]
            outs.append(pred[: hi - lo].clone() if self.graphs else pred[: hi - lo])
        return (torch.cat(outs) if len(outs) > 1 else outs[0],)


class AttentionBackendUNet(UNetProxy):
    """Wraps a UNet so that its scaled-dot-product attention runs on one backend (torch.nn.attention.sdpa_kernel,
    entered around every call, compiled calls included: the choice is made when a shape is compiled)."""

    def __init__(self, unet: Any, backend: str) -> None:
        if backend not in ATTENTION_BACKENDS or backend == "auto":
            raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS[1:])}, got {backend!r}")
        super().__init__(unet)
        self.backend = backend
        device, dtype = unet.device, unet.dtype
        q = torch.zeros(1, 1, 16, 64, device=device, dtype=dtype)
        try:
            with self.kernel():
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
        except RuntimeError as exc:
            raise ValueError(f"attention backend {backend!r} cannot run on {device} in {dtype}: "
                             f"{str(exc).splitlines()[0]}") from exc

    def kernel(self) -> Any:
        """The sdpa_kernel context of this backend."""
        return sdpa_kernel(SDPA_KERNELS[self.backend])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.kernel():
            return self.unet(*args, **kwargs)


def with_attention(unet: Any, backend: str) -> Any:
    """The UNet with its attention pinned to `backend` (one of ATTENTION_BACKENDS; "auto" returns it unchanged)."""
    return unet if backend == "auto" else AttentionBackendUNet(unet, backend)


def inductor_tuning(level: str) -> dict[str, Any]:
    """Set the TorchInductor options of TUNING_LEVELS[level], process-wide. Returns the settings it changed, with
    their old values."""
    if level not in TUNING_LEVELS:
        raise ValueError(f"tuning must be one of {', '.join(TUNING_LEVELS)}, got {level!r}")
    return set_inductor(TUNING_LEVELS[level])


def set_inductor(options: dict[str, Any]) -> dict[str, Any]:
    """Set these TorchInductor options, process-wide; returns their old values."""
    import torch._inductor.config as inductor

    old = {name: getattr(inductor, name) for name in options}
    for name, value in options.items():
        setattr(inductor, name, value)
    return old


def use_compile_cache(folder: str | Path) -> Path:
    """Keep TorchInductor's caches (compiled FX graphs, AOTAutograd results, Triton kernels, autotuning choices) in
    `folder` (created if missing), so that a restarted process loads what an earlier one compiled instead of
    compiling again. Process-wide, through torch's own switch (TORCHINDUCTOR_CACHE_DIR): call it before the
    process's first compile. Empty compiled libraries in it are removed first (`prune_empty_libraries`). Returns the
    absolute folder."""
    path = Path(folder).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"compile cache {str(path)!r} is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    prune_empty_libraries(path)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def prune_empty_libraries(folder: Path) -> list[Path]:
    """Remove the empty shared libraries (`*.so` of 0 bytes) under a compile cache and return them. A process
    stopped while TorchInductor's C++ compile was writing one leaves it empty; Inductor would load it as it stands
    and fail ("file too short") where, missing, it compiles it again from the source beside it."""
    empty = [p for p in folder.rglob("*.so") if p.is_file() and p.stat().st_size == 0]
    for p in empty:
        p.unlink()
    return empty


@dataclass(frozen=True)
class CacheCounts:
    """TorchInductor's compiled-graph cache lookups in this process so far (torch._dynamo's counters)."""

    hits: int
    misses: int

    @staticmethod
    def now() -> CacheCounts:
        """The counts at this moment."""
        from torch._dynamo.utils import counters

        inductor = counters["inductor"]
        return CacheCounts(int(inductor["fxgraph_cache_hit"]), int(inductor["fxgraph_cache_miss"]))

    def since(self, earlier: CacheCounts) -> CacheCounts:
        """The lookups between `earlier` and these counts."""
        return CacheCounts(self.hits - earlier.hits, self.misses - earlier.misses)


def compile_unet(unet: Any, mode: str, tuning: str = "none", quantize: str = "none",
                 channels_last: bool = True, calibrate: Callable[[Any], None] | None = None) -> Any:
    """torch.compile the UNet with fixed shapes (`mode` one of COMPILE_MODES; "none" returns it unchanged), with
    the TorchInductor options of `inductor_tuning(tuning)` first.
    Compiling first fuses each attention's q/k/v projections into one matmul and stores the weights
    channels-last unless `channels_last` is False (both in place; the UNet's outputs stay the same up to rounding);
    channels-last also keeps the up blocks' skip concatenations channels-last in the compiled code
    (`channels_last_passes`, process-wide),
    then quantizes the linear layers as `quantize` says (`quantize_unet`, with `calibrate`), their float8 GEMMs left
    to ATen's kernels outside the max-autotune modes (FLOAT8_GEMMS_ON_ATEN, process-wide). A UNet with unmerged
    LoRA layers is refused: fusing would drop them (merge the adapter first)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "none":
        if quantize != "none":
            raise ValueError(f"quantize {quantize!r} needs a compile mode: eager, the scaling kernels cost more than "
                             "the float8 matmuls save")
        if tuning != "none" or not channels_last:
            raise ValueError("tuning and channels_last shape the compiled UNet: they need a compile mode")
        return unet
    inductor_tuning(tuning)
    set_inductor(compile_options(mode, quantize, channels_last))
    quantized = quantize_unet(fuse_layout(unet, channels_last), quantize, calibrate)
    return torch.compile(quantized, mode=mode, dynamic=False)


def compile_options(mode: str, quantize: str = "none", channels_last: bool = True) -> dict[str, Any]:
    """The TorchInductor options `compile_unet` sets after the tuning level's: float8 GEMMs on ATen's kernels
    (FLOAT8_GEMMS_ON_ATEN) where `float8_gemms_on_aten` says so, and `channels_last_passes(channels_last)`."""
    on_aten = FLOAT8_GEMMS_ON_ATEN if float8_gemms_on_aten(mode, quantize) else {}
    return {**on_aten, **channels_last_passes(channels_last)}


def channels_last_passes(channels_last: bool = True) -> dict[str, Any]:
    """The TorchInductor options of a compile with (or without) channels-last: with it, the up blocks' skip
    concatenations realized channels-last (`sage_core.layout_pass`), where TorchInductor 2.11 writes them NCHW and
    transposes them back; without it, no custom pass."""
    from sage_core.layout_pass import ChannelsLastConcat  # imports TorchInductor (most of a second)

    return {"post_grad_custom_post_pass": ChannelsLastConcat() if channels_last else None}


def float8_gemms_on_aten(mode: str, quantize: str) -> bool:
    """Whether `compile_unet` leaves this compile's float8 GEMMs to ATen's kernels (FLOAT8_GEMMS_ON_ATEN): float8
    outside the max-autotune modes."""
    return quantize != "none" and mode not in AUTOTUNE_MODES


def quantize_unet(unet: Any, mode: str, calibrate: Callable[[Any], None] | None = None) -> Any:
    """`mode` "fp8": store the UNet's linear layers' weights in float8 e4m3 and quantize their inputs on the fly
    (torchao's dynamic float8, in place; per-row scales for a bfloat16 UNet, one scale per tensor for float16,
    whose output cuBLAS's row-wise float8 GEMM lacks); convolutions stay as they are. Needs an NVIDIA GPU of
    compute capability 8.9 or newer and torchao (`pip install 'sage-edge[fp8]'`). "fp8-rowwise": float8 with
    per-row scales in any dtype, for the linear layers and the 1x1 convolutions alike, without torchao
    (`sage_core.fp8.to_float8_rowwise`, in place); needs float8 GEMMs with row-wise scales on the UNet's device.
    "fp8-static": the same layers with one scale per tensor, each input's calibrated while `calibrate(unet)` runs
    the UNet (`unet_calibration`; `sage_core.fp8.to_float8_static`, in place). "fp8-static-geglu": that, with each
    transformer feed-forward block's GEGLU fused into one kernel (`sage_core.fp8.Fp8GegluFeedForward`).
    "fp8-static-conv": that, and the 3x3 convolutions in float8 (`sage_core.fp8.Fp8StaticConv3x3`). "none" returns
    it unchanged."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "none":
        return unet
    if mode == "fp8-rowwise":
        to_float8_rowwise(unet)
        return unet
    if mode in STATIC_MODES:
        if calibrate is None:
            raise ValueError(f"{mode} needs a calibration run of the UNet (unet_calibration) for its input scales")
        to_float8_static(unet, calibrate, **STATIC_MODES[mode])
        return unet
    device = unet.device
    capable = device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY
    if not capable:
        raise ValueError(f"fp8 needs an NVIDIA GPU of compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} "
                         f"or newer (Ada, Hopper); the UNet is on {device_name(device)}")
    try:
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise ValueError(f"fp8 needs torchao (pip install 'sage-edge[fp8]'): {exc}") from exc
    quantize_(unet, torchao_float8_config(unet.dtype), filter_fn=fp8_linear)
    return unet


def torchao_float8_config(dtype: torch.dtype) -> Any:
    """torchao's dynamic float8 config for a UNet of `dtype`: per-row scales for bfloat16, one scale per tensor
    otherwise; it leaves TorchInductor's settings alone. torchao's default (set_inductor_config=True) turns on
    coordinate-descent tuning of every generated kernel, process-wide and for good: the H100's fp8 variant was
    still tuning kernels after 200 s (docs/results/serving, fifth lease)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

    granularity = PerRow() if dtype == torch.bfloat16 else PerTensor()
    return Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)


def unet_calibration(cond: torch.Tensor, latent_side: int, timesteps: Sequence[int] = CALIBRATION_TIMESTEPS,
                     seed: int = 0) -> Callable[[Any], None]:
    """Static float8's calibration: the UNet once per timestep on seeded random latents `latent_side` wide, a row
    per text embedding of `cond` [M, L, D] (e.g. CALIBRATION_PROMPTS encoded); latents across the schedule have
    about unit variance, as the noise does."""
    def run(unet: Any) -> None:
        g = torch.Generator().manual_seed(seed)
        for t in timesteps:
            x = torch.randn(cond.shape[0], unet.config.in_channels, latent_side, latent_side, generator=g)
            steps = torch.full((cond.shape[0],), t, dtype=torch.long, device=unet.device)
            unet(x.to(unet.device, unet.dtype), steps, encoder_hidden_states=cond.to(unet.device, unet.dtype),
                 return_dict=False)
    return run


def fp8_linear(module: torch.nn.Module, name: str = "") -> bool:
    """A linear layer float8 GEMMs can take: both sides a multiple of 16."""
    return isinstance(module, torch.nn.Linear) and fits_float8_gemm(module.weight)


def fuse_layout(unet: Any, channels_last: bool = True) -> Any:
    """Fuse each attention's q/k/v (self-attention) or k/v (cross-attention) projections and, unless
    `channels_last` is False, store the weights channels-last, in place; returns the UNet. Refuses a UNet with
    unmerged LoRA layers."""
    if getattr(unet, "peft_config", None):
        raise ValueError("compile_unet needs a UNet without unmerged LoRA layers (fuse_lora + unload_lora_weights)")
    unet.fuse_qkv_projections()
    return unet.to(memory_format=torch.channels_last) if channels_last else unet


@torch.inference_mode()
def warm_buckets(unet: BucketedUNet, latent_side: int, tokens: int = 77,
                 report: Callable[[str], None] | None = None) -> list[float]:
    """One call per bucket (compiles each shape before serving); returns the seconds each took. `report` gets a
    line before and after each bucket (compiling one can take minutes). Every bucket compiles, however many there
    are and however many UNets this process compiled before (`room_for_buckets`)."""
    with room_for_buckets(len(unet.buckets)):
        return [_warm_bucket(unet, b, i, latent_side, tokens, report) for i, b in enumerate(unet.buckets, 1)]


@contextmanager
def room_for_buckets(n: int) -> Iterator[None]:
    """Within: TorchDynamo compiles `n` more shapes of a function whatever its recompile limit. Dynamo compiles at
    most `recompile_limit` (8) variants of one function, counted over every instance of a class (each UNet of a
    process shares UNet2DConditionModel.forward), and runs any further shape eagerly, with a log line but no
    error: a 9th bucket, or a second compiled UNet's buckets, would silently run uncompiled (and without CUDA
    graphs). After the warm-up every bucket's shape finds its compiled variant; the limit applies only to
    compiling."""
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=limit + n + compiled_variants()):
        yield


def compiled_variants() -> int:
    """How many compiled variants TorchDynamo holds for UNet2DConditionModel.forward in this process (0 when its
    debug accessor is missing: the limit then grows by the new buckets only)."""
    from diffusers import UNet2DConditionModel

    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(UNet2DConditionModel.forward.__code__))
    except (ImportError, TypeError):  # a private accessor: another torch may lack it or take other arguments
        return 0


def sample_inputs(unet: Any, rows: int, latent_side: int | None = None,
                  tokens: int = 77) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (sample, timestep, encoder_hidden_states) of `rows` rows for `unet`, on its device and in its dtype:
    latents `latent_side` wide (default: the model's sample size), timestep 500, `tokens` text tokens."""
    cfg, side = unet.config, latent_side or unet.config.sample_size
    x = torch.randn(rows, cfg.in_channels, side, side, device=unet.device, dtype=unet.dtype)
    c = torch.randn(rows, tokens, cfg.cross_attention_dim, device=unet.device, dtype=unet.dtype)
    t = torch.full((rows,), 500, device=unet.device, dtype=torch.long)
    return x, t, c


def _warm_bucket(unet: BucketedUNet, b: int, i: int, latent_side: int, tokens: int,
                 report: Callable[[str], None] | None) -> float:
    """The warm-up call of bucket `b` (the i-th); its seconds."""
    if report:
        report(f"warming UNet bucket {b} ({i}/{len(unet.buckets)})")
    x, t, c = sample_inputs(unet, b, latent_side, tokens)
    start = time.perf_counter()
    unet(x, t, encoder_hidden_states=c)
    if unet.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if report:
        report(f"UNet bucket {b} ready in {seconds:.1f} s")
    return seconds
