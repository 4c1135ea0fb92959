"""L_SAGE (paper Eq. 3) and the standard noise-prediction loss (Eq. 2), on batches of groups.

For a group of N (latent z^n, text embedding c^n) pairs with means zbar, cbar, ONE shared noise e and two
timesteps t_s ~ U{t*..T-1} (shared phase), t_b ~ U{0..t*} (branch phase):

  shared  = l1 * w(t_s) * || eps(a_ts zbar + s_ts e, t_s, cbar) - e ||^2
  soft    = l2 *          || eps(a_ts zbar + s_ts e, t_s, cbar) - 1/N sum_n eps(a_ts z^n + s_ts e, t_s, c^n) ||^2
  branch  = 1/N sum_n w(t_b) || eps(a_tb z^n + s_tb e, t_b, c^n) - e ||^2
  L_SAGE  = mean over the groups of the batch of (shared + soft + branch)

Conventions (the paper leaves them open; all are config fields):
- ||.||^2 is the mean over latent elements (diffusers' F.mse_loss), so every term is on the scale of Eq. 2.
- Timesteps are the DDPM training indices 0..T-1 of diffusers (the paper's 1..T); t* is the training timestep
  where the sampler branches: the DDIM timestep at schedule index k = round(beta * steps) (see `branch_timestep`).
  t* belongs to both ranges, as in the paper.
- w(t) is "constant" (w = 1, SD's simple loss) or "min_snr" (min(SNR, gamma)/SNR).
- Gradients through the soft target: `soft_target_grad=False` (default) treats the averaged member prediction as
  a fixed target (stop-gradient, as in distillation: the term then moves only the shared-phase prediction toward
  the members' consensus); True lets the term also move the member predictions toward the shared one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from sage_core.config_types import check_fields

WEIGHTINGS = ("constant", "min_snr")


@dataclass(frozen=True)
class SageLossConfig:
    """The knobs of Eq. 3."""

    lambda1: float = 1.0
    lambda2: float = 1.0
    branch_t: int = 500  # t*: training timestep of the branch point (see branch_timestep)
    num_train_timesteps: int = 1000
    weighting: str = "constant"
    snr_gamma: float = 5.0
    soft_target_grad: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.lambda1 < 0 or self.lambda2 < 0:
            raise ValueError(f"lambda1 and lambda2 must be >= 0, got {self.lambda1}, {self.lambda2}")
        if not 0 <= self.branch_t < self.num_train_timesteps:
            raise ValueError(f"branch_t must be in [0, {self.num_train_timesteps - 1}], got {self.branch_t}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {WEIGHTINGS}")
        if self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0, got {self.snr_gamma}")


@dataclass
class GroupBatch:
    """A batch of groups, flattened: member latents/embeddings with the index of their group."""

    latents: torch.Tensor  # [M, C, h, w] member latents z^n (already scaled by the VAE scaling factor)
    cond: torch.Tensor  # [M, L, D] member text embeddings c^n
    group_index: torch.Tensor  # [M] long, group of each member, groups numbered 0..G-1

    @property
    def num_groups(self) -> int:
        return int(self.group_index.max()) + 1 if self.group_index.numel() else 0


def branch_timestep(scheduler_config: dict, steps: int, share: float) -> int:
    """t*: the training timestep of the first branch step of a `steps`-step DDIM run sharing `share` of it."""
    k = round(share * steps)
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    if k >= steps:
        return 0
    return int(scheduler.timesteps[k])


def group_mean(x: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-group mean of rows of x: [M, ...] -> [G, ...]."""
    flat = x.reshape(x.shape[0], -1)
    sums = torch.zeros(num_groups, flat.shape[1], dtype=x.dtype, device=x.device).index_add_(0, group_index, flat)
    counts = torch.bincount(group_index, minlength=num_groups).to(x.dtype).unsqueeze(1)
    return (sums / counts).reshape(num_groups, *x.shape[1:])


def loss_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, config: SageLossConfig) -> torch.Tensor:
    """w(t) per timestep."""
    if config.weighting == "constant":
        return torch.ones_like(t, dtype=torch.float32)
    ac = alphas_cumprod.to(t.device)[t].float()
    snr = ac / (1 - ac)
    return torch.clamp(snr, max=config.snr_gamma) / snr


