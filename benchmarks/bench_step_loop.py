"""What the sampler's step loop costs around the UNet: each trajectory stepped by its own diffusers scheduler
against the batched DDIM step (sage_core.batched_step), side by side in one run on the same trajectories.

    python -m benchmarks.bench_step_loop --trajectories 8,32,64 --steps 20             # CPU
    python -m benchmarks.bench_step_loop --trajectories 8,32,64 --steps 20 --device cuda

The UNet is replaced by one that returns its input (no work), so what is timed is the loop itself: building each
round's inputs, classifier-free guidance, the scheduler steps. For each number of trajectories it prints the
milliseconds per round of both steppers (best of --repeats loops), the tensor operations each round adds
(counted on the CPU, views left out), on CUDA the host-device synchronisations per loop (torch.cuda's sync debug
mode), and the host-to-device transfers per loop, counted by running the loop on PyTorch's meta device, where a
tensor has no data: a loop that reads a device value on the host fails there, as it would wait for a GPU.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.bench_serving import sync
from benchmarks.results import output_file, positive_int, positive_int_list, write_json
from sage_core.models import SD15_SCHEDULER_CONFIG
from sage_core.sampler import MAX_STEPS, SamplingConfig, Trajectory, denoise, make_scheduler
from sage_core.unet_buckets import UNetProxy


class DeviceTraffic(TorchDispatchMode):
    """Counts, outside the UNet, the operations that touch `device` tensors (views left out) and the host-to-
    device transfers (an operation with a CPU tensor among its inputs and a `device` tensor among its outputs)."""

    def __init__(self, device: str = "meta") -> None:
        super().__init__()
        self.device = device
        self.ops = 0
        self.to_device = 0
        self.in_unet = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.in_unet:
            return out
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        on_device = [t for t in inputs + outputs if t.device.type == self.device]
        self.ops += bool(on_device) and not func.is_view
        self.to_device += any(t.device.type == "cpu" for t in inputs) and any(
            t.device.type == self.device for t in outputs
        )
        return out


class EchoUNet:
    """A UNet stand-in that costs nothing: its prediction is its input."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, sample, timestep, encoder_hidden_states=None, return_dict=False):
        return (sample,)


class Uncounted(UNetProxy):
    """Wraps a UNet so that a DeviceTraffic leaves the operations inside its calls out."""

    def __init__(self, unet, traffic: DeviceTraffic) -> None:
        super().__init__(unet)
        self.traffic = traffic

    def __call__(self, *args, **kwargs):
        self.traffic.in_unet = True
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.traffic.in_unet = False


def trajectories(n: int, steps: int, side: int, device: str, dtype: torch.dtype) -> list[Trajectory]:
    """n trajectories over the whole schedule of an SD v1.5 DDIM scheduler (schedulers made on the host)."""
    gen = torch.Generator().manual_seed(0)
    return [
        Trajectory(
            latents=torch.randn(1, 4, side, side, generator=gen).to(device, dtype),
            cond=torch.randn(1, 77, 768, generator=gen).to(device, dtype),
            scheduler=make_scheduler(SD15_SCHEDULER_CONFIG, "ddim", steps, device),
            start=0,
            stop=steps,
        )
        for _ in range(n)
    ]


