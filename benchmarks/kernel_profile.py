"""Where a UNet forward's time goes, by kernel: a few calls under torch.profiler, each kernel's device time (on a
CPU: each op's own CPU time) added up by name and by kind (convolution, GEMM, float8 GEMM, attention, normalization,
Inductor's fused kernels, copies). It says what a faster variant has to shrink: float8 can only shorten the GEMMs,
a better attention kernel only the attention.

    python -m benchmarks.bench_serving --model sd15-random --batches "" --unet-sweep 128 \\
        --unet-compile reduce-overhead --unet-buckets 64 --kernel-profile $OUT/kernels.txt

Kernels replayed from a CUDA graph are recorded too (CUPTI reports each graph node's kernel); the report gives the
kernels' share of the wall time, so kernels the profiler did not see would show as a gap. With the architecture's
FLOPs (counted once on PyTorch's meta device: no memory, no compute) it also gives the rate each kind of work
achieves, against the GPU's dense peak.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

# (kind, pattern on the lower-cased name), first match wins. Inductor's own kernels come first: their names list the
# ops they fuse ("triton_poi_fused_convolution_silu_0" is a bias-and-activation epilogue, not a convolution).
KINDS: tuple[tuple[str, str], ...] = (
    ("GEMM", r"^triton_tem"),  # Inductor's Triton GEMM templates (max-autotune)
    ("normalization", r"^(triton_|cpp_fused).*norm"),
    ("fused elementwise", r"^(triton_|cpp_fused|## call compiledfxgraph)"),  # on a CPU: Inductor's C++ kernels
    # cuBLASLt names its GEMMs nvjet_[sm90_]<A><B><out>, q for e4m3 inputs (the fifth lease counted
    # nvjet_sm90_qq... float8 GEMMs as GEMMs when the pattern was nvjet_qq)
    ("convolution", r"conv3x3_fp8"),  # sage_core.fp8_kernels' float8 implicit-GEMM convolution
    ("float8 GEMM", r"nvjet_(sm\d+_)?q|e4m3|e5m2|f8f8|fp8|scaled_mm"),
    ("attention", r"fmha|flash|attention|attn|sdpa|softmax"),
    ("layout conversion", r"nchwtonhwc|nhwctonchw"),
    ("convolution", r"conv(?!ert)|fprop|implicit_gemm|winograd"),
    ("GEMM", r"gemm|nvjet|cutlass|cublas|s16816|h16816|wgmma|^aten::(mm|addmm|bmm|baddbmm|linear|matmul)$"),
    ("normalization", r"norm"),
    ("copy / fill", r"memcpy|memset|copy|fill|^aten::(cat|clone|contiguous|to|_to_copy)$|catarraybatched"),
)


def kind_of(name: str) -> str:
    """The kind of kernel (or CPU op) a name says it is; 'other' when no pattern matches."""
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


RATE_GROUPS: dict[str, tuple[str, ...]] = {  # kinds whose FLOPs the architecture count can tell apart
    "convolutions + GEMMs": ("convolution", "GEMM", "float8 GEMM"),  # 1x1 convolutions may run as GEMMs
    "attention": ("attention",),
}


@dataclass(frozen=True)
class KernelProfile:
    """Profiled calls of one UNet at `rows` rows: wall and kernel time per call, and where the kernel time went
    (ms per sample by kind; the `top` kernels by name: ms per sample, launches per call, kind)."""

    device: str
    rows: int
    calls: int
    wall_ms_per_call: float
    kernel_ms_per_call: float
    kinds: dict[str, float]
    top: list[tuple[str, float, float, str]]
    gflops: dict[str, float] = field(default_factory=dict)  # the architecture's GFLOP per sample by kind

    def rates(self) -> list[tuple[str, float, float, float]]:
        """(group of kinds, GFLOP per sample, ms per sample, TFLOP/s achieved) for each RATE_GROUPS group and for
        all kernels; none without the FLOP count."""
        if not self.gflops:
            return []
        groups = [(name, sum(self.gflops.get(k, 0.0) for k in kinds), sum(self.kinds.get(k, 0.0) for k in kinds))
                  for name, kinds in RATE_GROUPS.items()]
        groups.append(("all kernels", sum(self.gflops.values()), sum(self.kinds.values())))
        return [(name, gf, ms, gf / ms if ms > 0 else 0.0) for name, gf, ms in groups]

    def as_dict(self) -> dict:
        """For the benchmark's JSON."""
        return {"device": self.device, "rows": self.rows, "calls": self.calls,
                "wall_ms_per_call": self.wall_ms_per_call, "kernel_ms_per_call": self.kernel_ms_per_call,
                "kinds_ms_per_sample": self.kinds, "gflop_per_sample": self.gflops,
                "tflops": {name: round(rate, 3) for name, _, _, rate in self.rates()},
                "top": [{"name": n, "ms_per_sample": ms, "launches_per_call": k, "kind": kind}
                        for n, ms, k, kind in self.top]}


