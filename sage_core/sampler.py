"""The split sampler of Algorithm 1: a shared phase per group, then a branch phase per prompt.

Both phases are the same plain function, `denoise`, over a slice of the schedule (k-diffusion style): the edge
server runs it for the shared slice [0, k) of every group of a window, a device runs it for the branch slice
[k, T) of its own prompt. Every active trajectory advances one step per UNet call, so all groups share one
batched UNet evaluation per round; a trajectory may start from another's end (a sub-group from its parent group),
and then joins the loop in the round its parent leaves it, so a whole hierarchy of groups runs in as many rounds
as its longest chain. With DDIM (the serving default) a round is one fixed set of tensor operations for all
trajectories, with every per-step number sent to the device before the loop (sage_core.batched_step); other
schedulers step each trajectory with its own diffusers scheduler. Every UNet sample evaluation is counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from sage_core.names import MAX_STEPS, SCHEDULER_NAMES, SHARED_CONDITIONS

SCHEDULERS = dict(zip(SCHEDULER_NAMES, (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler),
                      strict=True))


@dataclass(frozen=True)
class SamplingConfig:
    """Settings of one shared-sampling run; a group shares `branch_step()` steps, then every prompt branches.

    The branch point is given either as a sharing ratio `share` (beta = (T - T*)/T) or as `shared_steps`.
    Guidance omega(t) is `guidance` at the first step, moving linearly to `guidance_end` at the last (constant
    when `guidance_end` is None). Classifier-free guidance is off when omega <= 1 throughout, as in diffusers.
    A group's shared steps run on `shared_condition`: "mean", the mean of its members' token embeddings (the
    paper's c-bar), or "medoid", the embeddings of the member closest to all the others.
    `negative_prompt` is the text guidance steers away from, as diffusers' `negative_prompt`: its embedding is
    the unconditional half of classifier-free guidance (`negative_embedding`; "" is the plain empty prompt).
    The sampling functions take that embedding as `uncond`; the callers that encode text read this field.
    """

    steps: int = 30
    guidance: float = 7.5
    share: float = 0.4
    shared_steps: int | None = None
    scheduler: str = "ddim"
    height: int | None = None
    width: int | None = None
    guidance_end: float | None = None
    shared_condition: str = "mean"
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be in [1, {MAX_STEPS}], got {self.steps}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share (beta) must be in [0, 1], got {self.share}")
        if self.shared_steps is not None and not 0 <= self.shared_steps <= self.steps:
            raise ValueError(f"shared_steps must be in [0, steps={self.steps}], got {self.shared_steps}")
        if self.shared_condition not in SHARED_CONDITIONS:
            raise ValueError(f"shared_condition must be one of {', '.join(SHARED_CONDITIONS)}, "
                             f"got {self.shared_condition!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        for g in (self.guidance, self.guidance_end):
            if g is not None and not 0.0 <= g <= 100.0:
                raise ValueError(f"guidance must be in [0, 100], got {g}")
        for side in (self.height, self.width):
            if side is not None and (side < 8 or side % 8 or side > 4096):
                raise ValueError(f"height and width must be multiples of 8 in [8, 4096], got {side}")
        if not isinstance(self.negative_prompt, str):  # its length is the front ends' limit (a server may allow more)
            raise ValueError(f"negative_prompt must be text, got {type(self.negative_prompt).__name__}")

    def branch_step(self) -> int:
        """k = T - T*: the number of steps a group shares (schedule indices [0, k))."""
        return self.shared_steps if self.shared_steps is not None else round(self.share * self.steps)

    def guidance_at(self, index: int) -> float:
        """omega at schedule index `index` (0 = the first, noisiest step)."""
        if self.guidance_end is None or self.steps == 1:
            return self.guidance
        return self.guidance + (self.guidance_end - self.guidance) * index / (self.steps - 1)

    def uses_cfg(self) -> bool:
        """Whether the unconditional branch of classifier-free guidance is evaluated."""
        return max(self.guidance, self.guidance_end or 0.0) > 1.0


@dataclass
class UNetCounter:
    """Counts UNet sample evaluations (a CFG step of one trajectory is 2), in total and per label."""

    total: int = 0
    by_label: Counter = field(default_factory=Counter)

    def add(self, label: object, n: int) -> None:
        self.total += n
        self.by_label[label] += n


@dataclass
class Trajectory:
    """One latent moving along the schedule from index `start` to `stop` under its own conditioning."""

    latents: torch.Tensor | None  # [1, C, h, w]; None for a trajectory that starts from its parent's end
    cond: torch.Tensor  # [1, L, D] text embedding (a group condition in the shared phase)
    scheduler: object
    start: int
    stop: int
    label: object = None
    generator: torch.Generator | None = None
    index: int = -1
    parent: int | None = None  # index (in the same denoise call) of the trajectory whose end this one starts from

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop <= len(self.scheduler.timesteps):
            raise ValueError(f"bad schedule slice [{self.start}, {self.stop}) of {len(self.scheduler.timesteps)}")
        if (self.latents is None) == (self.parent is None):
            raise ValueError("a trajectory starts either from its own latents or from its parent's end, not both")
        self.index = self.start
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(self.start)


@dataclass
class BranchPoint:
    """A group's state at the branch point: what the edge server sends to each device of the group."""

    latents: torch.Tensor  # [1, C, h, w]
    step: int  # schedule index where the branch phase starts (k)
    solver_state: dict[str, torch.Tensor] = field(default_factory=dict)


def make_scheduler(base_config: dict, name: str, steps: int, device: torch.device | str = "cpu"):
    """A fresh scheduler of kind `name` from a pipeline's scheduler config, with `steps` timesteps set.
    Never share one between trajectories: diffusers schedulers keep a step counter. A ValueError where the
    schedule reaches past the model's training timesteps (DDIM's "leading" spacing with steps_offset 1 at
    1000 of 1000 steps), which diffusers' step would only meet as an IndexError."""
    cls = SCHEDULERS[name]
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpmpp" else {}
    scheduler = cls.from_config(base_config, **extra)
    scheduler.set_timesteps(steps)  # on the host first: checked without reading the device
    top, train = float(scheduler.timesteps.max()), scheduler.config.num_train_timesteps
    if top >= train:
        raise ValueError(f"{name} with {steps} steps reaches timestep {top:g}, past the model's {train} "
                         "training timesteps; use fewer steps")
    if torch.device(device).type != "cpu":
        scheduler.set_timesteps(steps, device=device)
    return scheduler


def scheduler_refusal(base_config: dict, name: str, steps: int) -> str:
    """Why `make_scheduler` cannot set up scheduler `name` with `steps` timesteps for the model whose scheduler
    config is `base_config` ("" when it can)."""
    try:
        make_scheduler(base_config, name, steps)
    except ValueError as exc:
        return str(exc)
    return ""


def export_solver_state(scheduler) -> dict[str, torch.Tensor]:
    """The tensors a multistep solver carries between steps (empty for single-step DDIM and Euler)."""
    if not isinstance(scheduler, DPMSolverMultistepScheduler):
        return {}
    state = {f"model_output.{i}": m for i, m in enumerate(scheduler.model_outputs) if m is not None}
    state["lower_order_nums"] = torch.tensor(scheduler.lower_order_nums)
    return state


def import_solver_state(scheduler, state: dict[str, torch.Tensor]) -> None:
    """Restore what `export_solver_state` took, so a resumed run equals an unsplit one."""
    if not isinstance(scheduler, DPMSolverMultistepScheduler):
        if state:
            raise ValueError(f"{type(scheduler).__name__} carries no solver state, got {sorted(state)}")
        return
    order = scheduler.config.solver_order
    outputs: list[torch.Tensor | None] = [None] * order
    for key, value in state.items():
        if key.startswith("model_output."):
            i = int(key.split(".", 1)[1])
            if not 0 <= i < order:
                raise ValueError(f"solver state {key} does not fit solver_order={order}")
            outputs[i] = value
    scheduler.model_outputs = outputs
    scheduler.lower_order_nums = int(state.get("lower_order_nums", torch.tensor(0)))


def initial_noise(
    shape: Sequence[int], seed: int, scheduler, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """z_T for one group, drawn exactly as diffusers' StableDiffusionPipeline draws it for `seed`."""
    return initial_noises(shape, [seed], scheduler, dtype, device)[0]


def initial_noises(
    shape: Sequence[int], seeds: Sequence[int], scheduler, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """`initial_noise` for each seed, drawn on the host (as diffusers draws with a CPU generator) and sent to the
    device in one transfer."""
    if not seeds:
        return []
    cpu = torch.device("cpu")
    host = torch.cat([randn_tensor(tuple(shape), generator=torch.Generator().manual_seed(s), device=cpu, dtype=dtype)
                      for s in seeds])
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    noise = host.to(device, non_blocking=True) * scheduler.init_noise_sigma
    return list(noise.split(shape[0]))


@dataclass(frozen=True)
class Round:
    """One batched UNet call of a denoise loop: the trajectories it advances, each at its schedule index, after
    the forks that start children from their parents' current state."""

    rows: tuple[int, ...]
    indices: tuple[int, ...]
    forks: tuple[tuple[int, int], ...] = ()  # (child, source): the child starts from the source row's state


@dataclass(frozen=True)
class Span:
    """A trajectory's place in a denoise loop: its schedule slice [start, stop) and the index of the earlier
    trajectory whose end it starts from (None: it has latents of its own)."""

    start: int
    stop: int
    parent: int | None = None


def plan_rounds(spans: Sequence[Span]) -> list[Round]:
    """As soon as possible: a trajectory without a parent runs from round 0, a child from the round its parent
    ends (its start must be its parent's stop), so the loop takes as many rounds as the longest chain. The last
    round may only fork (children that take no step of their own)."""
    begin: list[int] = []
    for i, sp in enumerate(spans):
        if sp.parent is None:
            begin.append(0)
            continue
        if not 0 <= sp.parent < i:
            raise ValueError(f"trajectory {i}: its parent must come before it, got {sp.parent}")
        parent = spans[sp.parent]
        if parent.stop != sp.start:
            raise ValueError(f"trajectory {i} starts at step {sp.start}, its parent stops at {parent.stop}")
        begin.append(begin[sp.parent] + parent.stop - parent.start)
    ends = [b + sp.stop - sp.start for b, sp in zip(begin, spans, strict=True)]
    rounds = []
    for r in range(max(ends, default=0) + 1):
        rows = tuple(i for i, (b, e) in enumerate(zip(begin, ends, strict=True)) if b <= r < e)
        forked = {i: sp.parent for i, sp in enumerate(spans) if sp.parent is not None and begin[i] == r}
        forks = tuple((i, source(forked, p)) for i, p in forked.items())
        if rows or forks:
            rounds.append(Round(rows, tuple(spans[i].start + r - begin[i] for i in rows), forks))
    return rounds


def source(forked: dict[int, int], parent: int) -> int:
    """The row a fork copies: its parent's, or, when the parent is itself forked in the same round (it takes no
    step of its own), that parent's source: so all forks of a round can copy at once."""
    while parent in forked:
        parent = forked[parent]
    return parent


def uncond_of(uncond: torch.Tensor, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Guidance's unconditional embedding for the trajectories `rows` (positions, or an index tensor on the
    embeddings' device): the one shared embedding [1, L, D] as it is, or each row's own of a per-trajectory
    [N, L, D] (trajectories with different negative prompts in one batch)."""
    if uncond.shape[0] == 1:
        return uncond
    index = rows if isinstance(rows, torch.Tensor) else torch.tensor(list(rows), device=uncond.device)
    return uncond.index_select(0, index)


def uncond_rows(uncond: torch.Tensor, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """`uncond_of`, one row per trajectory of `rows` (the shared embedding repeated): a UNet batch's half."""
    return uncond_of(uncond, rows).expand(len(rows), -1, -1)


def check_uncond(uncond: torch.Tensor, n: int) -> None:
    """ValueError unless `uncond` is one embedding [1, L, D] for all `n` trajectories or one per trajectory."""
    if uncond.dim() != 3 or uncond.shape[0] not in (1, n):
        raise ValueError(f"uncond must be [1, L, D] or one embedding per trajectory [{n}, L, D], "
                         f"got {list(uncond.shape)}")


def count_round(counter: UNetCounter | None, trajectories: Sequence[Trajectory], rows: Sequence[int], cfg: bool):
    """Add one round's UNet sample evaluations (2 per trajectory with CFG) to the counter."""
    if counter is not None:
        for i in rows:
            counter.add(trajectories[i].label, 2 if cfg else 1)


@torch.no_grad()
def denoise(
    unet,
    trajectories: Sequence[Trajectory],
    uncond: torch.Tensor,
    config: SamplingConfig,
    counter: UNetCounter | None = None,
    batched: bool | None = None,
) -> None:
    """Advance every trajectory over its own schedule slice, one batched UNet call per round for all active
    ones (`plan_rounds`); latents are updated in place on the trajectories. `uncond` is guidance's unconditional
    embedding, one for all [1, L, D] or one per trajectory [N, L, D] (`uncond_rows`). `batched` picks the
    stepper: the batched DDIM step (sage_core.batched_step; the default where it applies) or each trajectory's
    own diffusers scheduler (False)."""
    from sage_core.batched_step import batched_denoise, supports_batched

    check_uncond(uncond, len(trajectories))

    rounds = plan_rounds([Span(tr.start, tr.stop, tr.parent) for tr in trajectories])
    use_batched = supports_batched(trajectories) if batched is None else batched
    stepper = batched_denoise if use_batched else stepwise_denoise
    stepper(unet, unet.dtype, trajectories, rounds, uncond, config, counter)  # diffusers' dtype walks the modules


def stepwise_denoise(unet, dtype: torch.dtype, trajectories: Sequence[Trajectory], rounds: Sequence[Round],
                     uncond: torch.Tensor, config: SamplingConfig, counter: UNetCounter | None) -> None:
    """The rounds with each trajectory stepped by its own diffusers scheduler (any scheduler; host-side steps),
    the UNet called in `dtype`."""
    cfg = config.uses_cfg()
    for rd in rounds:
        for child, parent in rd.forks:
            src, dst = trajectories[parent], trajectories[child]
            dst.latents = src.latents.clone()
            import_solver_state(dst.scheduler, {k: v.clone() for k, v in export_solver_state(src.scheduler).items()})
        if not rd.rows:
            continue
        active = [trajectories[i] for i in rd.rows]
        x, t, c = _unet_inputs(active, uncond_rows(uncond, rd.rows), cfg, dtype)
        pred = unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
        count_round(counter, trajectories, rd.rows, cfg)
        if cfg:
            pred_uncond, pred_text = pred.chunk(2)
        for j, tr in enumerate(active):
            if cfg:
                w = config.guidance_at(tr.index)
                noise = pred_uncond[j : j + 1] + w * (pred_text[j : j + 1] - pred_uncond[j : j + 1])
            else:
                noise = pred[j : j + 1]
            step = tr.scheduler.step(noise, tr.scheduler.timesteps[tr.index], tr.latents, generator=tr.generator)
            tr.latents = step.prev_sample
            tr.index += 1


def _unet_inputs(trajectories: Sequence[Trajectory], uncond: torch.Tensor, cfg: bool, dtype: torch.dtype):
    """Batch [uncond block; cond block] of latents, timesteps and text embeddings, as diffusers orders them
    (`uncond`: the trajectories' unconditional embeddings, one row each)."""
    latents = torch.cat(
        [tr.scheduler.scale_model_input(tr.latents, tr.scheduler.timesteps[tr.index]) for tr in trajectories]
    )
    timesteps = torch.stack([tr.scheduler.timesteps[tr.index] for tr in trajectories])
    conds = torch.cat([tr.cond for tr in trajectories])
    if cfg:
        latents = torch.cat([latents, latents])
        timesteps = torch.cat([timesteps, timesteps])
        conds = torch.cat([uncond, conds])
    return latents.to(dtype), timesteps, conds.to(dtype)


def advance(
    unet,
    scheduler_config: dict,
    points: Sequence[BranchPoint | None],
    conds: Sequence[torch.Tensor],
    uncond: torch.Tensor,
    config: SamplingConfig,
    stops: Sequence[int],
    counter: UNetCounter | None = None,
    labels: Sequence[object] | None = None,
    parents: Sequence[int | None] | None = None,
) -> list[BranchPoint]:
    """Move each point from its step to its stop under its own conditioning, all batched: the one primitive
    behind the shared phase, hierarchical sub-group phases, cache resumption and the branch phase. `uncond` is
    one unconditional embedding for all [1, L, D] or one per entry (different negative prompts). Where
    `parents[m]` is not None, entry m starts from the end of the earlier entry `parents[m]` (its point is then
    None), in the same loop."""
    from sage_core.batched_step import supports_batched_scheduler

    parents = list(parents) if parents is not None else [None] * len(points)
    own = [p for p in points if p is not None]
    device = own[0].latents.device if own else "cpu"
    # the batched step reads one host scheduler's table; diffusers' own steps need one scheduler per trajectory
    host = make_scheduler(scheduler_config, config.scheduler, config.steps)
    shared = host if supports_batched_scheduler(host) else None
    trajectories = []
    for m, (point, cond, stop, parent) in enumerate(zip(points, conds, stops, parents, strict=True)):
        scheduler = shared or make_scheduler(scheduler_config, config.scheduler, config.steps, device)
        if point is not None:
            import_solver_state(scheduler, {k: v.clone() for k, v in point.solver_state.items()})
        if point is None and (parent is None or not 0 <= parent < m):
            raise ValueError(f"entry {m} needs either a start point or an earlier entry as its parent")
        start = point.step if point is not None else stops[parent]
        trajectories.append(
            Trajectory(
                latents=point.latents.clone() if point is not None else None,
                cond=cond,
                scheduler=scheduler,
                start=start,
                stop=stop,
                label=labels[m] if labels is not None else m,
                parent=parent,
            )
        )
    denoise(unet, trajectories, uncond, config, counter)
    return [BranchPoint(tr.latents, tr.stop, export_solver_state(tr.scheduler)) for tr in trajectories]


def shared_phase(
    unet,
    scheduler_config: dict,
    group_conds: Sequence[torch.Tensor],
    noises: Sequence[torch.Tensor],
    uncond: torch.Tensor,
    config: SamplingConfig,
    counter: UNetCounter | None = None,
    labels: Sequence[object] | None = None,
    stops: Sequence[int] | None = None,
) -> list[BranchPoint]:
    """Steps [0, k) once per group from its shared noise under its mean text embedding (lines 4-8), batched
    across groups. `stops` overrides k per group (similarity-adaptive depth)."""
    if len(group_conds) != len(noises):
        raise ValueError("one shared noise per group is needed")
    stops = list(stops) if stops is not None else [config.branch_step()] * len(noises)
    starts = [BranchPoint(noise, 0) for noise in noises]
    return advance(unet, scheduler_config, starts, group_conds, uncond, config, stops, counter, labels)


def branch_phase(
    unet,
    scheduler_config: dict,
    points: Sequence[BranchPoint],
    conds: Sequence[torch.Tensor],
    uncond: torch.Tensor,
    config: SamplingConfig,
    counter: UNetCounter | None = None,
    labels: Sequence[object] | None = None,
) -> torch.Tensor:
    """Steps [k, T) for each prompt from its group's branch point under its own embedding (lines 9-13), batched.
    Returns the final latents [M, C, h, w] in the order of `conds`."""
    ends = advance(unet, scheduler_config, points, conds, uncond, config, [config.steps] * len(points), counter, labels)
    return torch.cat([p.latents for p in ends]) if ends else torch.empty(0)
