"""Bulk sample generation: a Ray Data batch-inference job over an actor pool.

``generate(cfg)`` resolves the model (``models:/<name>@<alias>``, ``models:/<name>/<version>``
or a checkpoint URI), integrates the flow for indices ``[0, N)`` in fixed shards on a pool of
actors and writes WebDataset shards + ``_manifest.json`` to object storage, resumably; see
:mod:`pipeline.sample.job` for the steps and :mod:`pipeline.sample.determinism` for the
bit-exactness guarantee.
"""

from pipeline.sample.determinism import (
    DEFAULT_BLOCK_SIZE,
    sample_labels,
    sample_noise,
    sample_seed,
    shard_ranges,
    splitmix64,
)
from pipeline.sample.job import JOB_FILE, SampleJobError, SampleResult, generate, grid_path_for
from pipeline.sample.sampler import SamplerActor, SamplerSettings, integrate_block, integrate_range
from pipeline.sample.source import CheckpointBuilder, ModelSource, load_model_source

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "JOB_FILE",
    "CheckpointBuilder",
    "ModelSource",
    "SampleJobError",
    "SampleResult",
    "SamplerActor",
    "SamplerSettings",
    "generate",
    "grid_path_for",
    "integrate_block",
    "integrate_range",
    "load_model_source",
    "sample_labels",
    "sample_noise",
    "sample_seed",
    "shard_ranges",
    "splitmix64",
]
