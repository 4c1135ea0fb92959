"""The batched DDIM step: all trajectories of a denoise loop in one state tensor, one fixed set of tensor
operations per round whatever their number, and no host-device traffic inside the loop.

diffusers' DDIMScheduler.step works on one sample at one timestep, and reads its alphas on the host (a CUDA
timestep indexes a CPU table and is compared with 0: two host-device synchronisations per trajectory per step).
Here the per-step numbers of every (round, trajectory) - row indices, timesteps, guidance weight and the four
DDIM coefficients - are computed on the host before the loop, exactly as diffusers computes them, and sent to
the device in two transfers; each round then gathers its rows, calls the UNet, mixes classifier-free guidance
and takes the DDIM step (eta 0) for all rows at once, and scatters them back. In float32 the result equals
diffusers' step bit for bit (tests/test_batched_step.py); in half precision the step is computed in float32 and
rounded once, where diffusers rounds after each operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from sage_core.sampler import Round, SamplingConfig, Trajectory, UNetCounter, count_round, uncond_rows

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
N_COEF = 5  # guidance weight, sqrt(alpha_t), sqrt(1 - alpha_t), sqrt(alpha_prev), sqrt(1 - alpha_prev)


def supports_batched_scheduler(scheduler) -> bool:
    """DDIM without dynamic thresholding, with a prediction type this step knows."""
    return (
        isinstance(scheduler, DDIMScheduler)
        and not scheduler.config.thresholding
        and scheduler.config.prediction_type in PREDICTION_TYPES
    )


def supports_batched(trajectories: Sequence[Trajectory]) -> bool:
    """Whether every trajectory's scheduler takes the batched step, all with the same config and step count."""
    if not trajectories:
        return False
    first = trajectories[0].scheduler
    return supports_batched_scheduler(first) and all(
        tr.scheduler.config == first.config and tr.scheduler.num_inference_steps == first.num_inference_steps
        for tr in trajectories
    )


def ddim_table(scheduler: DDIMScheduler) -> tuple[list[int], list[tuple[float, float, float, float]]]:
    """Per schedule index: the timestep, and (sqrt(alpha_t), sqrt(1 - alpha_t), sqrt(alpha_prev),
    sqrt(1 - alpha_prev)) computed with the float32 operations DDIMScheduler.step uses (eta 0). Read on the
    host: a scheduler whose timesteps live on a device is remade there from its config."""
    if scheduler.timesteps.device.type != "cpu":
        steps, scheduler = scheduler.num_inference_steps, DDIMScheduler.from_config(scheduler.config)
        scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps.tolist()]
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    coefs = []
    for t in timesteps:
        alpha = scheduler.alphas_cumprod[t]
        prev = t - stride
        alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        beta = 1 - alpha
        coefs.append((float(alpha**0.5), float(beta**0.5), float(alpha_prev**0.5), float((1 - alpha_prev) ** 0.5)))
    return timesteps, coefs


@dataclass(frozen=True)
class RoundTensors:
    """One round's per-row numbers on the device: views into two tensors sent before the loop."""

    rows: torch.Tensor  # [n] int64, indices into the state tensor
    timesteps: torch.Tensor  # [n] or [2n] (CFG) int64, the UNet's timestep per input row
    coefs: torch.Tensor  # [N_COEF, n, 1, 1, 1] float32
    forks: torch.Tensor  # [2, f] int64: children, then the rows they copy


def round_tensors(rounds: Sequence[Round], scheduler: DDIMScheduler, config: SamplingConfig,
                  device: torch.device) -> list[RoundTensors]:
    """Every round's RoundTensors, built on the host and moved to `device` in two transfers (from pinned memory,
    without blocking, on CUDA)."""
    timesteps, table = ddim_table(scheduler)
    cfg = config.uses_cfg()
    ints: list[int] = []
    floats: list[float] = []
    layout = []
    for rd in rounds:
        steps = [timesteps[i] for i in rd.indices]
        children, parents = [c for c, _ in rd.forks], [p for _, p in rd.forks]
        at_int, at_float = len(ints), len(floats)
        ints += list(rd.rows) + steps + (steps if cfg else []) + children + parents
        for k in range(N_COEF):
            floats += [config.guidance_at(i) if k == 0 else table[i][k - 1] for i in rd.indices]
        layout.append((at_int, at_float, len(rd.rows), len(rd.forks)))
    host_ints = torch.tensor(ints, dtype=torch.int64)
    host_floats = torch.tensor(floats, dtype=torch.float32)
    if torch.device(device).type == "cuda":
        host_ints, host_floats = host_ints.pin_memory(), host_floats.pin_memory()
    dev_ints = host_ints.to(device, non_blocking=True)
    dev_floats = host_floats.to(device, non_blocking=True)
    out = []
    for at_int, at_float, n, f in layout:
        t_rows = n * (2 if cfg else 1)
        out.append(
            RoundTensors(
                rows=dev_ints[at_int : at_int + n],
                timesteps=dev_ints[at_int + n : at_int + n + t_rows],
                coefs=dev_floats[at_float : at_float + N_COEF * n].view(N_COEF, n, 1, 1, 1),
                forks=dev_ints[at_int + n + t_rows : at_int + n + t_rows + 2 * f].view(2, f),
            )
        )
    return out


