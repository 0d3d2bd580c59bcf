"""Validation loss: the training objective on fixed draws, a deterministic function of the
weights. For flow matching (:mod:`pipeline.train.objective`)

    val_loss = 1/N sum_i mean_elements (v(x_t[i], t[i], y[i]) - (x_1[i] - x_0[i]))^2

and for a distilled student its landing distance at ``t[i]`` rounded down to its grid;
over the :class:`~pipeline.train.data.ValSet` (fixed ``x_0``, ``t``), evaluated in float32
without autocast, in fixed batches in a fixed order, and summed in float64: the same
weights give the same number in every process. It is the model-selection metric.

Reference point (CFM): the best *constant* predictor ``v = c`` minimises
``E || x_1 - x_0 - c ||^2`` at ``c = E[x_1 - x_0]``, where the loss is the per-element
variance of ``x_1 - x_0`` (:func:`constant_predictor_loss`). A model that learned anything
about ``x_t`` scores below it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.train.data import ValSet
from pipeline.train.objective import Objective, velocity_on_rows

__all__ = ["constant_predictor_loss", "model_labels", "validation_loss"]

CFM = Objective()  # the flow-matching loss at the drawn t


def model_labels(label: Tensor, num_classes: int) -> Tensor | None:
    """Labels as the network takes them: None if unconditional, -1 -> null class."""
    if num_classes <= 0:
        return None
    return torch.where(label < 0, torch.full_like(label, num_classes), label)


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    val: ValSet,
    *,
    objective: Objective = CFM,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> float:
    """Mean per-sample ``objective`` (default CFM) of ``model`` on ``val`` (see the module
    doc). ``model`` is not changed except for being put in eval mode for the call (its
    previous mode is restored)."""
    was_training = model.training
    model.eval()
    num_classes = int(getattr(model, "num_classes", 0))
    total = torch.zeros((), dtype=torch.float64)
    try:
        for lo in range(0, len(val), batch_size):
            x_1 = val.x_1[lo : lo + batch_size].to(device)
            x_0 = val.x_0[lo : lo + batch_size].to(device)
            t = objective.times(val.t[lo : lo + batch_size].to(device))
            label = model_labels(val.label[lo : lo + batch_size].to(device), num_classes)
            x_t = objective.states(x_0, x_1, t, velocity_on_rows(model, label))
            velocity = model(x_t, t, label).float()
            total += objective.per_sample(velocity, x_0, x_1, x_t, t).double().sum().cpu()
    finally:
        model.train(was_training)
    return float(total / len(val))


def constant_predictor_loss(val: ValSet) -> float:
    """Loss of the best constant velocity ``c = mean(x_1 - x_0)``: the mean variance."""
    d = (val.x_1 - val.x_0).double()
    return float(((d - d.mean(dim=0, keepdim=True)) ** 2).mean())
