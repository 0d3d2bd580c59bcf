"""Pairing: per-sample noise and time from (seed, epoch, key), and minibatch OT coupling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.config import build_config
from pipeline.data.coupling import (
    PairingStage,
    couple,
    draw_noise_and_time,
    noise_to_float,
    ot_permutation,
    sample_seed,
)
from pipeline.flow.time_samplers import build_time_sampler

KEYS = [f"{i:06d}" for i in range(64)]


def _batch(keys: list[str], shape=(1, 4, 4), labels=None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = len(keys)
    return {
        "x_1": rng.uniform(-1, 1, size=(n, *shape)).astype(np.float32),
        "label": np.asarray(labels if labels is not None else [-1] * n, dtype=np.int64),
        "key": np.array(keys, dtype=object),
    }


def _mean_sq(x_1, x_0) -> float:
    return float(((torch.as_tensor(x_1) - torch.as_tensor(x_0)) ** 2).flatten(1).sum(1).mean())


def test_sample_seed_is_stable_and_separates_streams():
    assert sample_seed(0, 1, "k") == sample_seed(0, 1, "k")
    assert 0 <= sample_seed(0, 1, "k") < 2**63
    seeds = {
        sample_seed(0, 1, "k"),
        sample_seed(1, 1, "k"),
        sample_seed(0, 2, "k"),
        sample_seed(0, 1, "j"),
        sample_seed(0, 1, "k", stream="flip"),
    }
    assert len(seeds) == 5


def test_noise_depends_on_key_not_on_batch_composition():
    sampler = build_time_sampler("uniform")
    x_0, t = draw_noise_and_time(KEYS[:8], (1, 4, 4), seed=3, epoch=0, time_sampler=sampler)
    again, t_again = draw_noise_and_time(
        [KEYS[5], KEYS[2]], (1, 4, 4), seed=3, epoch=0, time_sampler=sampler
    )
    torch.testing.assert_close(again, x_0[[5, 2]], rtol=0, atol=0)
    torch.testing.assert_close(t_again, t[[5, 2]], rtol=0, atol=0)
    assert x_0.dtype == torch.float32 and x_0.shape == (8, 1, 4, 4) and t.shape == (8,)
    # the noise does not change with the time sampler (x_0 is drawn first)
    other, _ = draw_noise_and_time(
        KEYS[:8], (1, 4, 4), 3, 0, build_time_sampler("logit_normal", 0.5, 2.0)
    )
    torch.testing.assert_close(other, x_0, rtol=0, atol=0)


def test_pairing_stage_reproducible_for_seed_and_different_for_another():
    batch = _batch(KEYS[:16])
    cfg = build_config(overrides=["seed=7"])
    a = PairingStage.from_config(cfg, epoch=0)(dict(batch))
    b = PairingStage.from_config(cfg, epoch=0)(dict(batch))
    np.testing.assert_array_equal(a["x_0"], b["x_0"])
    np.testing.assert_array_equal(a["t"], b["t"])
    assert a["x_0"].dtype == np.float32 and a["x_0"].shape == batch["x_1"].shape
    assert a["t"].dtype == np.float32 and a["t"].shape == (16,)
    np.testing.assert_array_equal(a["x_1"], batch["x_1"])  # data untouched
    c = PairingStage.from_config(build_config(overrides=["seed=8"]), epoch=0)(dict(batch))
    d = PairingStage.from_config(cfg, epoch=1)(dict(batch))
    assert not np.allclose(a["x_0"], c["x_0"]) and not np.allclose(a["t"], c["t"])
    assert not np.allclose(a["x_0"], d["x_0"])


def test_pairing_stage_takes_each_rows_epoch_column():
    batch = _batch(KEYS[:12])
    cfg = build_config(overrides=["seed=7"])
    epochs = np.array([3, 5] * 6, dtype=np.int64)  # mixed: each row its own epoch
    mixed = PairingStage.from_config(cfg, epoch=0)({**batch, "epoch": epochs})
    for epoch in (3, 5):
        alone = PairingStage.from_config(cfg, epoch=epoch)(dict(batch))
        rows = epochs == epoch
        np.testing.assert_array_equal(mixed["x_0"][rows], alone["x_0"][rows])
        np.testing.assert_array_equal(mixed["t"][rows], alone["t"][rows])
    one = PairingStage.from_config(cfg, epoch=0)({**batch, "epoch": np.full(12, 5)})
    np.testing.assert_array_equal(
        one["x_0"], PairingStage.from_config(cfg, epoch=5)(dict(batch))["x_0"]
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_noise_storage_dtype(dtype):
    batch = _batch(KEYS[:8])
    full = PairingStage(seed=0, epoch=0)(dict(batch))["x_0"]
    stored = PairingStage(seed=0, epoch=0, noise_dtype=dtype)(dict(batch))["x_0"]
    assert stored.dtype == (np.float16 if dtype == "float16" else np.int16)
    restored = noise_to_float(torch.as_tensor(stored))
    assert restored.dtype == torch.float32
    # float16 keeps 11 significant bits, bfloat16 8
    rel = 2.0**-11 if dtype == "float16" else 2.0**-8
    torch.testing.assert_close(restored, torch.as_tensor(full), rtol=rel, atol=1e-4)


def test_ot_permutation_is_a_permutation_and_optimal():
    g = torch.Generator().manual_seed(0)
    x_1 = torch.randn(6, 3, generator=g) + 2.0
    x_0 = torch.randn(6, 3, generator=g)
    perm = ot_permutation(x_1, x_0)
    assert perm.dtype == torch.long
    assert torch.equal(perm.sort().values, torch.arange(6))
    best = min(
        _mean_sq(x_1, x_0[list(p)]) for p in itertools.permutations(range(6))
    )  # brute force over all 720 pairings
    assert _mean_sq(x_1, x_0[perm]) == pytest.approx(best, rel=1e-9)


def test_ot_lowers_transport_cost_vs_independent():
    g = torch.Generator().manual_seed(1)
    x_1 = torch.rand(128, 1, 8, 8, generator=g) * 2 - 1
    x_0 = torch.randn(128, 1, 8, 8, generator=g)
    paired = couple(x_1, x_0, method="ot")
    assert torch.equal(couple(x_1, x_0, method="independent"), x_0)
    assert _mean_sq(x_1, paired) < 0.95 * _mean_sq(x_1, x_0)
    # same noise rows, reordered: nothing duplicated or dropped
    assert torch.equal(paired.flatten(1).sort(dim=0).values, x_0.flatten(1).sort(dim=0).values)


def test_per_class_ot_keeps_classes():
    g = torch.Generator().manual_seed(2)
    label = torch.randint(0, 4, (96,), generator=g)
    label[:5] = -1  # unlabelled rows form their own group
    x_1 = torch.randn(96, 16, generator=g) + label[:, None].float()
    x_0 = torch.randn(96, 16, generator=g)
    perm = ot_permutation(x_1, x_0, label, per_class=True)
    assert torch.equal(perm.sort().values, torch.arange(96))
    assert torch.equal(label[perm], label)
    global_perm = ot_permutation(x_1, x_0)
    assert not torch.equal(label[global_perm], label)  # the constraint matters here
    assert _mean_sq(x_1, x_0[perm]) < _mean_sq(x_1, x_0)
    assert _mean_sq(x_1, x_0[global_perm]) <= _mean_sq(x_1, x_0[perm]) + 1e-9


def test_couple_accepts_half_noise_and_rejects_unknown_method():
    x_1 = torch.randn(16, 4)
    x_0 = torch.randn(16, 4).to(torch.float16)
    out = couple(x_1, x_0, method="ot")
    assert out.dtype == torch.float16
    assert torch.equal(out.float().sort(dim=0).values, x_0.float().sort(dim=0).values)
    with pytest.raises(ValueError, match="unknown coupling"):
        couple(x_1, x_0, method="sinkhorn")
    with pytest.raises(ValueError, match="unknown coupling"):
        PairingStage(seed=0, epoch=0, coupling="sinkhorn")


def test_pairing_stage_ot_within_its_batch():
    labels = [i % 3 for i in range(30)]
    batch = _batch(KEYS[:30], labels=labels)
    plain = PairingStage(seed=0, epoch=0, coupling="ot")(dict(batch))  # not applied
    coupled = PairingStage(seed=0, epoch=0, coupling="ot", apply_coupling=True)(dict(batch))
    per_class = PairingStage(seed=0, epoch=0, coupling="ot", per_class=True, apply_coupling=True)(
        dict(batch)
    )
    np.testing.assert_array_equal(plain["t"], coupled["t"])  # t stays with x_1
    for out in (coupled, per_class):
        np.testing.assert_array_equal(
            np.sort(out["x_0"].reshape(30, -1), axis=0),
            np.sort(plain["x_0"].reshape(30, -1), axis=0),
        )
        assert _mean_sq(batch["x_1"], out["x_0"]) < _mean_sq(batch["x_1"], plain["x_0"])
    # per-class: each noise row comes from a row of the same class
    rows = {plain["x_0"][i].tobytes(): labels[i] for i in range(30)}
    assert [rows[per_class["x_0"][i].tobytes()] for i in range(30)] == labels


@pytest.mark.parametrize(
    ("sampler", "mean", "std"), [("uniform", 0.0, 1.0), ("logit_normal", 0.3, 0.8)]
)
def test_t_follows_configured_distribution(sampler, mean, std):
    cfg = build_config(
        overrides=[
            "seed=11",
            f"flow.time_sampler={sampler}",
            f"flow.logit_normal_mean={mean}",
            f"flow.logit_normal_std={std}",
        ]
    )
    keys = [f"{i:07d}" for i in range(4000)]
    t = PairingStage.from_config(cfg, epoch=0)(_batch(keys, shape=(1, 1, 1)))["t"]
    assert t.min() >= 0.0 and t.max() <= 1.0
    if sampler == "uniform":
        result = stats.kstest(t, "uniform")
    else:
        logit = np.log(t) - np.log1p(-t)
        result = stats.kstest(logit, "norm", args=(mean, std))
    assert result.pvalue > 0.01, result
    # and the noise is standard normal
    x_0 = PairingStage.from_config(cfg, epoch=0)(_batch(keys, shape=(1, 1, 1)))["x_0"]
    assert stats.kstest(x_0.ravel(), "norm").pvalue > 0.01
