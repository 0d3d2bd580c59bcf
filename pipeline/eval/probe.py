"""Sample quality inside training: the EMA weights scored every ``train.eval_every_images``.

The driver builds one :class:`QualityProbe` before the workers start (the feature network's
weights as bytes or a URI, the reference statistics computed or read once by
:func:`pipeline.eval.reference.reference_features`); rank 0 then, at each evaluation,

1. integrates ``eval.num_samples`` samples of the EMA network with the sample job's own
   sampler (:func:`pipeline.sample.sampler.integrate_range`: noise from ``(eval.seed, i)``,
   labels ``i % classes``, ``eval.solver`` / ``eval.steps``; a distilled student
   (``train.objective=distill``) with the rule its version will carry, Euler x
   ``train.distill_steps``), so the figures of successive evaluations differ only by the
   weights, and equal ``fmpipe eval`` of that checkpoint at that rule;
2. quantises them to uint8 exactly as sample shards hold them;
3. scores their features against the reference (:func:`pipeline.eval.scores.score`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from pipeline.config import Config
from pipeline.eval.extract import FeatureSet, NetworkSpec, _built, _Collector, _run_network
from pipeline.eval.scores import Scores, score
from pipeline.train.objective import Objective

__all__ = ["QualityProbe"]


@dataclass(frozen=True)
class QualityProbe:
    """Everything a worker needs to score its weights (plain data: pickled to workers)."""

    network: NetworkSpec
    reference: bytes  # FeatureSet.to_bytes() of the reference split
    reference_uri: str  # where it is stored, for messages
    num_samples: int
    seed: int
    solver: str
    steps: int
    batch_size: int
    keep: int
    kid_subsets: int
    kid_subset_size: int
    pr_k: int

    @classmethod
    def from_config(
        cls, cfg: Config, say: Callable[[str], None] = print, data_of: str = ""
    ) -> QualityProbe:
        """The configured network and its reference of ``data.uri`` (Ray job if not stored);
        with ``data.uri`` empty, of the data the model ``data_of`` learnt (a reflow or a
        student trains on pairs: its reference and classifier are its base's dataset's)."""
        from pipeline.eval.extract import network_identity
        from pipeline.eval.job import network_spec, with_reference_data
        from pipeline.eval.reference import reference_features

        if data_of and not cfg.data.uri.strip():
            cfg = with_reference_data(cfg, data_of)
        network = network_spec(cfg)
        key, _ = network_identity(network)
        reference = reference_features(cfg, network, key, say=say)
        e = cfg.eval
        # a student is scored where it is meant to be used: its own K steps
        solver, steps = Objective.from_config(cfg.train).sampling_rule() or (e.solver, e.steps)
        return cls(
            network=network,
            reference=reference.features.to_bytes(),
            reference_uri=reference.location.uri,
            num_samples=e.num_samples,
            seed=e.seed,
            solver=solver,
            steps=steps,
            batch_size=e.batch_size,
            keep=e.keep_features,
            kid_subsets=e.kid_subsets,
            kid_subset_size=e.kid_subset_size,
            pr_k=e.pr_k,
        )

    def score(
        self, model: nn.Module, data_shape: tuple[int, ...], num_classes: int, device: str
    ) -> Scores:
        """Scores of ``model`` (the EMA network, eval mode) against the reference."""
        from pipeline.sample.determinism import default_block_size, sample_labels
        from pipeline.sample.sampler import SamplerSettings, integrate_range
        from pipeline.viz import to_uint8

        settings = SamplerSettings(
            seed=self.seed, solver=self.solver, steps=self.steps, atol=1e-5, rtol=1e-5,
            guidance_scale=1.0, label=None, num_classes=num_classes,
            data_shape=tuple(data_shape), block_size=default_block_size(device),
        )  # fmt: skip
        was_training = model.training
        model.eval()
        try:
            x_1, _ = integrate_range(model, 0, self.num_samples, settings, device)
        finally:
            model.train(was_training)
        images = np.ascontiguousarray(to_uint8(x_1).transpose(0, 3, 1, 2))  # (N, C, H, W)
        labels = sample_labels(range(self.num_samples), num_classes, None)
        labels = np.full(len(images), -1) if labels is None else np.asarray(labels)
        network = _built(self.network)
        collector = _Collector(self.keep, self.seed)
        for a in range(0, len(images), self.batch_size):
            b = a + self.batch_size
            out = _run_network(network, images[a:b])
            names = np.array([f"eval/{i:010d}" for i in range(a, min(b, len(images)))])
            collector.add({**out, "label": labels[a:b], "name": names})
        candidate = collector.result(network.key, {})
        reference = FeatureSet.from_bytes(self.reference, self.reference_uri)
        return score(candidate, reference, kid_subsets=self.kid_subsets,
                     kid_subset_size=self.kid_subset_size, k=self.pr_k, seed=self.seed)  # fmt: skip
