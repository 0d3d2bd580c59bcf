"""Benchmark of the 2-D example: sample quality per solver against the data's own noise.

Baseline: the sliced W2 distance between two independent draws of the data (the floor a
perfect model reaches at this sample size). Each solver's figure is the sliced W2 between
its samples and a fresh data draw, printed with its ratio to that floor.
"""

from __future__ import annotations

import platform

import torch

from pipeline.config import Config
from pipeline.data.toy import toy_sampler
from pipeline.eval.metrics import sliced_wasserstein2
from pipeline.toy2d import sample_toy, train_toy

SOLVER_SETTINGS: tuple[tuple[str, int | None], ...] = (
    ("euler", 4),
    ("euler", 8),
    ("euler", 32),
    ("dopri5", None),
)


def run_toy_benchmark(cfg: Config, num_samples: int = 10_000, log=print) -> dict[str, float]:
    result = train_toy(cfg, log=lambda _: None)
    target = toy_sampler(cfg.toy.target)
    data_a = target(num_samples, torch.Generator().manual_seed(cfg.seed + 100))
    data_b = target(num_samples, torch.Generator().manual_seed(cfg.seed + 101))
    floor = sliced_wasserstein2(data_a, data_b)
    figures = {"train_seconds": result.wall_seconds, "data_vs_data": floor}
    log(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads")
    log(f"trained {result.images_seen:,} images in {result.wall_seconds:.1f} s")
    log(f"{'setting':<12} {'NFE':>5} {'SW2':>8} {'ratio':>7}")
    log(f"{'data vs data':<12} {'-':>5} {floor:8.4f} {1.0:7.2f}  (baseline)")
    for solver, steps in SOLVER_SETTINGS:
        solution = sample_toy(
            result.model, cfg, num_samples, seed=cfg.seed + 1, solver=solver, steps=steps
        )
        sw2 = sliced_wasserstein2(solution.x_1, data_a)
        name = f"{solver} {steps}" if steps else solver
        figures[name] = sw2
        log(f"{name:<12} {solution.nfe:>5} {sw2:8.4f} {sw2 / floor:7.2f}")
    return figures