def own_times(prof: torch.profiler.profile, cuda: bool) -> dict[str, tuple[float, int]]:
    """Microseconds and count by name: the GPU's kernels, copies and fills (CUDA) or each op's own CPU time."""
    from torch.autograd import DeviceType

    wanted = DeviceType.CUDA if cuda else DeviceType.CPU
    out: dict[str, tuple[float, int]] = {}
    for event in prof.key_averages():
        if event.device_type != wanted:
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            total, count = out.get(event.key, (0.0, 0))
            out[event.key] = (total + us, count + event.count)
    return out


def summarize(times: dict[str, tuple[float, int]], rows: int, calls: int, wall_s: float, device: str,
              top: int = 25) -> KernelProfile:
    """A KernelProfile from the profiler's totals over `calls` calls of `rows` rows each."""
    per_sample = 1e-3 / (calls * rows)  # microseconds in all -> ms per sample
    kinds: dict[str, float] = {}
    for name, (us, _) in times.items():
        kind = kind_of(name)
        kinds[kind] = kinds.get(kind, 0.0) + us * per_sample
    ranked = sorted(times.items(), key=lambda item: -item[1][0])[:top]
    return KernelProfile(
        device=device, rows=rows, calls=calls,
        wall_ms_per_call=round(wall_s * 1000.0 / calls, 3),
        kernel_ms_per_call=round(sum(us for us, _ in times.values()) / 1000.0 / calls, 3),
        kinds={k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda item: -item[1])},
        top=[(name, round(us * per_sample, 4), round(n / calls, 2), kind_of(name)) for name, (us, n) in ranked])


def profile_calls(fn: Callable[[], object], device: torch.device, calls: int) -> tuple[torch.profiler.profile, float]:
    """`calls` calls of `fn` (after one unprofiled warm-up call) on `device` under torch.profiler; the profiler
    and the wall seconds the calls took."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_serving import sync

    fn()
    sync(str(device))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(str(device))
        wall = time.perf_counter() - start
    return prof, wall


def flop_kind(op: str) -> str:
    """The kind of work an op counted by torch's FlopCounterMode is: on the meta device SDPA runs as bmm."""
    return "attention" if re.search(r"bmm|attention", op) else kind_of(f"aten::{op.split('.')[-1]}")


def architecture_gflops(config: dict) -> dict[str, float]:
    """GFLOP per sample by kind of one forward of a UNet2DConditionModel built from `config` on the meta device
    (batch 1, the config's sample size, 77 tokens): the architecture's work, whatever a variant fuses or
    quantizes."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        side = unet.config.sample_size
        inputs = (torch.zeros(1, unet.config.in_channels, side, side), torch.full((1,), 500, dtype=torch.long),
                  torch.zeros(1, 77, unet.config.cross_attention_dim))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2])
    out: dict[str, float] = {}
    for op, flops in counter.get_flop_counts()["Global"].items():
        kind = flop_kind(str(op))
        out[kind] = out.get(kind, 0.0) + flops / 1e9
    return {k: round(v, 6) for k, v in out.items()}


def profile_unet(unet, inputs: tuple, calls: int = 3) -> KernelProfile:
    """Profile `calls` forwards of `unet` on `inputs` (sample, timestep, encoder_hidden_states), with the
    architecture's FLOPs by kind."""
    sample, timestep, context = inputs
    from sage_core.fp8 import device_name

    with torch.inference_mode():
        prof, wall = profile_calls(lambda: unet(sample, timestep, encoder_hidden_states=context), sample.device,
                                   calls)
    cuda = sample.device.type == "cuda"
    profile = summarize(own_times(prof, cuda), sample.shape[0], calls, wall, device_name(sample.device))
    return replace(profile, gflops=architecture_gflops(dict(unet.config)))


