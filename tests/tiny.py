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
