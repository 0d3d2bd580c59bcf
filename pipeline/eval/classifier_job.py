"""``fmpipe classifier``: train the dataset's classifier and register it beside the generator.

The classifier (:mod:`pipeline.eval.classifier`) learns the labelled ``train`` split of
``data.uri`` (decoded exactly as training decodes it) and is checked on the held-out
``val`` split. Its file is stored at
``<train.storage_path>/classifiers/<content hash[:16]>-<R>px/classifier.pt``, logged to an
MLflow run and registered as ``<dataset>-classifier`` with the alias ``champion``, which is
where ``fmpipe eval --network classifier`` looks by default. Seeded by ``seed``: the same
config and data give the same weights (on one machine and torch build).
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config, dataset_name
from pipeline.data.stream import DatasetError
from pipeline.eval.classifier import ClassifierSpec, evaluate, save_classifier, train_classifier
from pipeline.eval.extract import dataset_shards, load_images
from pipeline.home import storage_path
from pipeline.storage import resolve

__all__ = ["ClassifierResult", "classifier_model_name", "fit_classifier"]

CLASSIFIER_FILE = "classifier.pt"
ALIAS = "champion"
HELD_OUT = "val"  # the split the classifier is checked on (never trained on)


def classifier_model_name(cfg: Config) -> str:
    """``<dataset name>-classifier`` (``digits-classifier`` for the demo's dataset)."""
    return f"{dataset_name(cfg.data.uri) or 'dataset'}-classifier"


@dataclass
class ClassifierResult:
    uri: str  # where classifier.pt was stored
    accuracy: float  # on the held-out split
    confidence: float
    n_train: int
    n_val: int
    seconds: float
    registered: str = ""  # models:/<name>/<version>, or "" (tracking off)
    run_id: str | None = None

    def summary_lines(self) -> list[str]:
        lines = [
            f"classifier: {self.uri}",
            f"held-out accuracy {self.accuracy:.4f} (confidence {self.confidence:.4f}) on "
            f"{self.n_val:,} images; trained on {self.n_train:,} in {self.seconds:.1f} s",
        ]
        if self.registered:
            lines.append(f"registered {self.registered} (alias {ALIAS})")
        return lines


def fit_classifier(
    cfg: Config, *, track: bool = True, say: Callable[[str], None] = print
) -> ClassifierResult:
    """Train, check, store and register the classifier of ``data.uri`` (see module doc).

    Raises:
        DatasetError: the dataset has no labels (a classifier needs classes).
    """
    began = time.perf_counter()
    train_set = dataset_shards(cfg, "train")
    if train_set.num_classes < 2:
        raise DatasetError(
            f"dataset '{cfg.data.uri}' has {train_set.num_classes} classes: the classifier "
            "needs a labelled dataset (use --network inception for unlabelled data)"
        )
    val_set = dataset_shards(cfg, HELD_OUT, fresh=False)
    images, labels = (torch.from_numpy(a) for a in load_images(train_set))
    val_images, val_labels = (torch.from_numpy(a) for a in load_images(val_set))
    spec = ClassifierSpec(train_set.spec.channels, train_set.spec.resolution, train_set.num_classes)
    say(f"[classifier] training on {len(images):,} images of {train_set.uri}, {spec.num_classes} "
        f"classes, {cfg.eval.classifier_epochs} epochs")  # fmt: skip
    model = train_classifier(images, labels, spec, epochs=cfg.eval.classifier_epochs,
                             batch_size=cfg.eval.classifier_batch_size, lr=cfg.eval.classifier_lr,
                             seed=cfg.seed)  # fmt: skip
    checked = evaluate(model, val_images, val_labels)
    buffer = io.BytesIO()
    save_classifier(model, spec, buffer)
    where = resolve(storage_path(cfg), cfg.storage).child(
        "classifiers", f"{train_set.content_hash[:16]}-{spec.resolution}px", CLASSIFIER_FILE
    )
    where.write_bytes(buffer.getvalue())
    result = ClassifierResult(
        uri=where.uri,
        accuracy=float(checked["accuracy"]),
        confidence=float(checked["confidence"]),
        n_train=len(images),
        n_val=len(val_images),
        seconds=time.perf_counter() - began,
    )
    if track:
        _register(cfg, result, buffer.getvalue(), train_set.content_hash)
    return result


def _register(cfg: Config, result: ClassifierResult, data: bytes, content_hash: str) -> None:
    """Log the classifier to MLflow and register it as ``<dataset>-classifier@champion``."""
    from pipeline.tracking import Tracker

    name = classifier_model_name(cfg)
    tags = {"fmpipe.job": "classifier", "fmpipe.dataset_content": content_hash[:16]}
    experiment = cfg.tracking.eval_experiment
    with Tracker.start(cfg, experiment=experiment, run_name=name, tags=tags) as tr:
        tr.log_params({"data.uri": cfg.data.uri, "seed": cfg.seed,
                       "eval.classifier_epochs": cfg.eval.classifier_epochs})  # fmt: skip
        tr.log_metrics({"classifier/val_accuracy": result.accuracy,
                        "classifier/val_confidence": result.confidence}, step=0)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / CLASSIFIER_FILE).write_bytes(data)
            tr.log_artifacts(tmp, "classifier")
        version = tr.register_model_version(
            name, "classifier", tags={"val_accuracy": f"{result.accuracy:.4f}"}
        )
        if version:
            tr.set_alias(name, ALIAS, version)
            result.registered = f"models:/{name}/{version}"
        result.run_id = tr.run_id
