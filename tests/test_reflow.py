"""Reflow (issue 16): retraining a flow on its own couplings straightens it (2-D, CPU)."""

from __future__ import annotations

import pytest
import torch

from jobs._common import packaged_defaults
from pipeline.config import build_config
from pipeline.data.toy import toy_sampler
from pipeline.eval.metrics import sliced_wasserstein2
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


def test_reflow_straightens_the_flow_and_its_one_step_samples_reach_the_target():
    """Normal -> two moons, 1-reflow on 10k pairs of the base's 32-step Euler map. Measured
    here (seeds below): straightness S 1.026 -> 0.002; sliced W2 to the moons at 1 / 2 / 4 /
    64 Euler steps, base 1.086 / 0.559 / 0.363 / 0.227, reflowed 0.250 / 0.238 / 0.234 /
    0.230: one step of the reflowed flow is about as good as 64 of the base."""
    base = train_toy(_toy_cfg(150_000, 1e-3), log=lambda _: None).model
    reflowed, (x_0, x_1) = reflow_toy(
        base, _toy_cfg(100_000, 5e-4), num_pairs=10_000, seed=3, steps=32, log=lambda _: None
    )
    # the pairs are the base flow's own map of the seeded noise
    again = toy_sampler("normal")(10_000, torch.Generator().manual_seed(3))
    assert torch.equal(x_0, again)
    assert torch.equal(x_1, couple_by_flow(lambda x, t: base(x, t), x_0, steps=32))

    probe = toy_sampler("normal")(3000, torch.Generator().manual_seed(11))
    s_base = straightness(lambda x, t: base(x, t), probe)
    s_reflow = straightness(lambda x, t: reflowed.model(x, t), probe)
    assert s_reflow < 0.1 * s_base, (s_reflow, s_base)

    target = toy_sampler("moons")(3000, torch.Generator().manual_seed(7))
    cfg = _toy_cfg(1, 1e-3)

    def w2(model, steps):
        return sliced_wasserstein2(sample_toy(model, cfg, 3000, 1, "euler", steps).x_1, target)

    base_1, reflow_1, base_many = w2(base, 1), w2(reflowed.model, 1), w2(base, 64)
    assert reflow_1 < 0.5 * base_1, (reflow_1, base_1)
    assert reflow_1 < 2.0 * base_many, (reflow_1, base_many)  # near the base's many-step
