"""The batched DDIM step and the round plan: equal to diffusers' per-trajectory steps bit for bit (float32), no
device reads or per-round transfers inside the loop, a fixed number of operations per round, sub-groups joining
the loop in the round their parent ends."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from benchmarks.bench_step_loop import DeviceTraffic, Uncounted, host_to_device, main, ops_per_round
from sage_core.adaptive import GroupNode, run_shared_plan
from sage_core.batched_step import N_COEF, ddim_step, ddim_table, supports_batched
from sage_core.generate import encode_prompts, latent_shape
from sage_core.models import SD15_SCHEDULER_CONFIG, tiny_pipeline
from sage_core.sampler import (
    BranchPoint,
    SamplingConfig,
    Span,
    Trajectory,
    UNetCounter,
    denoise,
    initial_noise,
    make_scheduler,
    plan_rounds,
)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("extra", [{}, {"set_alpha_to_one": True, "clip_sample_range": 0.5}])
def test_ddim_step_equals_diffusers(prediction_type, clip_sample, extra):
    """Also with a final alpha of one (set_alpha_to_one) and a clip range other than 1."""
    scheduler = DDIMScheduler(**(SD15_SCHEDULER_CONFIG | {"prediction_type": prediction_type,
                                                          "clip_sample": clip_sample} | extra))
    scheduler.set_timesteps(10)
    timesteps, table = ddim_table(scheduler)
    indices = [0, 4, 9]  # index 9's previous timestep is below 0: the final alpha
    gen = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    coefs = torch.tensor([[1.0] * 3] + [[table[i][k] for i in indices] for k in range(4)]).view(N_COEF, 3, 1, 1, 1)
    ours = ddim_step(x, out, coefs, scheduler.config)
    for j, i in enumerate(indices):
        ref = scheduler.step(out[j : j + 1], torch.tensor(timesteps[i]), x[j : j + 1]).prev_sample
        assert torch.equal(ours[j : j + 1], ref), f"row {j} (schedule index {i}) differs from DDIMScheduler.step"


def test_only_ddim_steps_it_can_reproduce_are_batched():
    """Dynamic thresholding and trajectories with different step counts go to diffusers' own step."""
    from sage_core.batched_step import supports_batched_scheduler

    def ddim(steps: int, **extra) -> DDIMScheduler:
        scheduler = DDIMScheduler(**(SD15_SCHEDULER_CONFIG | extra))
        scheduler.set_timesteps(steps)
        return scheduler

    assert supports_batched_scheduler(ddim(6))
    assert not supports_batched_scheduler(ddim(6, thresholding=True))
    cond = torch.zeros(1, 77, 32)

    def trajectory(scheduler) -> Trajectory:
        return Trajectory(torch.zeros(1, 4, 8, 8), cond, scheduler, 0, len(scheduler.timesteps))

    assert supports_batched([trajectory(ddim(6)), trajectory(ddim(6))])
    assert not supports_batched([trajectory(ddim(6)), trajectory(ddim(8))])
    assert not supports_batched([trajectory(ddim(6)), trajectory(make_scheduler(SD15_SCHEDULER_CONFIG, "euler", 6))])


def family(pipe, config: SamplingConfig, cond: torch.Tensor) -> list[Trajectory]:
    """Two roots at different starts, a child, a zero-length grandchild and a great-grandchild."""
    def sched():
        return make_scheduler(pipe.scheduler.config, "ddim", config.steps)

    noise = initial_noise(latent_shape(pipe, config), 3, sched(), torch.float32)
    return [
        Trajectory(noise.clone(), cond[0:1], sched(), 0, 3),
        Trajectory(None, cond[1:2], sched(), 3, 6, parent=0),
        Trajectory(noise * 0.5, cond[2:3], sched(), 2, 8),
        Trajectory(None, cond[2:3], sched(), 6, 6, parent=1),
        Trajectory(None, cond[0:1], sched(), 6, 8, parent=3),
    ]


@pytest.mark.parametrize("guidance,guidance_end", [(7.5, 3.0), (1.0, None)])
def test_batched_loop_equals_stepwise_loop(tiny_pipe, guidance, guidance_end):
    config = SamplingConfig(steps=8, guidance=guidance, guidance_end=guidance_end)
    cond, uncond = encode_prompts(tiny_pipe, ["a red circle", "a blue square", "a green star"])
    batched, stepwise = family(tiny_pipe, config, cond), family(tiny_pipe, config, cond)
    counts = UNetCounter(), UNetCounter()
    assert supports_batched(batched)
    denoise(tiny_pipe.unet, batched, uncond, config, counts[0], batched=True)
    denoise(tiny_pipe.unet, stepwise, uncond, config, counts[1], batched=False)
    for i, (a, b) in enumerate(zip(batched, stepwise, strict=True)):
        assert torch.equal(a.latents, b.latents), f"trajectory {i} differs between the two steppers"
        assert a.index == b.index == a.stop
    assert counts[0].by_label == counts[1].by_label
    assert counts[0].total == (2 if guidance > 1 else 1) * sum(tr.stop - tr.start for tr in batched)


