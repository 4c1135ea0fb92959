"""TorchInductor's code for an H100, written on a machine without a GPU: what a compiled UNet would run, read before a
lease instead of during one.

`stand_in_h100()` makes this process look to TorchInductor like one with an H100: fake CUDA tensors (PyTorch's
FakeTensorMode: shapes, strides and dtypes, no memory), the H100's device properties and an sm90 target for Triton.
`compile_for_h100(module, args)` then exports the module and lowers it with Inductor, as `torch.compile` would on the
GPU, and keeps what Inductor wrote: the wrapper code (every kernel call, in order) and each Triton kernel's source.
Nothing is compiled to a GPU binary, run, tuned or timed, and Inductor's caches are off throughout.

What differs from the GPU: the attention is an opaque op laid out as cuDNN's is (Inductor's SDPA choice asks the
driver), matmul padding (decided by timing on the device) is off, and so is constant folding.
Inductor's own kernels, their fusion, layouts and byte counts are what the GPU gets.
"""

from __future__ import annotations

import contextlib
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

H100 = types.SimpleNamespace(  # torch.cuda.get_device_properties of an H100 SXM, the fields Inductor reads
    name="NVIDIA H100 80GB HBM3 (stand-in)", major=9, minor=0, multi_processor_count=132, total_memory=80 * 2**30,
    warp_size=32, max_threads_per_multi_processor=2048, max_threads_per_block=1024, regs_per_multiprocessor=65536,
    shared_memory_per_block=49152, shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472,
    L2_cache_size=50 * 2**20, gcnArchName="", is_integrated=False, uuid="stand-in", clock_rate=1980000,
    memory_clock_rate=2619000, memory_bus_width=5120)


@torch.library.custom_op("sage_edge_probe::attention", mutates_args=())
def opaque_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stands in for the GPU's fused attention kernel: one opaque op whose output is laid out like q."""
    return torch.empty_like(q)


@opaque_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, **kwargs: Any) -> torch.Tensor:
    """F.scaled_dot_product_attention as the UNet calls it (no mask, no dropout), as `opaque_attention`."""
    if attn_mask is not None or dropout_p or is_causal or kwargs:
        raise ValueError("the stand-in attention takes plain attention only (no mask, dropout or causal)")
    return opaque_attention(q, k, v)


class _Hopper:
    """Triton's active driver on a machine without a GPU: names an sm90 target; nothing runs."""

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, *args: Any) -> int:
        return 0

    def get_benchmarker(self) -> Any:
        raise AssertionError("nothing is timed on the stand-in H100")

    def get_device_interface(self) -> Any:
        return torch.cuda

    def is_active(self) -> bool:
        return True


class _NoDevice:
    """torch.cuda.device on the stand-in: a context that selects nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _NoDevice:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


@dataclass
class Codegen:
    """What Inductor wrote for one graph: the wrapper code and each Triton kernel's source by name."""

    wrapper: str = ""
    kernels: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def stand_in_h100() -> Iterator[Codegen]:
    """Within: this process looks like one with an H100 to TorchInductor, and each graph Inductor lowers leaves its
    code in the yielded Codegen (the last graph's wrapper; every Triton kernel). Everything is put back on exit."""
    import torch._inductor.async_compile as async_compile
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.config as inductor
    import torch._inductor.graph as graph
    import torch.cuda.random as cuda_random
    from torch._dynamo.device_interface import CudaInterface
    from torch._inductor.fx_passes import fuse_attention, pad_mm
    from torch._inductor.runtime.hints import DeviceProperties
    from torch.utils._triton import has_triton, triton_backend
    from triton.runtime import driver

    out = Codegen()
    codegen = graph.GraphLowering.codegen

    def keep_wrapper(self: Any) -> Any:
        result = codegen(self)
        out.wrapper = result[0].value
        return result

    def keep_kernel(self: Any, kernel_name: str, source_code: str, *args: Any, **kwargs: Any) -> Any:
        out.kernels[kernel_name] = source_code
        return types.SimpleNamespace(run=None)

    rng = torch.zeros(16, dtype=torch.uint8)
    patches: list[tuple[Any, str, Any]] = [
        (driver, "_active", _Hopper()),
        (torch.cuda, "get_device_properties", lambda *a, **k: H100),
        (torch.cuda, "get_device_capability", lambda *a, **k: (9, 0)),
        (torch.cuda, "is_available", lambda: True),
        (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "_lazy_init", lambda: None),
        (torch.cuda, "synchronize", lambda *a, **k: None),
        (torch.cuda, "device", _NoDevice),
        (torch.cuda, "get_rng_state", lambda *a, **k: rng),
        (torch.cuda, "set_rng_state", lambda *a, **k: None),
        (cuda_random, "get_rng_state", lambda *a, **k: rng),
        (cuda_random, "set_rng_state", lambda *a, **k: None),
        (CudaInterface, "get_device_properties", staticmethod(lambda *a, **k: H100)),
        (CudaInterface, "get_compute_capability", staticmethod(lambda *a, **k: 90)),
        (CudaInterface, "current_device", staticmethod(lambda: 0)),
        (CudaInterface, "device_count", staticmethod(lambda: 1)),
        (CudaInterface, "is_available", staticmethod(lambda: True)),
        (CudaInterface, "synchronize", staticmethod(lambda *a, **k: None)),
        (CudaInterface, "get_raw_stream", staticmethod(lambda *a, **k: 0)),
        (CudaInterface, "is_bf16_supported", staticmethod(lambda *a, **k: True)),
        (CudaInterface, "is_triton_capable", staticmethod(lambda *a, **k: True)),
        (CudaInterface, "raise_if_triton_unavailable", staticmethod(lambda *a, **k: None)),
        (compile_fx, "get_cuda_device_context", lambda *a, **k: contextlib.nullcontext()),
        (fuse_attention, "_sfdp_init", lambda *a, **k: None),  # attention patterns: the UNet calls SDPA itself
        (pad_mm, "_pad_mm_init", lambda *a, **k: None),  # matmul padding benchmarks on the device
        (async_compile.AsyncCompile, "triton", keep_kernel),
        (graph.GraphLowering, "codegen", keep_wrapper),
        (torch.nn.functional, "scaled_dot_product_attention", _attention),
        (inductor, "joint_graph_constant_folding", False),  # folds with real tensors
        (inductor, "freezing", False),
        (inductor, "shape_padding", False),  # padding a matmul is decided by timing it on the device
        (inductor, "benchmark_kernel", True),  # each kernel carries Inductor's byte estimate (kernel_num_gb)
        (inductor, "force_disable_caches", True),  # nothing the stand-in made may be found by a real compile
    ]
    patches = [(owner, name, value) for owner, name, value in patches if hasattr(owner, name)]  # across versions
    saved = [(owner, name, owner.__dict__[name] if name in vars(owner) else getattr(owner, name))
             for owner, name, _ in patches]
    caches = (DeviceProperties.create, has_triton, triton_backend)  # what they found out about "cuda" so far
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        for cache in caches:
            cache.cache_clear()
        yield out
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
        for cache in caches:
            cache.cache_clear()


