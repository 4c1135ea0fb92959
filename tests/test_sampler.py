"""The split sampler: equivalence with diffusers' stock pipeline, split/resume exactness, UNet counting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sage_core.generate import encode_prompts, generate, latent_shape, saving_closed_form
from sage_core.grouping import GroupingConfig
from sage_core.sampler import (
    SamplingConfig,
    Trajectory,
    UNetCounter,
    denoise,
    export_solver_state,
    import_solver_state,
    initial_noise,
    make_scheduler,
)

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green star in the middle"]
# Tolerance: the same float32 kernels on the same inputs; batching [uncond; cond] of several trajectories in
# one UNet call may change the reduction order inside matmuls, so differences stay at float32 round-off.
ATOL = 1e-5


@pytest.mark.parametrize(("scheduler", "groups"), [("ddim", None), ("dpmpp", None), ("euler", None),
                                                   ("ddim", [[0, 1, 2]]), ("dpmpp", [[0, 2], [1]])])
def test_share_zero_equals_stock_pipeline(tiny_pipe, scheduler, groups):
    """Sharing no step is independent sampling, whether the prompts group (`groups`) or not (tau 0.99): a group
    that shares no step shares no noise either, so every prompt keeps its own seed."""
    from diffusers import StableDiffusionPipeline

    config = SamplingConfig(steps=6, guidance=7.5, share=0.0, scheduler=scheduler)
    ours = generate(tiny_pipe, PROMPTS, config, GroupingConfig(tau=0.99), seed=11, groups=groups)
    assert sorted(zip(ours.groups, ours.seeds, strict=True)) == [([0], 11), ([1], 12), ([2], 13)]
    stock = StableDiffusionPipeline(**tiny_pipe.components)
    stock.scheduler = make_scheduler(tiny_pipe.scheduler.config, scheduler, 6)
    for i, prompt in enumerate(PROMPTS):
        ref = stock(
            prompt,
            num_inference_steps=6,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(11 + i),
            output_type="np",
        ).images[0]
        assert np.abs(ours.images[i] - ref).max() < ATOL, f"prompt {i} differs from the stock pipeline"


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp", "euler"])
def test_singletons_with_sharing_equal_stock(tiny_pipe, scheduler):
    """All-singleton groups: the shared phase runs on each prompt's own embedding, so sharing changes nothing (a
    multistep solver's state at the branch point goes on into the branch phase)."""
    from diffusers import StableDiffusionPipeline

    config = SamplingConfig(steps=5, guidance=4.0, share=0.6, scheduler=scheduler)
    ours = generate(tiny_pipe, PROMPTS[:2], config, GroupingConfig(), seed=3, groups=[[0], [1]])
    stock = StableDiffusionPipeline(**tiny_pipe.components)
    stock.scheduler = make_scheduler(tiny_pipe.scheduler.config, scheduler, 5)
    ref = stock(PROMPTS[1], num_inference_steps=5, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    assert np.abs(ours.images[1] - ref).max() < ATOL


@pytest.mark.parametrize(("share", "groups"), [(0.0, None), (0.5, [[0], [1]])])
def test_negative_prompt_equals_stock_pipeline(tiny_pipe, share, groups):
    """A negative prompt is guidance's unconditional half, as diffusers' `negative_prompt`: independent sampling
    and all-singleton groups make the stock pipeline's image for it, and it changes the image."""
    from diffusers import StableDiffusionPipeline

    negative = "a purple triangle, blurry"
    config = SamplingConfig(steps=5, guidance=6.0, share=share, negative_prompt=negative)
    ours = generate(tiny_pipe, PROMPTS[:2], config, GroupingConfig(tau=0.99), seed=5, groups=groups)
    plain_config = SamplingConfig(steps=5, guidance=6.0, share=share)
    plain = generate(tiny_pipe, PROMPTS[:2], plain_config, GroupingConfig(tau=0.99), seed=5, groups=groups)
    stock = StableDiffusionPipeline(**tiny_pipe.components)
    stock.scheduler = make_scheduler(tiny_pipe.scheduler.config, "ddim", 5)
    for i, prompt in enumerate(PROMPTS[:2]):
        ref = stock(prompt, negative_prompt=negative, num_inference_steps=5, guidance_scale=6.0,
                    generator=torch.Generator().manual_seed(5 + i), output_type="np").images[0]
        assert np.abs(ours.images[i] - ref).max() < ATOL, f"prompt {i} differs from the stock pipeline"
        assert np.abs(plain.images[i] - ref).max() > 100 * ATOL, "the negative prompt changed nothing"


def test_negative_prompt_has_no_effect_without_guidance(tiny_pipe):
    """Without classifier-free guidance (omega <= 1) no unconditional half is evaluated: the negative prompt is
    unused, as in diffusers."""
    with_negative = SamplingConfig(steps=4, guidance=1.0, share=0.5, negative_prompt="blurry")
    ours = generate(tiny_pipe, PROMPTS, with_negative, GroupingConfig(tau=0.0), seed=2)
    plain = generate(tiny_pipe, PROMPTS, SamplingConfig(steps=4, guidance=1.0, share=0.5), GroupingConfig(tau=0.0),
                     seed=2)
    assert torch.equal(ours.latents, plain.latents)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp", "euler"])
@pytest.mark.parametrize("split", [1, 3, 5])
def test_split_and_resume_equals_unsplit(tiny_pipe, scheduler, split):
    config = SamplingConfig(steps=6, guidance=5.0, scheduler=scheduler)
    cond, uncond = encode_prompts(tiny_pipe, PROMPTS[:1])
    sched_cfg = tiny_pipe.scheduler.config

    def fresh(start, stop, latents, state=None):
        s = make_scheduler(sched_cfg, scheduler, 6)
        if state is not None:
            import_solver_state(s, state)
        return Trajectory(latents=latents, cond=cond, scheduler=s, start=start, stop=stop)

    noise = initial_noise(latent_shape(tiny_pipe, config), 5, make_scheduler(sched_cfg, scheduler, 6), torch.float32)
    whole = fresh(0, 6, noise.clone())
    denoise(tiny_pipe.unet, [whole], uncond, config)
    first = fresh(0, split, noise.clone())
    denoise(tiny_pipe.unet, [first], uncond, config)
    saved = first.latents.clone()
    state = {k: v.clone() for k, v in export_solver_state(first.scheduler).items()}
    second = fresh(split, 6, saved, state)
    denoise(tiny_pipe.unet, [second], uncond, config)
    assert torch.equal(second.latents, whole.latents)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp", "euler"])
def test_a_child_in_the_same_loop_continues_its_parent_exactly(tiny_pipe, scheduler):
    """A trajectory forked from its parent's end inside one denoise call (a sub-group) takes the parent's latent
    and solver state: parent [0, 3) then child [3, 6) on the same condition equals one trajectory [0, 6)."""
    config = SamplingConfig(steps=6, guidance=5.0, scheduler=scheduler)
    cond, uncond = encode_prompts(tiny_pipe, PROMPTS[:1])
    sched_cfg = tiny_pipe.scheduler.config
    noise = initial_noise(latent_shape(tiny_pipe, config), 2, make_scheduler(sched_cfg, scheduler, 6), torch.float32)
    whole = Trajectory(noise.clone(), cond, make_scheduler(sched_cfg, scheduler, 6), 0, 6)
    denoise(tiny_pipe.unet, [whole], uncond, config)
    parent = Trajectory(noise.clone(), cond, make_scheduler(sched_cfg, scheduler, 6), 0, 3)
    child = Trajectory(None, cond, make_scheduler(sched_cfg, scheduler, 6), 3, 6, parent=0)
    denoise(tiny_pipe.unet, [parent, child], uncond, config)
    assert torch.equal(child.latents, whole.latents)


def test_shared_phase_stops_every_group_at_the_branch_step(tiny_pipe):
    """shared_phase runs steps [0, k) once per group: the points it returns sit at k, after k UNet calls."""
    from sage_core.sampler import shared_phase

    config = SamplingConfig(steps=7, guidance=5.0, share=0.45)
    cond, uncond = encode_prompts(tiny_pipe, PROMPTS[:2])
    noise = initial_noise(latent_shape(tiny_pipe, config), 0, make_scheduler(tiny_pipe.scheduler.config, "ddim", 7),
                          torch.float32)
    counter = UNetCounter()
    points = shared_phase(tiny_pipe.unet, tiny_pipe.scheduler.config, [cond[0:1], cond[1:2]], [noise, noise], uncond,
                          config, counter)
    assert config.branch_step() == 3
    assert [p.step for p in points] == [3, 3] and counter.total == 2 * 2 * 3


def test_branch_step_rounds_the_sharing_ratio():
    """k = round(beta * T), not its floor; shared_steps, where given, is k itself."""
    assert SamplingConfig(steps=10, share=0.37).branch_step() == 4
    assert SamplingConfig(steps=10, share=0.33).branch_step() == 3
    assert SamplingConfig(steps=30, share=0.4).branch_step() == 12
    assert SamplingConfig(steps=10, share=0.37, shared_steps=7).branch_step() == 7


def test_counts_match_closed_form_per_group(tiny_pipe):
    prompts = PROMPTS + ["a red circle on the right", "a yellow circle"]
    groups = [[0, 3, 4], [1, 2]]
    config = SamplingConfig(steps=10, guidance=7.5, share=0.4)
    result = generate(tiny_pipe, prompts, config, GroupingConfig(), seed=20, groups=groups)
    assert result.seeds == [20, 21]  # a group's shared noise is seeded by base seed + its first member
    k, T = config.branch_step(), config.steps
    for gi, members in enumerate(groups):
        indep = result.independent_evaluations(len(members))
        used = result.counter.by_label[gi]
        assert used == 2 * (k + len(members) * (T - k))
        assert 1 - used / indep == pytest.approx(saving_closed_form(k, T, len(members)), abs=1e-12)
    assert result.counter.total == sum(result.counter.by_label.values())


def test_no_cfg_counts_one_evaluation_per_step(tiny_pipe):
    config = SamplingConfig(steps=4, guidance=1.0, share=0.5)
    result = generate(tiny_pipe, PROMPTS[:2], config, GroupingConfig(), groups=[[0, 1]])
    assert result.counter.total == 2 + 2 * 2
    assert result.independent_evaluations() == 2 * 4  # independent sampling without CFG: one per step too


def test_shared_group_members_start_from_one_latent(tiny_pipe):
    """Members of a group differ only through their branch phase; with share 1 they all get the same image (up to
    float rounding: the VAE decodes them as rows of one batch, which with 2 torch threads may round apart)."""
    config = SamplingConfig(steps=4, guidance=7.5, share=1.0)
    result = generate(tiny_pipe, PROMPTS, config, GroupingConfig(), groups=[[0, 1, 2]])
    assert np.abs(result.images[0] - result.images[1]).max() < 1e-5
    config = SamplingConfig(steps=4, guidance=7.5, share=0.5)
    result = generate(tiny_pipe, PROMPTS, config, GroupingConfig(), groups=[[0, 1, 2]])
    assert np.abs(result.images[0] - result.images[1]).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [dict(steps=0), dict(share=-0.1), dict(share=1.5), dict(scheduler="plms"), dict(shared_steps=40), dict(height=30),
     dict(negative_prompt=None)],
)
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_a_schedule_past_the_training_timesteps_is_refused(tiny_pipe):
    """DDIM's leading spacing with steps_offset 1 puts timestep 1000 first at 1000 steps: a ValueError, not an
    IndexError inside the loop."""
    with pytest.raises(ValueError, match="past the model's 1000 training timesteps"):
        make_scheduler(tiny_pipe.scheduler.config, "ddim", 1000)
    for name, steps in [("ddim", 999), ("dpmpp", 1000), ("euler", 1000)]:
        assert int(make_scheduler(tiny_pipe.scheduler.config, name, steps).timesteps.max()) < 1000


def test_guidance_schedule_interpolates():
    c = SamplingConfig(steps=11, guidance=8.0, guidance_end=3.0)
    assert c.guidance_at(0) == 8.0 and c.guidance_at(10) == 3.0 and c.guidance_at(5) == pytest.approx(5.5)


def test_counter_labels():
    c = UNetCounter()
    c.add("a", 2)
    c.add("b", 4)
    assert c.total == 6 and c.by_label["b"] == 4
