"""The feature networks behind every sample-quality metric: one interface, several networks.

A feature network maps a batch of images to one vector per image; the metrics in
:mod:`pipeline.eval.frechet` compare the distributions of those vectors. Images arrive as
the shards store them, uint8 ``(N, C, H, W)`` with C in {1, 3}; each network owns its
resize and normalisation protocol, so a statistic computed by one job can be compared with
one computed by another only when ``FeatureNetwork.key`` is equal.

Networks:
- ``inception`` (:mod:`pipeline.eval.inception`): the TF Inception-v3 of 2015-12-05, 2048-d
  pool features: the network FID is defined with.
- ``classifier`` (:mod:`pipeline.eval.classifier`): a small classifier fmpipe trains on the
  labelled dataset itself; penultimate features give an in-domain Fréchet distance and its
  predictions conditional accuracy.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


class FeatureNetworkError(ValueError):
    """A feature network's weights cannot be found, read or used; names the file or URI."""


@runtime_checkable
class FeatureNetwork(Protocol):
    """Images -> feature vectors.

    Attributes:
        name: the network's kind, e.g. ``"inception"``.
        key: identifies the network *and* its weights and protocol (e.g.
            ``"inception-2015-12-05@299"``, ``"classifier:<sha256[:12]>"``); reference
            statistics are stored and looked up under it.
        dim: feature dimension d.
    """

    name: str
    key: str
    dim: int

    def features(self, images: torch.Tensor) -> np.ndarray:
        """uint8 ``(N, C, H, W)`` images, C in {1, 3} -> float64 ``(N, dim)`` features."""
        ...


def check_images(images: torch.Tensor, network: str) -> torch.Tensor:
    """``images`` as uint8 (N, 3, H, W) (a single channel repeated), or ValueError."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{network}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{network}: images must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{network}: images must be (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}"
        )
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images