def _fake_cuda(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fake CUDA tensor with t's shape and strides (call within the fake mode)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device="cuda")


def to_fake_cuda(module: torch.nn.Module, mode: Any, keep_float32: tuple[type, ...] = ()) -> torch.nn.Module:
    """Replace the module's parameters and buffers, in place, by fake CUDA tensors of `mode` (a FakeTensorMode)
    with the same shapes and strides. float32 ones become float16, as `.half()` makes them, except the buffers of
    modules of the `keep_float32` types (the float8 modules' scales and float32 biases)."""
    for m in module.modules():
        keep = isinstance(m, keep_float32)
        for name, p in list(m._parameters.items()):
            if p is not None:
                with mode:
                    dtype = torch.float16 if p.dtype == torch.float32 else p.dtype
                    m._parameters[name] = torch.nn.Parameter(_fake_cuda(p, dtype), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None:
                with mode:
                    dtype = torch.float16 if b.dtype == torch.float32 and not keep else b.dtype
                    m._buffers[name] = _fake_cuda(b, dtype)
    return module


def compile_for_h100(module: torch.nn.Module, mode: Any, *args: torch.Tensor) -> Codegen:
    """Export `module` (its tensors already fake CUDA ones of `mode`, a FakeTensorMode; see `to_fake_cuda`) on
    `args` (fake CUDA tensors) and lower it with TorchInductor for the stand-in H100; returns what Inductor wrote."""
    from torch._inductor.compile_fx import compile_fx

    # Inductor prints each compiled module's path when it counts bytes (benchmark_kernel): kept off stdout
    with stand_in_h100() as out, contextlib.redirect_stdout(sys.stderr):
        with mode:
            program = torch.export.export(module, tuple(args)).module()
            compile_fx(program, list(args))
    return out


def kernel_calls(wrapper: str) -> list[str]:
    """The names of the kernels the wrapper launches, in order, one entry per launch (Inductor's and user Triton
    kernels; ATen's extern kernels are not listed)."""
    return re.findall(r"^\s+(\w+)\.run\(", wrapper, re.M)


def extern_calls(wrapper: str) -> int:
    """How many ATen (extern) kernel calls the wrapper makes: cuBLAS, cuDNN, the stand-in attention."""
    return len(re.findall(r"extern_kernels\.\w+\(|torch\.ops\.sage_edge_probe\.attention", wrapper))


def estimated_bytes(source: str) -> float:
    """Inductor's own estimate of the bytes one launch of a kernel moves (each buffer read or written, once)."""
    found = re.search(r"'kernel_num_gb': ([0-9.e+-]+)", source)
    return float(found.group(1)) * 1e9 if found else 0.0


def transposing_kernels(kernels: dict[str, str]) -> dict[str, int]:
    """Inductor's one-dimensional pointwise kernels that load or store with a stride above 1 along the fastest
    index (x0, the channel of a channels-last tensor): a transpose without tiling, whose accesses do not coalesce.
    Maps each to its element count."""
    found = {}
    for name, source in kernels.items():
        body = source[source.find("@triton.jit"):]
        if not name.startswith("triton_poi") or "ynumel" in body:
            continue
        accesses = re.findall(r"tl\.(?:load|store)\(\w+ \+ \(([^,]*)\)", body)
        if any(re.search(r"\b\d+\*x0\b", index) and "x0 //" not in index for index in accesses):
            found[name] = int(re.search(r"xnumel = (\d+)", body).group(1))
    return found
