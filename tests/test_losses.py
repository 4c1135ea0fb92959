"""L_SAGE (Eq. 3) term by term against a direct computation, and the standard loss."""

from __future__ import annotations

import pytest
import torch

from training.losses import (
    GroupBatch,
    SageLossConfig,
    branch_timestep,
    group_mean,
    sage_loss,
    sample_sage_timesteps,
    standard_loss,
)

ALPHAS = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64).float()


class ToyUNet(torch.nn.Module):
    """eps(x, t, c) = tanh(a * x + d * mean(c) * x) + b * t/1000: nonlinear in latent and condition, so the group
    mean's prediction differs from the mean of the members' predictions."""

    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7))
        self.b = torch.nn.Parameter(torch.tensor(-0.3))
        self.d = torch.nn.Parameter(torch.tensor(1.9))

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        tt = (t.float() / 1000).reshape(-1, 1, 1, 1)
        cc = encoder_hidden_states.float().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return (torch.tanh(self.a * x + self.d * cc * x) + self.b * tt,)


def _weight(t: int, cfg: SageLossConfig) -> float:
    """w(t) by hand: 1, or min(SNR, gamma) / SNR."""
    if cfg.weighting == "constant":
        return 1.0
    snr = float(ALPHAS[t]) / (1 - float(ALPHAS[t]))
    return min(snr, cfg.snr_gamma) / snr


def _direct(unet, groups, z, c, noise, t_s, t_b, cfg: SageLossConfig) -> dict[str, float]:
    """Eq. 3 written out group by group with plain loops."""
    def eps(x, t, cond):
        return unet(x[None], torch.tensor([t]), cond[None])[0][0]

    def sq(a, b):
        return ((a - b) ** 2).mean()

    def noisy(x, t, e):
        return ALPHAS[t].sqrt() * x + (1 - ALPHAS[t]).sqrt() * e

    shared, soft, branch = [], [], []
    for g, members in enumerate(groups):
        zbar = torch.stack([z[n] for n in members]).mean(0)
        cbar = torch.stack([c[n] for n in members]).mean(0)
        e, ts, tb = noise[g], int(t_s[g]), int(t_b[g])
        p_shared = eps(noisy(zbar, ts, e), ts, cbar)
        target = torch.stack([eps(noisy(z[n], ts, e), ts, c[n]) for n in members]).mean(0)
        shared.append(cfg.lambda1 * _weight(ts, cfg) * sq(p_shared, e))
        soft.append(cfg.lambda2 * sq(p_shared, target))
        member_terms = torch.stack([sq(eps(noisy(z[n], tb, e), tb, c[n]), e) for n in members])
        branch.append(_weight(tb, cfg) * member_terms.mean())
    out = {k: torch.stack(v).mean().detach() for k, v in (("shared", shared), ("soft", soft), ("branch", branch))}
    out["total"] = out["shared"] + out["soft"] + out["branch"]
    return out


def _toy_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    groups = [[0, 1, 2], [3, 4]]
    z = torch.randn(5, 4, 3, 3, generator=gen)
    c = torch.randn(5, 6, 8, generator=gen)
    noise = torch.randn(2, 4, 3, 3, generator=gen)
    batch = GroupBatch(z, c, torch.tensor([0, 0, 0, 1, 1]))
    return groups, z, c, noise, batch


@pytest.mark.parametrize("soft_grad", [False, True])
def test_sage_loss_matches_direct_computation_term_by_term(soft_grad: bool) -> None:
    unet = ToyUNet()
    groups, z, c, noise, batch = _toy_batch()
    cfg = SageLossConfig(lambda1=0.8, lambda2=1.7, branch_t=400, soft_target_grad=soft_grad)
    t_s, t_b = torch.tensor([700, 400]), torch.tensor([12, 400])
    total, terms = sage_loss(unet, ALPHAS, batch, cfg, noise, t_s, t_b)
    want = _direct(unet, groups, z, c, noise, t_s, t_b, cfg)
    for k in ("shared", "soft", "branch"):
        assert terms[k] == pytest.approx(float(want[k]), rel=1e-5), k
    assert float(total.detach()) == pytest.approx(float(want["total"]), rel=1e-5)


