"""The 2-D example: learn a flow from a 2-D source to a 2-D target with plain PyTorch.

It exercises the flow core (path, time sampler, CFM loss, solvers) and the MLP end to end
on CPU in well under a minute, and draws samples and trajectories to a PNG.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.data.toy import toy_sampler
from pipeline.flow import ODESolution, build_time_sampler, solve_ode
from pipeline.flow.solvers import effective_steps
from pipeline.models import build_model
from pipeline.optim import lr_factor
from pipeline.train.objective import Objective


@dataclass
class ToyTrainResult:
    model: torch.nn.Module
    losses: list[float]  # mean loss per logging window
    images_seen: int
    wall_seconds: float


def train_toy(
    cfg: Config,
    log=print,
    *,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    init: torch.nn.Module | None = None,
    distill_steps: int = 0,
    distill_loss: str = "l2",
    distill_states: str | None = None,
) -> ToyTrainResult:
    """Minimise the CFM loss for ``cfg.train.total_images`` points.

    Without ``pairs``: fresh independent ``(x_0, x_1)`` draws each step. With ``pairs``
    ``(x_0, x_1)`` (N, 2) each: reflow, minibatches of those fixed pairs (rows drawn by the
    seeded generator), the pairing never redrawn (:mod:`pipeline.flow.reflow`). ``init``:
    start from that model's weights (reflow starts from the base flow) instead of fresh ones.
    ``distill_steps`` k > 0 (with ``pairs``): train a k-step student instead, at the grid
    times with ``distill_loss`` from ``distill_states`` (default ``train.distill_states``;
    :mod:`pipeline.flow.distill`).
    """
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    source, target = toy_sampler(cfg.toy.source), toy_sampler(cfg.toy.target)
    model = build_model(cfg.model, (2,))
    if init is not None:
        model.load_state_dict(init.state_dict())
    if distill_steps and pairs is None:
        raise ValueError("distillation trains on a flow's own pairs: give pairs")
    if pairs is not None and not (pairs[0].shape == pairs[1].shape and pairs[0].ndim == 2):
        raise ValueError(
            f"pairs must be two (N, 2) tensors, got {tuple(pairs[0].shape)} and "
            f"{tuple(pairs[1].shape)}"
        )
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.train.lr,
        betas=cfg.train.adam_betas,
        weight_decay=cfg.train.weight_decay,
    )
    objective = (
        Objective(
            "distill", distill_steps, distill_loss, distill_states or cfg.train.distill_states
        )
        if distill_steps
        else Objective()
    )
    time_sampler = build_time_sampler(
        cfg.flow.time_sampler, cfg.flow.logit_normal_mean, cfg.flow.logit_normal_std
    )
    batch = cfg.data.batch_size
    steps = math.ceil(cfg.train.total_images / batch)
    losses: list[float] = []
    window: list[float] = []
    images_seen = 0
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.lr * lr_factor(
                images_seen, cfg.train.total_images, cfg.train.warmup_images, cfg.train.lr_schedule
            )
        if pairs is None:
            x_0 = source(batch, generator)
            x_1 = target(batch, generator)
        else:
            rows = torch.randint(len(pairs[0]), (batch,), generator=generator)
            x_0, x_1 = pairs[0][rows], pairs[1][rows]
        t = objective.times(time_sampler.sample(batch, generator=generator))
        x_t = objective.states(x_0, x_1, t, lambda x, s, _rows: model(x, s))
        loss = objective.per_sample(model(x_t, t), x_0, x_1, x_t, t).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        images_seen += batch
        window.append(loss.item())
        if (step + 1) % cfg.train.log_every_steps == 0 or step + 1 == steps:
            losses.append(sum(window) / len(window))
            window.clear()
            log(f"step {step + 1}/{steps}  images {images_seen:,}  loss {losses[-1]:.4f}")
    return ToyTrainResult(model.eval(), losses, images_seen, time.perf_counter() - start)


def reflow_toy(
    base: torch.nn.Module, cfg: Config, num_pairs: int, seed: int, steps: int = 64, log=print
) -> tuple[ToyTrainResult, tuple[torch.Tensor, torch.Tensor]]:
    """1-reflow of ``base``: ``num_pairs`` noises (seeded by ``seed``) carried to t = 1 by
    ``steps`` Euler steps of ``base``, then :func:`train_toy` on those pairs from ``base``'s
    weights. Returns the result and the pairs ``(x_0, x_1)``."""
    from pipeline.flow.reflow import couple_by_flow

    x_0 = toy_sampler(cfg.toy.source)(num_pairs, torch.Generator().manual_seed(seed))
    x_1 = couple_by_flow(lambda x, t: base(x, t), x_0, solver="euler", steps=steps)
    return train_toy(cfg, log, pairs=(x_0, x_1), init=base), (x_0, x_1)


@torch.no_grad()
def sample_toy(
    model: torch.nn.Module,
    cfg: Config,
    num_samples: int,
    seed: int,
    solver: str | None = None,
    steps: int | None = None,
    return_trajectory: bool = False,
) -> ODESolution:
    """Integrate dx/dt = v(x, t) from source draws (seeded by ``seed``) to t = 1."""
    generator = torch.Generator().manual_seed(seed)
    x_0 = toy_sampler(cfg.toy.source)(num_samples, generator)
    method = solver or cfg.sample.solver
    return solve_ode(
        lambda x, t: model(x, t),
        x_0,
        method=method,
        steps=effective_steps(method, steps or cfg.sample.steps),
        atol=cfg.sample.atol,
        rtol=cfg.sample.rtol,
        return_trajectory=return_trajectory,
    )


def plot_toy(
    solution: ODESolution, reference: torch.Tensor, out_png: Path, num_trajectories: int
) -> Path:
    """Two panels: generated vs reference samples, and trajectories from t=0 to t=1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5))
    ref = reference.numpy()
    gen = solution.x_1.numpy()
    left.scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.4, label="data")
    left.scatter(gen[:, 0], gen[:, 1], s=2, alpha=0.4, label="samples")
    left.legend(loc="upper right", markerscale=5)
    left.set_title("samples at t=1")
    if solution.trajectory is not None and num_trajectories > 0:
        paths = solution.trajectory[:, :num_trajectories].numpy()
        right.plot(paths[:, :, 0], paths[:, :, 1], color="grey", alpha=0.5, linewidth=0.7)
        right.scatter(paths[0, :, 0], paths[0, :, 1], s=6, color="black", label="t=0")
        right.scatter(paths[-1, :, 0], paths[-1, :, 1], s=6, color="tab:orange", label="t=1")
        right.legend(loc="upper right")
    right.set_title(f"trajectories (NFE {solution.nfe})")
    for axis in (left, right):
        axis.set_aspect("equal")
        axis.set_xlim(-5, 5)
        axis.set_ylim(-5, 5)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