def render(p: KernelProfile) -> str:
    """The profile as a text table: time by kind, then the top kernels."""
    what = "kernels (GPU time)" if p.device != "cpu" else "ops (own CPU time)"
    lines = [f"UNet forward at {p.rows} rows on {p.device}, {p.calls} calls under torch.profiler",
             f"wall {p.wall_ms_per_call:.3f} ms per call ({p.wall_ms_per_call / p.rows:.4f} ms per sample, profiler "
             f"on); {what} {p.kernel_ms_per_call:.3f} ms per call "
             f"({p.kernel_ms_per_call / max(p.wall_ms_per_call, 1e-9):.1%} of the wall)",
             "", f"{'kind':<20} {'ms/sample':>9} {'share':>6}"]
    total = sum(p.kinds.values()) or 1.0
    lines += [f"{kind:<20} {ms:>9.4f} {ms / total:>6.1%}" for kind, ms in p.kinds.items()]
    lines += ["", f"{'ms/sample':>9} {'share':>6} {'per call':>8}  {'kind':<18} name"]
    lines += [f"{ms:>9.4f} {ms / total:>6.1%} {n:>8.2f}  {kind:<18} {name[:160]}" for name, ms, n, kind in p.top]
    if p.rates():
        lines += ["", "rate achieved on the architecture's FLOPs (counted on the meta device)",
                  f"{'work':<22} {'GFLOP/sample':>12} {'ms/sample':>9} {'TFLOP/s':>8}"]
        lines += [f"{name:<22} {gf:>12.3f} {ms:>9.4f} {rate:>8.2f}" for name, gf, ms, rate in p.rates()]
    return "\n".join(lines) + "\n"


def one_line(kinds: dict[str, float]) -> str:
    """'convolution 0.812, attention 0.501, ...' (ms per sample by kind, largest first)."""
    return ", ".join(f"{kind} {ms:.3f}" for kind, ms in kinds.items())


KIND_COLOURS = {"convolution": "#4c72b0", "GEMM": "#dd8452", "float8 GEMM": "#c44e52", "attention": "#55a868",
                "normalization": "#8172b3", "fused elementwise": "#937860", "layout conversion": "#da8bc3",
                "copy / fill": "#8c8c8c", "other": "#cccccc"}


def plot_kinds(variants: dict[str, tuple[float, dict[str, float]]], path: str, goal_ms: float | None = None,
               rows: int | None = None) -> str:
    """Horizontal stacked bars, one per variant: its kernel time by kind (ms per sample), with its timed ms per
    sample as a black tick and the goal, if any, as a dashed line. `variants`: name -> (timed ms, kinds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(variants)
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.8))
    labelled: set[str] = set()
    for y, name in enumerate(names):
        timed, kinds = variants[name]
        left = 0.0
        for kind in KIND_COLOURS:
            width = kinds.get(kind, 0.0)
            if width <= 0:
                continue
            ax.barh(y, width, left=left, color=KIND_COLOURS[kind], label=None if kind in labelled else kind)
            labelled.add(kind)
            left += width
        ax.plot([timed, timed], [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.annotate(f"{timed:.3f}", (max(timed, left), y), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    if goal_ms:
        ax.axvline(goal_ms, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("ms per UNet sample: kernel time by kind (bars), timed without the profiler (black tick)")
    goal = f" (dashed: the goal, {goal_ms:g} ms)" if goal_ms else ""
    ax.set_title(f"Where each variant's UNet time goes{f' at {rows} rows' if rows else ''}{goal}")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=5, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