def loop_ms(n: int, steps: int, side: int, device: str, dtype: torch.dtype, batched: bool, repeats: int) -> float:
    """Best milliseconds per round of `repeats` loops over n trajectories (fresh trajectories each time)."""
    config = SamplingConfig(steps=steps, guidance=7.5)
    uncond = torch.zeros(1, 77, 768, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        trs = trajectories(n, steps, side, device, dtype)
        sync(device)
        start = time.perf_counter()
        denoise(EchoUNet(dtype), trs, uncond, config, batched=batched)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best * 1000.0 / steps


def traffic(n: int, steps: int, side: int, device: str, batched: bool) -> DeviceTraffic | str:
    """The loop's operations and host-to-device transfers with its tensors on `device`, or, where it cannot run
    there (on "meta": it reads a device value on the host), why."""
    config = SamplingConfig(steps=steps, guidance=7.5)
    trs = trajectories(n, steps, side, device, torch.float32)
    uncond = torch.zeros(1, 77, 768, device=device)
    mode = DeviceTraffic(device)
    try:
        with mode:
            denoise(EchoUNet(torch.float32), trs, uncond, config, batched=batched)
    except (RuntimeError, NotImplementedError) as exc:
        return f"reads device values on the host ({type(exc).__name__})"
    return mode


def ops_per_round(n: int, steps: int, side: int, batched: bool) -> float:
    """Tensor operations (views left out) each extra round adds, counted on the CPU from loops of `steps` and
    2 x `steps` rounds (the loop's setup cancels out)."""
    short, long = traffic(n, steps, side, "cpu", batched), traffic(n, 2 * steps, side, "cpu", batched)
    return (long.ops - short.ops) / steps


def host_to_device(n: int, steps: int, side: int, batched: bool) -> int | str:
    """Host-to-device transfers of one loop on the meta device, or why it cannot run there."""
    t = traffic(n, steps, side, "meta", batched)
    return t if isinstance(t, str) else t.to_device


def cuda_syncs(fn: Callable[[], object]) -> int:
    """Host-device synchronisations `fn` makes on CUDA (torch.cuda's sync debug mode, warnings counted)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # match torch's own message: its one-time "prototype feature" warning mentions synchronizing operations too
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


@dataclass(frozen=True)
class Row:
    """One trajectory count's figures, both steppers."""

    trajectories: int
    stepwise_ms_per_round: float
    batched_ms_per_round: float
    stepwise_ops_per_round: float
    batched_ops_per_round: float
    stepwise_transfers: int | str
    batched_transfers: int | str
    stepwise_syncs: int | None
    batched_syncs: int | None


def measure(n: int, args: argparse.Namespace) -> Row:
    """Both steppers on n trajectories."""
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    ms = {b: loop_ms(n, args.steps, args.side, args.device, dtype, b, args.repeats) for b in (False, True)}
    ops = {b: ops_per_round(n, args.steps, args.side, b) for b in (False, True)}
    moved = {b: host_to_device(n, args.steps, args.side, b) for b in (False, True)}
    syncs: dict[bool, int | None] = {False: None, True: None}
    if args.device.startswith("cuda"):
        config = SamplingConfig(steps=args.steps, guidance=7.5)
        uncond = torch.zeros(1, 77, 768, device=args.device, dtype=dtype)
        for b in (False, True):
            trs = trajectories(n, args.steps, args.side, args.device, dtype)
            syncs[b] = cuda_syncs(lambda b=b, trs=trs: denoise(EchoUNet(dtype), trs, uncond, config, batched=b))
    return Row(n, ms[False], ms[True], ops[False], ops[True], moved[False], moved[True], syncs[False], syncs[True])


def print_row(r: Row) -> None:
    """One line per trajectory count."""
    def fmt(v) -> str:
        return "-" if v is None else str(v)

    print(f"{r.trajectories:12d}  {r.stepwise_ms_per_round:8.3f}  {r.batched_ms_per_round:8.3f}  "
          f"{r.stepwise_ms_per_round / r.batched_ms_per_round:7.1f}x  {r.stepwise_ops_per_round:8.0f}  "
          f"{r.batched_ops_per_round:7.0f}  {fmt(r.stepwise_syncs):>8}  {fmt(r.batched_syncs):>7}  "
          f"{fmt(r.batched_transfers):>11}  {fmt(r.stepwise_transfers)}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; settings the loop cannot run are refused here, before any work."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trajectories", type=positive_int_list, default=[8, 32, 64],
                        help="comma-separated trajectory counts (default 8,32,64)")
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--side", type=positive_int, default=64, help="latent side (64: SD v1.5 at 512x512)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N where torch sees a GPU")
    parser.add_argument("--repeats", type=positive_int, default=3, help="loops timed per stepper (best reported)")
    parser.add_argument("--json", type=output_file, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.steps > MAX_STEPS:
        parser.error(f"--steps must be <= {MAX_STEPS}, got {args.steps}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns what it printed as a dict."""
    args = parse_args(argv)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"step loop around a zero-cost UNet: {args.steps} DDIM steps, CFG, latents 4x{args.side}x{args.side}, "
          f"{name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("              ms per round        speed-up  ops per round     syncs per loop    "
          "host-to-device transfers per loop (meta device)")
    print("trajectories  stepwise  batched             stepwise  batched  stepwise  batched  batched      stepwise")
    result: dict = {"settings": vars(args), "device": name, "torch": torch.__version__, "rows": []}
    for n in args.trajectories:
        row = measure(n, args)
        print_row(row)
        result["rows"].append(asdict(row))
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