def add_noise(alphas_cumprod: torch.Tensor, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """a_t z + s_t e with a_t = sqrt(alphabar_t), s_t = sqrt(1 - alphabar_t) (Eq. 1), per row."""
    ac = alphas_cumprod.to(z.device)[t].to(z.dtype).reshape(-1, *[1] * (z.dim() - 1))
    return ac.sqrt() * z + (1 - ac).sqrt() * noise


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target||^2 as the mean over elements, per row: [B, ...] -> [B]."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def sample_sage_timesteps(num_groups: int, config: SageLossConfig, generator: torch.Generator) -> tuple:
    """t_s ~ U{t*..T-1} and t_b ~ U{0..t*}, one pair per group."""
    t_s = torch.randint(config.branch_t, config.num_train_timesteps, (num_groups,), generator=generator)
    t_b = torch.randint(0, config.branch_t + 1, (num_groups,), generator=generator)
    return t_s, t_b


def sage_loss(
    unet,
    alphas_cumprod: torch.Tensor,
    batch: GroupBatch,
    config: SageLossConfig,
    noise: torch.Tensor,
    t_s: torch.Tensor,
    t_b: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_SAGE for a batch of groups with given shared noises [G, C, h, w] and timesteps [G]; returns the loss and
    its three terms (batch means, for logging). One UNet call for the rows that carry gradients, one more
    (no_grad) for the soft target when it is a fixed target."""
    g_idx, num_groups = batch.group_index, batch.num_groups
    m = batch.latents.shape[0]
    z_bar = group_mean(batch.latents, g_idx, num_groups)
    c_bar = group_mean(batch.cond, g_idx, num_groups)
    e_member = noise[g_idx]  # the group's one shared noise, for each member
    x_shared = add_noise(alphas_cumprod, z_bar, noise, t_s)
    x_soft = add_noise(alphas_cumprod, batch.latents, e_member, t_s[g_idx])
    x_branch = add_noise(alphas_cumprod, batch.latents, e_member, t_b[g_idx])
    dtype = unet.dtype
    if config.soft_target_grad:
        x = torch.cat([x_shared, x_soft, x_branch]).to(dtype)
        t = torch.cat([t_s, t_s[g_idx], t_b[g_idx]])
        c = torch.cat([c_bar, batch.cond, batch.cond]).to(dtype)
        pred = unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
        pred_shared, pred_soft, pred_branch = pred.split([num_groups, m, m])
    else:
        with torch.no_grad():
            pred_soft = unet(x_soft.to(dtype), t_s[g_idx], encoder_hidden_states=batch.cond.to(dtype),
                             return_dict=False)[0]
        x = torch.cat([x_shared, x_branch]).to(dtype)
        t = torch.cat([t_s, t_b[g_idx]])
        c = torch.cat([c_bar, batch.cond]).to(dtype)
        pred = unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
        pred_shared, pred_branch = pred[:num_groups], pred[num_groups:]
    soft_target = group_mean(pred_soft.float(), g_idx, num_groups)
    w_s = loss_weights(alphas_cumprod, t_s, config)
    w_b = loss_weights(alphas_cumprod, t_b, config)
    shared = config.lambda1 * w_s * per_sample_mse(pred_shared, noise)
    soft = config.lambda2 * per_sample_mse(pred_shared, soft_target)
    branch = group_mean(w_b[g_idx] * per_sample_mse(pred_branch, e_member), g_idx, num_groups)
    total = (shared + soft + branch).mean()
    terms = {k: float(v.detach().mean()) for k, v in (("shared", shared), ("soft", soft), ("branch", branch))}
    return total, terms


def standard_loss(
    unet,
    alphas_cumprod: torch.Tensor,
    batch: GroupBatch,
    config: SageLossConfig,
    noise: torch.Tensor,
    t: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 2 on every member independently: own noise [M, ...], own t ~ U{0..T-1} [M]; the mean over members."""
    x = add_noise(alphas_cumprod, batch.latents, noise, t).to(unet.dtype)
    pred = unet(x, t, encoder_hidden_states=batch.cond.to(unet.dtype), return_dict=False)[0]
    loss = (loss_weights(alphas_cumprod, t, config) * per_sample_mse(pred, noise)).mean()
    return loss, {"standard": float(loss.detach())}