def test_min_snr_weights_each_term_at_its_own_timestep() -> None:
    """Timesteps where min(SNR, 5) / SNR is below 1 and differs between groups and between t_s and t_b: the shared
    term is weighted at each group's t_s, the branch term at its t_b, the soft term not at all."""
    unet = ToyUNet()
    groups, z, c, noise, batch = _toy_batch(5)
    cfg = SageLossConfig(lambda1=0.8, lambda2=1.7, branch_t=60, weighting="min_snr", snr_gamma=5.0)
    t_s, t_b = torch.tensor([150, 60]), torch.tensor([10, 60])
    assert len({round(_weight(int(t), cfg), 6) for t in (150, 60, 10)}) == 3 and _weight(150, cfg) < 1
    total, terms = sage_loss(unet, ALPHAS, batch, cfg, noise, t_s, t_b)
    want = _direct(unet, groups, z, c, noise, t_s, t_b, cfg)
    for k in ("shared", "soft", "branch"):
        assert terms[k] == pytest.approx(float(want[k]), rel=1e-5), k
    assert float(total.detach()) == pytest.approx(float(want["total"]), rel=1e-5)


def test_soft_target_gradient_flag_changes_only_the_soft_term_gradient() -> None:
    groups, z, c, noise, batch = _toy_batch(1)
    t_s, t_b = torch.tensor([800, 600]), torch.tensor([100, 50])
    grads = {}
    for flag in (False, True):
        unet = ToyUNet()
        total, _ = sage_loss(unet, ALPHAS, batch, SageLossConfig(branch_t=500, soft_target_grad=flag), noise, t_s, t_b)
        total.backward()
        grads[flag] = torch.stack([unet.a.grad, unet.b.grad, unet.d.grad])
    assert not torch.allclose(grads[False], grads[True])
    # with lambda2 = 0 the flag cannot matter
    g0 = []
    for flag in (False, True):
        unet = ToyUNet()
        cfg = SageLossConfig(lambda2=0.0, branch_t=500, soft_target_grad=flag)
        sage_loss(unet, ALPHAS, batch, cfg, noise, t_s, t_b)[0].backward()
        g0.append(torch.stack([unet.a.grad, unet.b.grad, unet.d.grad]))
    torch.testing.assert_close(g0[0], g0[1])


def test_detached_soft_target_gradient_equals_manual_stop_gradient() -> None:
    groups, z, c, noise, batch = _toy_batch(2)
    t_s, t_b = torch.tensor([900, 520]), torch.tensor([3, 77])
    cfg = SageLossConfig(lambda1=0.0, lambda2=1.0, branch_t=500)
    unet = ToyUNet()
    total, _ = sage_loss(unet, ALPHAS, batch, cfg, noise, t_s, t_b)
    total.backward()  # lambda1 = 0: the soft and branch terms only
    got = torch.stack([unet.a.grad, unet.b.grad, unet.d.grad])
    # manual: soft term with the target as a constant, plus the branch term (lambda1 = 0)
    ref = ToyUNet()
    with torch.no_grad():
        tgt = [torch.stack([ref(ALPHAS[t_s[g]].sqrt() * z[n][None] + (1 - ALPHAS[t_s[g]]).sqrt() * noise[g][None],
                                t_s[g : g + 1], c[n][None])[0][0] for n in members]).mean(0)
               for g, members in enumerate(groups)]
    losses = []
    for g, members in enumerate(groups):
        zbar = z[members].mean(0, keepdim=True)
        cbar = c[members].mean(0, keepdim=True)
        x = ALPHAS[t_s[g]].sqrt() * zbar + (1 - ALPHAS[t_s[g]]).sqrt() * noise[g][None]
        soft = ((ref(x, t_s[g : g + 1], cbar)[0][0] - tgt[g]) ** 2).mean()
        br = torch.stack([((ref(ALPHAS[t_b[g]].sqrt() * z[n][None] + (1 - ALPHAS[t_b[g]]).sqrt() * noise[g][None],
                               t_b[g : g + 1], c[n][None])[0][0] - noise[g]) ** 2).mean() for n in members]).mean()
        losses.append(soft + br)
    torch.stack(losses).mean().backward()
    want = torch.stack([ref.a.grad, ref.b.grad, ref.d.grad])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_min_snr_weighting_scales_shared_and_branch_terms() -> None:
    unet = ToyUNet()
    _, _, _, noise, batch = _toy_batch(3)
    t_s, t_b = torch.tensor([700, 900]), torch.tensor([10, 20])
    const, tc = sage_loss(unet, ALPHAS, batch, SageLossConfig(branch_t=500), noise, t_s, t_b)
    snr, ts = sage_loss(unet, ALPHAS, batch, SageLossConfig(branch_t=500, weighting="min_snr", snr_gamma=5.0),
                        noise, t_s, t_b)
    assert ts["soft"] == pytest.approx(tc["soft"])
    assert ts["branch"] < tc["branch"]  # high SNR at t = 10, 20: weight gamma / SNR < 1


