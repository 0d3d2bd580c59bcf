"""Reflow (issue 16): retraining a flow on its own couplings straightens it (2-D, CPU)."""

from __future__ import annotations

import pytest
import torch

from jobs._common import packaged_defaults
from pipeline.config import build_config
from pipeline.data.toy import toy_sampler
from pipeline.eval.metrics import sliced_wasserstein2
from pipeline.flow.distill import (
    distill_loss_per_sample,
    grid_times,
    pseudo_huber_c,
    rollout_states,
)
from pipeline.flow.reflow import couple_by_flow, straightness
from pipeline.toy2d import reflow_toy, sample_toy, train_toy


def _toy_cfg(images: int, lr: float):
    return build_config(
        packaged_defaults("toy"),
        [f"train.total_images={images}", "train.warmup_images=5000", "data.batch_size=256",
         f"train.lr={lr}"],
    )  # fmt: skip


def test_straightness_is_zero_for_a_constant_field_and_positive_for_a_curved_one():
    x_0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    assert straightness(lambda x, t: torch.ones_like(x), x_0, steps=8) == pytest.approx(0.0)
    # v = (-y, x): circles; the displacement is a chord, the velocity its tangent
    rotating = straightness(lambda x, t: torch.stack([-x[:, 1], x[:, 0]], 1), x_0, steps=32)
    assert rotating > 0.1
    with pytest.raises(ValueError, match="steps >= 1"):
        straightness(lambda x, t: x, x_0, steps=0)


@pytest.fixture(scope="module")
def flows():
    """The base flow (normal -> moons) and its 1-reflow on 10k pairs of its 32-step map."""
    base = train_toy(_toy_cfg(150_000, 1e-3), log=lambda _: None).model
    reflowed, pairs = reflow_toy(
        base, _toy_cfg(100_000, 5e-4), num_pairs=10_000, seed=3, steps=32, log=lambda _: None
    )
    return base, reflowed.model, pairs


def _w2(model, steps: int) -> float:
    target = toy_sampler("moons")(3000, torch.Generator().manual_seed(7))
    cfg = _toy_cfg(1, 1e-3)
    return sliced_wasserstein2(sample_toy(model, cfg, 3000, 1, "euler", steps).x_1, target)


def test_reflow_straightens_the_flow_and_its_one_step_samples_reach_the_target(flows):
    """Normal -> two moons, 1-reflow on 10k pairs of the base's 32-step Euler map. Measured
    here (seeds below): straightness S 1.026 -> 0.002; sliced W2 to the moons at 1 / 2 / 4 /
    64 Euler steps, base 1.086 / 0.559 / 0.363 / 0.227, reflowed 0.250 / 0.238 / 0.234 /
    0.230: one step of the reflowed flow is about as good as 64 of the base."""
    base, reflowed, (x_0, x_1) = flows
    # the pairs are the base flow's own map of the seeded noise
    again = toy_sampler("normal")(10_000, torch.Generator().manual_seed(3))
    assert torch.equal(x_0, again)
    assert torch.equal(x_1, couple_by_flow(lambda x, t: base(x, t), x_0, steps=32))

    probe = toy_sampler("normal")(3000, torch.Generator().manual_seed(11))
    s_base = straightness(lambda x, t: base(x, t), probe)
    s_reflow = straightness(lambda x, t: reflowed(x, t), probe)
    assert s_reflow < 0.1 * s_base, (s_reflow, s_base)

    base_1, reflow_1, base_many = _w2(base, 1), _w2(reflowed, 1), _w2(base, 64)
    assert reflow_1 < 0.5 * base_1, (reflow_1, base_1)
    assert reflow_1 < 2.0 * base_many, (reflow_1, base_many)  # near the base's many-step


def test_a_one_step_student_distilled_from_the_reflowed_pairs_lands_on_the_target(flows):
    """k = 1 distillation (L2) of the reflowed flow's own 32-step pairs. Measured here, 1-step
    (or k-step) sliced W2, student of the reflowed flow / of the base (on the base's pairs):
    L2 k=1 0.229 / 0.226, k=2 0.229 / 0.226; pseudo-Huber k=1 0.231 / 0.232, k=2 0.231 / 0.226
    (the base's 64-step: 0.227; the reflowed flow's 1-step: 0.250). In 2-D L2 does as well
    as pseudo-Huber, whose scale c = 0.00054 sqrt(2) makes it nearly L1 here."""
    _, reflowed, (x_0, _) = flows
    x_1 = couple_by_flow(lambda x, t: reflowed(x, t), x_0, steps=32)
    student = train_toy(
        _toy_cfg(100_000, 5e-4), log=lambda _: None, pairs=(x_0, x_1), init=reflowed,
        distill_steps=1, distill_loss="l2",
    ).model  # fmt: skip
    assert _w2(student, 1) < _w2(reflowed, 1)
    with pytest.raises(ValueError, match="give pairs"):
        train_toy(_toy_cfg(1000, 1e-3), log=lambda _: None, distill_steps=1)


