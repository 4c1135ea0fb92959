"""The batched step loop on a CUDA GPU: no host-device synchronisation from start to end, and the same latents as
diffusers' per-trajectory steps (run on the lent GPU by scripts/gpu_session.sh; skipped elsewhere). No conftest
fixtures here: the GPU image runs this file with --noconftest."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_step_loop import cuda_syncs
from sage_core.generate import encode_prompts, latent_shape
from sage_core.grouping import text_embeddings
from sage_core.models import tiny_pipeline
from sage_core.sampler import SamplingConfig, Trajectory, denoise, initial_noises, make_scheduler

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _trajectories(pipe, config, cond, n: int) -> list[Trajectory]:
    """n trajectories from distinct noises, half of them children that start where their parent stops."""
    shape = latent_shape(pipe, config)
    sched = make_scheduler(pipe.scheduler.config, "ddim", config.steps)
    noises = initial_noises(shape, list(range(n)), sched, pipe.unet.dtype, "cuda")
    trs = []
    for i in range(n):
        s = make_scheduler(pipe.scheduler.config, "ddim", config.steps, "cuda")
        if i % 2:
            trs.append(Trajectory(None, cond[i % len(cond)][None], s, 3, config.steps, parent=i - 1))
        else:
            trs.append(Trajectory(noises[i], cond[i % len(cond)][None], s, 0, 3))
    return trs


# One UNet call for all trajectories against one per trajectory: the GPU picks kernels by batch size, so the two
# loops agree to the kernels' rounding (fp16: a few units in the last place of the largest latent, ~10), not bit
# for bit as on the CPU (tests/test_batched_step.py).
# `per_row`: an unconditional embedding per trajectory (requests with different negative prompts in one loop).
@pytest.mark.parametrize(("dtype", "ulps"), [(torch.float32, 1000), (torch.float16, 4)])
@pytest.mark.parametrize("per_row", [False, True])
def test_batched_loop_makes_no_synchronisation_and_equals_stepwise(dtype, ulps, per_row, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions alone differ by ~1e-3
    pipe = tiny_pipeline(seed=0).to("cuda", dtype)
    config = SamplingConfig(steps=8, guidance=7.5, guidance_end=3.0)
    cond, uncond = encode_prompts(pipe, ["a red circle", "a blue square", "a green star"])
    if per_row:
        negatives = text_embeddings(pipe, ["", "blurry", "a dark room"])[0]
        uncond = negatives[[i % 3 for i in range(6)]]
    batched, stepwise = _trajectories(pipe, config, cond, 6), _trajectories(pipe, config, cond, 6)
    torch.cuda.synchronize()
    with torch.inference_mode():
        syncs = cuda_syncs(lambda: denoise(pipe.unet, batched, uncond, config, batched=True))
        stepwise_syncs = cuda_syncs(lambda: denoise(pipe.unet, stepwise, uncond, config, batched=False))
    assert syncs == 0
    assert stepwise_syncs > 0  # diffusers' DDIM step reads its timestep on the host
    for a, b in zip(batched, stepwise, strict=True):
        atol = ulps * torch.finfo(dtype).eps * b.latents.float().abs().max().item()
        torch.testing.assert_close(a.latents.float(), b.latents.float(), rtol=0, atol=atol)