def ddim_step(x: torch.Tensor, model_output: torch.Tensor, coefs: torch.Tensor, scheduler_config) -> torch.Tensor:
    """DDIMScheduler.step (eta 0) for rows at their own timesteps; `coefs` are the rows' [N_COEF, n, 1, 1, 1]
    numbers (the first, the guidance weight, unused here). Computed in float32 or wider; returns x's dtype."""
    _, sa, sb, sap, sbp = coefs
    kind = scheduler_config.prediction_type
    if kind == "epsilon":
        x0 = (x - sb * model_output) / sa
        eps = model_output
    elif kind == "sample":
        x0 = model_output
        eps = (x - sa * x0) / sb
    else:  # v_prediction
        x0 = sa * x - sb * model_output
        eps = sa * model_output + sb * x
    if scheduler_config.clip_sample:
        x0 = x0.clamp(-scheduler_config.clip_sample_range, scheduler_config.clip_sample_range)
    return (sap * x0 + sbp * eps).to(x.dtype)


@torch.no_grad()
def batched_denoise(unet, unet_dtype: torch.dtype, trajectories: Sequence[Trajectory], rounds: Sequence[Round],
                    uncond: torch.Tensor, config: SamplingConfig, counter: UNetCounter | None) -> None:
    """Run the rounds on one state tensor [N, C, h, w], the UNet called in `unet_dtype`; each trajectory ends with
    its row (a copy) as latents."""
    own = [tr.latents for tr in trajectories if tr.latents is not None]
    if not own:
        return
    device, dtype = own[0].device, own[0].dtype
    state = torch.empty((len(trajectories), *own[0].shape[1:]), device=device, dtype=dtype)
    for i, tr in enumerate(trajectories):
        if tr.latents is not None:
            state[i] = tr.latents[0]
    conds = torch.cat([tr.cond for tr in trajectories]).to(unet_dtype)
    uncond = uncond.to(unet_dtype)
    scheduler = trajectories[0].scheduler
    cfg = config.uses_cfg()
    per_round = round_tensors(rounds, scheduler, config, device)
    every_row = tuple(range(len(trajectories)))
    cond_cache: dict[tuple[int, ...], torch.Tensor] = {}
    for rd, rt in zip(rounds, per_round, strict=True):
        if rd.forks:
            state.index_copy_(0, rt.forks[0], state.index_select(0, rt.forks[1]))
        if not rd.rows:
            continue
        whole = rd.rows == every_row
        x = state if whole else state.index_select(0, rt.rows)
        if rd.rows not in cond_cache:
            c = conds if whole else conds.index_select(0, rt.rows)
            cond_cache[rd.rows] = torch.cat([uncond_rows(uncond, rt.rows), c]) if cfg else c
        x_in = x.to(unet_dtype)
        pred = unet(torch.cat([x_in, x_in]) if cfg else x_in, rt.timesteps,
                    encoder_hidden_states=cond_cache[rd.rows], return_dict=False)[0]
        count_round(counter, trajectories, rd.rows, cfg)
        if cfg:
            pred_uncond, pred_text = pred.chunk(2)
            pred = pred_uncond + rt.coefs[0] * (pred_text - pred_uncond)
        x_next = ddim_step(x, pred, rt.coefs, scheduler.config)
        if whole:
            state.copy_(x_next)
        else:
            state.index_copy_(0, rt.rows, x_next)
    for i, tr in enumerate(trajectories):
        tr.latents = state[i : i + 1].clone()
        tr.index = tr.stop
