"""The tiny U-Net the tests build: small enough for 8x8 images on CPU in well under a second.

``TINY_UNET`` holds the model section's architecture fields; a test that needs class
conditioning adds it where it builds the config, e.g. ``{**TINY_UNET, "num_classes": 3}``.
Imported as ``from tiny import ...`` (pytest puts tests/ on sys.path, as for tests/cluster.py).
"""

from __future__ import annotations

import json
from typing import Any

TINY_UNET: dict[str, Any] = {
    "kind": "unet",
    "base_channels": 8,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [4],
    "num_heads": 2,
    "norm_groups": 4,
}


def tiny_unet_overrides() -> list[str]:
    """``TINY_UNET`` as ``model.<key>=<value>`` overrides, for a job's command line."""
    return [f"model.{key}={json.dumps(value)}" for key, value in TINY_UNET.items()]


def tiny_checkpoint(
    directory: Any, num_classes: int = 3, seed: int = 0, perturb: bool = False
) -> Any:
    """A real fmpipe checkpoint of an 8x8 tiny U-Net (``num_classes`` > 0: class-conditional)
    at ``directory``, its weights seeded by ``seed``; returns ``directory``. ``perturb``:
    noise on every weight, so the output layer (zero at init) moves samples too."""
    import torch

    from pipeline.checkpoint import TrainState, save_checkpoint
    from pipeline.config import build_config
    from pipeline.models import build_model

    cfg = build_config(
        {
            "data": {"resolution": 8, "channels": 1},
            "model": {**TINY_UNET, "num_classes": num_classes},
        }
    )
    torch.manual_seed(seed)
    model = build_model(cfg.model, (1, 8, 8))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(
        directory,
        model=model,
        ema=model,
        state=TrainState(images_seen=64, step=1, data_shape=[1, 8, 8], mlflow_run_id=""),
        config=cfg,
    )
    return directory