def test_rounds_start_children_as_soon_as_their_parent_ends():
    spans = [Span(0, 3), Span(3, 6, 0), Span(2, 8), Span(6, 6, 1), Span(6, 8, 3)]
    rounds = plan_rounds(spans)
    assert [r.rows for r in rounds] == [(0, 2)] * 3 + [(1, 2)] * 3 + [(4,)] * 2
    assert [r.indices for r in rounds[:4]] == [(0, 2), (1, 3), (2, 4), (3, 5)]
    assert rounds[3].forks == ((1, 0),)
    assert rounds[6].forks == ((3, 1), (4, 1))  # the zero-length child forwards its parent's state
    assert [r.indices for r in rounds[6:]] == [(6,), (7,)]


def test_rounds_refuse_bad_parents():
    with pytest.raises(ValueError, match="must come before"):
        plan_rounds([Span(3, 6, 1), Span(0, 3)])
    with pytest.raises(ValueError, match="stops at 3"):
        plan_rounds([Span(0, 3), Span(4, 6, 0)])


def test_a_hierarchy_takes_as_many_unet_calls_as_its_longest_chain(tiny_pipe):
    """A root sharing 4 steps with a sub-group to 8, beside a root sharing 8: 8 calls, not 8 + 4 level by level."""
    calls = []

    def unet(x, t, encoder_hidden_states=None, return_dict=False):
        calls.append(x.shape[0] // 2)
        return tiny_pipe.unet(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)

    unet.dtype = tiny_pipe.unet.dtype
    root = GroupNode([0, 1, 2], 4, 0.5)
    root.children = [GroupNode([0, 1], 8, 0.9, parent=root)]
    other = GroupNode([3, 4], 8, 0.95)
    config = SamplingConfig(steps=10, guidance=7.5)
    cond, uncond = encode_prompts(tiny_pipe, ["a", "b", "c", "d", "e"])
    noise = initial_noise(latent_shape(tiny_pipe, config), 0, make_scheduler(tiny_pipe.scheduler.config, "ddim", 10),
                          torch.float32)
    points = run_shared_plan(unet, tiny_pipe.scheduler.config, [root, other], [BranchPoint(noise, 0)] * 2, cond,
                             uncond, config)
    assert calls == [2] * 8
    assert points[id(root)].step == 4 and points[id(root.children[0])].step == 8


@pytest.fixture(scope="module")
def meta_unet():
    """The tiny UNet with its weights on PyTorch's meta device (shapes only, no data)."""
    return tiny_pipeline(seed=0).unet.to("meta")


@pytest.mark.parametrize("n,steps", [(2, 4), (6, 9)])
def test_loop_reads_nothing_from_the_device(meta_unet, n, steps):
    """On the meta device a host read of a device value fails, as it would stall a GPU. The batched loop with the
    real (tiny) UNet runs there, and sends its per-step numbers in two transfers whatever the rounds."""
    config = SamplingConfig(steps=steps, guidance=7.5, guidance_end=2.0)
    trs = [Trajectory(torch.zeros(1, 4, 16, 16, device="meta"), torch.zeros(1, 77, 32, device="meta"),
                      make_scheduler(SD15_SCHEDULER_CONFIG, "ddim", steps), 0, steps) for _ in range(n)]
    traffic = DeviceTraffic("meta")
    with traffic:
        denoise(Uncounted(meta_unet, traffic), trs, torch.zeros(1, 77, 32, device="meta"), config)
    assert traffic.to_device == 2
    assert all(tr.latents.device.type == "meta" and tr.latents.shape == (1, 4, 16, 16) for tr in trs)


def test_stepwise_loop_reads_the_device():
    """The check above can fail: diffusers' own DDIM step reads its timestep on the host."""
    assert "reads device values" in str(host_to_device(2, 3, 8, batched=False))


def test_operations_per_round_do_not_grow_with_trajectories():
    assert ops_per_round(2, 3, 8, batched=True) == ops_per_round(12, 3, 8, batched=True)
    assert ops_per_round(12, 3, 8, batched=False) > 5 * ops_per_round(2, 3, 8, batched=True)


def test_step_loop_benchmark_runs(capsys):
    result = main(["--trajectories", "2,4", "--steps", "3", "--side", "8", "--repeats", "1"])
    assert [r["trajectories"] for r in result["rows"]] == [2, 4]
    assert all(r["batched_transfers"] == 2 for r in result["rows"])
    assert "ms per round" in capsys.readouterr().out
