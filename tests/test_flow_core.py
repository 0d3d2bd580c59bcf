"""CondOT path, time samplers, CFM loss and the exact Gaussian target, including the CFM
claim: the conditional loss has the same parameter gradient as the marginal FM loss."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import Tensor, nn

from pipeline.flow import (
    TIME_SAMPLERS,
    CondOTPath,
    GaussianVelocity,
    LogitNormalTimeSampler,
    PathSample,
    TimeSampler,
    UniformTimeSampler,
    build_time_sampler,
    cfm_loss,
    cfm_loss_per_sample,
    conditional_velocity_variance_gaussian,
    expand_t_like,
    flow_map_gaussian,
    marginal_moments_gaussian,
    marginal_velocity_gaussian,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- CondOTPath


def test_path_endpoints_and_velocity_exact() -> None:
    g = gen(0)
    x_0 = torch.randn(4, 3, 5, 5, generator=g)
    x_1 = torch.randn(4, 3, 5, 5, generator=g)
    path = CondOTPath()
    at0 = path.sample(x_0, x_1, torch.zeros(4))
    at1 = path.sample(x_0, x_1, torch.ones(4))
    assert isinstance(at0, PathSample)
    assert torch.equal(at0.x_t, x_0) and torch.equal(at1.x_t, x_1)
    assert torch.equal(at0.dx_t, x_1 - x_0)


def test_path_interpolates_per_sample_time() -> None:
    g = gen(1)
    x_0 = torch.randn(3, 2, 4, generator=g, dtype=F64)
    x_1 = torch.randn(3, 2, 4, generator=g, dtype=F64)
    t = torch.tensor([0.0, 0.25, 0.9], dtype=F64)
    s = CondOTPath().sample(x_0, x_1, t)
    assert s.x_t.shape == x_0.shape and s.t is t
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(s.x_t[i], ti * x_1[i] + (1 - ti) * x_0[i])
    # dx_t is the time derivative of x_t: central finite difference in t.
    eps = 1e-6
    fd = CondOTPath().sample(x_0, x_1, t + eps).x_t - CondOTPath().sample(x_0, x_1, t - eps).x_t
    torch.testing.assert_close(fd / (2 * eps), s.dx_t)


def test_path_conversions_round_trip() -> None:
    g = gen(2)
    x_0, x_1 = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    t = torch.rand(5, generator=g, dtype=F64) * 0.8 + 0.1
    path = CondOTPath()
    s = path.sample(x_0, x_1, t)
    torch.testing.assert_close(path.velocity_to_x_1(s.dx_t, s.x_t, t), x_1)
    torch.testing.assert_close(path.velocity_to_x_0(s.dx_t, s.x_t, t), x_0)
    torch.testing.assert_close(path.x_1_to_velocity(x_1, s.x_t, t), s.dx_t)
    torch.testing.assert_close(path.x_0_to_velocity(x_0, s.x_t, t), s.dx_t)


@pytest.mark.parametrize(
    ("x_0_shape", "x_1_shape", "t_shape", "match"),
    [
        ((4, 3), (4, 2), (4,), "same shape"),
        ((4, 3), (4, 3), (3,), r"t must have shape \(B,\)"),
        ((4, 3), (4, 3), (4, 1), r"t must have shape \(B,\)"),
        ((4, 3), (4, 3), (), r"t must have shape \(B,\)"),
        ((), (), (1,), "batch dimension"),
    ],
)
def test_path_shape_errors(x_0_shape, x_1_shape, t_shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        CondOTPath().sample(torch.zeros(x_0_shape), torch.zeros(x_1_shape), torch.zeros(t_shape))


def test_expand_t_like() -> None:
    x = torch.zeros(3, 2, 4, 4)
    assert expand_t_like(torch.arange(3.0), x).shape == (3, 1, 1, 1)
    assert expand_t_like(torch.tensor(0.5), x).shape == ()
    with pytest.raises(ValueError, match="batch dimension"):
        expand_t_like(torch.arange(2.0), x)


# ---------------------------------------------------------------- time samplers

N_T = 100_000


def test_uniform_sampler_moments_and_range() -> None:
    t = UniformTimeSampler().sample(N_T, generator=gen(0)).double()
    assert t.shape == (N_T,) and t.min() >= 0 and t.max() <= 1
    # Standard errors: sqrt(1/12 / N) for the mean, sqrt(1/180 / N) for the variance
    # (Var[(U - 1/2)^2] = 1/80 - 1/144 = 1/180). Allow 5 of each.
    assert abs(t.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / N_T)
    assert abs(t.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / N_T)


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)])
def test_logit_normal_sampler_distribution(mean: float, std: float) -> None:
    t = LogitNormalTimeSampler(mean, std).sample(20_000, generator=gen(3)).double()
    assert t.shape == (20_000,) and t.min() > 0 and t.max() < 1
    logit = torch.logit(t).numpy()
    assert stats.kstest(logit, "norm", args=(mean, std)).pvalue > 0.01
    # Sanity check that the test can fail: the wrong std is rejected decisively.
    assert stats.kstest(logit, "norm", args=(mean, 1.5 * std)).pvalue < 1e-6


@pytest.mark.parametrize("name", TIME_SAMPLERS)
def test_samplers_reproducible_and_device(name: str) -> None:
    sampler = build_time_sampler(name, mean=0.3, std=0.7)
    assert isinstance(sampler, TimeSampler)
    a = sampler.sample(1000, generator=gen(7))
    b = sampler.sample(1000, generator=gen(7), device="cpu")
    c = sampler.sample(1000, generator=gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert b.device.type == "cpu"
    assert sampler.sample(0).shape == (0,)
    with pytest.raises(ValueError, match="non-negative int"):
        sampler.sample(-1)


def test_build_time_sampler() -> None:
    assert isinstance(build_time_sampler("uniform"), UniformTimeSampler)
    ln = build_time_sampler("logit_normal", mean=0.2, std=1.3)
    assert isinstance(ln, LogitNormalTimeSampler) and (ln.mean, ln.std) == (0.2, 1.3)
    with pytest.raises(ValueError, match="'uniform', 'logit_normal'"):
        build_time_sampler("beta")
    with pytest.raises(ValueError, match="std"):
        LogitNormalTimeSampler(0.0, 0.0)


# ---------------------------------------------------------------- loss


def test_cfm_loss_values_and_shapes() -> None:
    g = gen(4)
    x_0, x_1 = torch.randn(6, 2, 3, generator=g, dtype=F64), torch.randn(6, 2, 3, generator=g)
    x_1 = x_1.double()
    v = torch.randn(6, 2, 3, generator=g).double()
    per = cfm_loss_per_sample(v, x_0, x_1)
    assert per.shape == (6,)
    manual = ((v - (x_1 - x_0)) ** 2).reshape(6, -1).mean(1)
    torch.testing.assert_close(per, manual)
    torch.testing.assert_close(cfm_loss(v, x_0, x_1), manual.mean())
    assert cfm_loss(x_1 - x_0, x_0, x_1).item() == 0.0
    with pytest.raises(ValueError, match="share one shape"):
        cfm_loss(v[:, :1], x_0, x_1)


# ---------------------------------------------------------------- exact Gaussian target

MU = torch.tensor([2.0, -1.0], dtype=F64)
SIGMA = 0.5


def test_marginal_velocity_endpoints_and_flow_derivative() -> None:
    x = torch.randn(7, 2, generator=gen(5), dtype=F64)
    # u_0(x) = E[x_1] - x_0 and u_1(x) = x_1 - E[x_0] = x.
    torch.testing.assert_close(marginal_velocity_gaussian(x, 0.0, MU, SIGMA), MU - x)
    torch.testing.assert_close(marginal_velocity_gaussian(x, 1.0, MU, SIGMA), x)
    # The flow map solves the ODE: d/dt psi_t(x_0) = u_t(psi_t(x_0)) (central differences).
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.85, 0.95, 0.99], dtype=F64)
    eps = 1e-6
    fd = flow_map_gaussian(x, t + eps, MU, SIGMA) - flow_map_gaussian(x, t - eps, MU, SIGMA)
    u = marginal_velocity_gaussian(flow_map_gaussian(x, t, MU, SIGMA), t, MU, SIGMA)
    torch.testing.assert_close(fd / (2 * eps), u, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flow_map_gaussian(x, 1.0, MU, SIGMA), MU + SIGMA * x)


def test_marginal_moments_match_path_samples() -> None:
    g = gen(6)
    n, t = 200_000, 0.3
    x_0 = torch.randn(n, 2, generator=g, dtype=F64)
    x_1 = MU + SIGMA * torch.randn(n, 2, generator=g, dtype=F64)
    x_t = CondOTPath().sample(x_0, x_1, torch.full((n,), t, dtype=F64)).x_t
    mean_t, var_t = marginal_moments_gaussian(torch.tensor(t, dtype=F64), MU, SIGMA)
    sd = var_t.sqrt().item()
    assert (x_t.mean(0) - mean_t).abs().max() < 5 * sd / math.sqrt(n)
    assert (x_t.var(0) - var_t).abs().max() < 5 * var_t * math.sqrt(2 / n)


def test_gaussian_velocity_module() -> None:
    model = GaussianVelocity(MU, SIGMA)
    assert list(model.parameters()) == [] and {n for n, _ in model.named_buffers()} == {
        "mu",
        "sigma",
    }
    x = torch.randn(9, 2, generator=gen(8))  # float32 input
    t = torch.rand(9, generator=gen(9))
    out = model(x, t, label=torch.zeros(9, dtype=torch.long))
    assert out.dtype == torch.float32 and out.shape == (9, 2)
    torch.testing.assert_close(out, marginal_velocity_gaussian(x, t, MU.float(), SIGMA))
    x_1 = model.sample_data(50_000, generator=gen(10), dtype=F64)
    assert x_1.shape == (50_000, 2)
    assert (x_1.mean(0) - MU).abs().max() < 5 * SIGMA / math.sqrt(50_000)
    with pytest.raises(ValueError, match="sigma"):
        GaussianVelocity(MU, 0.0)
    with pytest.raises(ValueError, match="per-sample shape"):
        marginal_velocity_gaussian(torch.zeros(3, 4), 0.5, MU, SIGMA)


class AffineTimeModel(nn.Module):
    """v(x, t) = sum_k t^k (W_k x + b_k): affine in x, polynomial in t (K features)."""

    def __init__(self, dim: int, k: int, generator: torch.Generator) -> None:
        super().__init__()
        self.W = nn.Parameter(0.5 * torch.randn(k, dim, dim, generator=generator, dtype=F64))
        self.b = nn.Parameter(0.5 * torch.randn(k, dim, generator=generator, dtype=F64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        phi = torch.stack([t**i for i in range(self.W.shape[0])], dim=-1)  # (B, K)
        weight = torch.einsum("bk,kij->bij", phi, self.W)
        return torch.einsum("bij,bj->bi", weight, x) + phi @ self.b


def _flat_grad(loss: Tensor, model: nn.Module) -> Tensor:
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    return torch.cat([g.flatten() for g in grads])


def test_cfm_gradient_equals_marginal_fm_gradient() -> None:
    """The CFM claim on a Gaussian target: E[grad L_CFM] = grad L_FM.

    Both losses are evaluated on the SAME draws (x_0, x_1, t) -> x_t, so their difference is
    only the target: x_1 - x_0 (conditional) vs u_t(x_t) (exact marginal velocity).
    """
    n = 200_000
    g = gen(11)
    model = AffineTimeModel(dim=2, k=3, generator=g)
    x_0 = torch.randn(n, 2, generator=g, dtype=F64)
    x_1 = MU + SIGMA * torch.randn(n, 2, generator=g, dtype=F64)
    t = UniformTimeSampler().sample(n, generator=g).double()
    s = CondOTPath().sample(x_0, x_1, t)
    v = model(s.x_t, t)
    u = marginal_velocity_gaussian(s.x_t, t, MU, SIGMA)

    loss_cfm = cfm_loss(v, x_0, x_1)
    loss_fm = (v - u).square().mean()
    g_cfm, g_fm = _flat_grad(loss_cfm, model), _flat_grad(loss_fm, model)

    # The gradients differ by -2 E[grad v . (dx_t - u_t)], zero in expectation; its MC error
    # is O(1/sqrt(n)) ~ 2e-3 relative to gradients of norm O(1) at this random init, so a
    # 0.02 tolerance leaves a 10x margin.
    rel = ((g_cfm - g_fm).norm() / g_fm.norm()).item()
    cos = torch.nn.functional.cosine_similarity(g_cfm, g_fm, dim=0).item()
    assert rel < 0.02, rel
    assert cos > 0.999, cos

    # Not a trivial comparison: the losses differ by E Var[x_1 - x_0 | x_t] = sigma^2 / var_t
    # (averaged over the same t), which is a constant in the parameters.
    gap = (cfm_loss_per_sample(v, x_0, x_1) - (v - u).square().mean(1)).detach()
    expected_gap = conditional_velocity_variance_gaussian(t, SIGMA).mean().item()
    assert expected_gap > 0.5
    assert abs(gap.mean().item() - expected_gap) < 5 * gap.std().item() / math.sqrt(n)
    assert loss_cfm.item() > loss_fm.item() + 0.5

    # And the tolerance is discriminating: a marginal velocity for a slightly wrong mean gives
    # a gradient that fails the same check.
    u_wrong = marginal_velocity_gaussian(s.x_t, t, MU + 0.2, SIGMA)
    g_wrong = _flat_grad((v - u_wrong).square().mean(), model)
    assert ((g_cfm - g_wrong).norm() / g_wrong.norm()).item() > 0.02