def test_timestep_ranges_include_branch_point() -> None:
    cfg = SageLossConfig(branch_t=700)
    t_s, t_b = sample_sage_timesteps(20000, cfg, torch.Generator().manual_seed(0))
    assert int(t_s.min()) == 700 and int(t_s.max()) == 999
    assert int(t_b.min()) == 0 and int(t_b.max()) == 700


def test_branch_timestep_follows_the_ddim_schedule() -> None:
    from sage_core.models import SD15_SCHEDULER_CONFIG

    t30 = branch_timestep(SD15_SCHEDULER_CONFIG, 30, 0.3)
    t0 = branch_timestep(SD15_SCHEDULER_CONFIG, 30, 0.0)
    assert t0 > t30 > branch_timestep(SD15_SCHEDULER_CONFIG, 30, 0.4) > 0
    assert branch_timestep(SD15_SCHEDULER_CONFIG, 30, 1.0) == 0
    # the timestep of schedule index k = round(share * steps): the first branch step, not the last shared one
    from sage_core.sampler import make_scheduler

    timesteps = make_scheduler(SD15_SCHEDULER_CONFIG, "ddim", 10).timesteps
    assert branch_timestep(SD15_SCHEDULER_CONFIG, 10, 0.37) == int(timesteps[4])
    assert branch_timestep(SD15_SCHEDULER_CONFIG, 10, 0.3) == int(timesteps[3])


def test_group_mean_and_standard_loss() -> None:
    x = torch.arange(10.0).reshape(5, 2)
    torch.testing.assert_close(group_mean(x, torch.tensor([0, 0, 1, 1, 1]), 2), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))
    unet = ToyUNet()
    _, z, c, _, batch = _toy_batch(4)
    noise = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([1, 100, 500, 900, 999])
    loss, _ = standard_loss(unet, ALPHAS, batch, SageLossConfig(), noise, t)
    want = torch.stack([((unet(ALPHAS[t[i]].sqrt() * z[i][None] + (1 - ALPHAS[t[i]]).sqrt() * noise[i][None],
                                t[i : i + 1], c[i][None])[0] - noise[i]) ** 2).mean() for i in range(5)]).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    # min-SNR weighting applies to Eq. 2 as well, each member at its own t
    cfg = SageLossConfig(weighting="min_snr", snr_gamma=5.0)
    weighted, _ = standard_loss(unet, ALPHAS, batch, cfg, noise, t)
    want = torch.stack([_weight(int(t[i]), cfg) * ((unet(ALPHAS[t[i]].sqrt() * z[i][None] + (1 - ALPHAS[t[i]]).sqrt()
                                                         * noise[i][None], t[i : i + 1], c[i][None])[0] - noise[i]) ** 2
                                                   ).mean() for i in range(5)]).mean()
    assert weighted.item() == pytest.approx(want.item(), rel=1e-6) and weighted.item() < loss.item()


def test_bad_loss_config() -> None:
    with pytest.raises(ValueError, match="branch_t"):
        SageLossConfig(branch_t=1000)
    with pytest.raises(ValueError, match="weighting"):
        SageLossConfig(weighting="snr")
    with pytest.raises(ValueError, match="lambda"):
        SageLossConfig(lambda1=-1)