def test_rollout_states_are_the_students_own_euler_states_up_to_each_rows_time():
    """distill_states=rollout: row i starts its jump from where s_i K Euler jumps of the
    student took x_0[i]; each jump is asked only of the rows not yet at their time, with
    their row indices (so a caller picks their labels); the landing from such a state is
    scored against x_1 as from any other."""
    gen = torch.Generator().manual_seed(0)
    x_0 = torch.randn(5, 3, generator=gen)
    s = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.5])
    label = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0])
    asked: list[list[int]] = []

    def velocity(x, t, rows):
        asked.append(rows.tolist())
        return -x + t[:, None] + label[rows][:, None]

    got = rollout_states(velocity, x_0, s, steps=4)
    for i in range(5):  # plain Euler, one row at a time
        x = x_0[i].clone()
        for j in range(round(float(s[i]) * 4)):
            x = x + (-x + j / 4 + label[i]) / 4
        assert torch.allclose(got[i], x, atol=1e-6), i
    assert asked == [[1, 2, 3, 4], [2, 3, 4], [3]]
    assert torch.equal(got[0], x_0[0])  # s = 0: the noise itself
    # a velocity that lands on x_1 from the rollout state scores zero
    x_1 = torch.randn(5, 3, generator=gen)
    exact = (x_1 - got) / (1 - s)[:, None]
    assert distill_loss_per_sample(exact, got, x_1, s, "l2").abs().max() < 1e-10


def test_an_unrolled_student_is_trained_on_its_whole_samplers_final_miss():
    """distill_states=unrolled: every row at the last grid time, from the student's own
    earlier jumps with the gradient through them: the loss and its gradient are those of the
    K-step Euler sampler's output against x_1; rollout gives the same loss but no gradient
    through the earlier jumps."""
    from pipeline.train.objective import Objective, velocity_on_rows

    class Field(torch.nn.Module):  # v(x, t) = W x + t b
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.eye(3) + 0.3)
            self.b = torch.nn.Parameter(torch.ones(3))

        def forward(self, x, t, label):
            return x @ self.w + t[:, None] * self.b

    gen = torch.Generator().manual_seed(2)
    x_0, x_1 = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)

    def gradient(states: str) -> tuple[float, torch.Tensor]:
        net = Field()
        objective = Objective("distill", 3, "l2", states)
        t = torch.full((6,), 2 / 3)  # rollout's rows, too, at the last grid time
        assert states == "rollout" or torch.equal(objective.times(torch.rand(6)), t)
        x_t = objective.states(x_0, x_1, t, velocity_on_rows(net, None))
        loss = objective.per_sample(net(x_t, t, None), x_0, x_1, x_t, t).mean()
        loss.backward()
        return loss.item(), net.w.grad

    net = Field()
    x = x_0
    for j in range(3):  # the sampler itself, differentiated end to end
        x = x + net(x, torch.full((6,), j / 3), None) / 3
    expected = (x - x_1).square().mean(dim=1).mean()
    expected.backward()
    loss, grad = gradient("unrolled")
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(grad, net.w.grad, atol=1e-6)
    loss_rollout, grad_rollout = gradient("rollout")
    assert loss_rollout == pytest.approx(loss, rel=1e-6)
    assert not torch.allclose(grad_rollout, net.w.grad, atol=1e-3)  # its last jump's only


def test_distillation_loss_lands_on_x_1_at_grid_times():
    x_0, x_1 = torch.zeros(2, 3), torch.ones(2, 3)
    s = grid_times(torch.tensor([0.3, 0.7]), 2)
    assert s.tolist() == [0.0, 0.5]
    x_s = s[:, None] * x_1 + (1 - s[:, None]) * x_0  # on the pair path
    exact = x_1 - x_0  # the straight velocity lands exactly
    for loss in ("l2", "pseudo_huber"):
        assert distill_loss_per_sample(exact, x_s, x_1, s, loss).abs().max() < 1e-7
    off = exact + 1.0  # misses by (1 - s) per element
    assert distill_loss_per_sample(off, x_s, x_1, s, "l2").tolist() == pytest.approx([1.0, 0.25])
    c = pseudo_huber_c(3)
    expected = [(3 * m**2 + c * c) ** 0.5 - c for m in (1.0, 0.5)]
    got = distill_loss_per_sample(off, x_s, x_1, s, "pseudo_huber").tolist()
    assert got == pytest.approx(expected)
    assert grid_times(torch.tensor([1.0]), 4).item() == 0.75  # t = 1 stays on the grid
