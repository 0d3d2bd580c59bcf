"""``train(cfg)``: the Ray Train ``TorchTrainer`` around :func:`pipeline.train.loop.training_loop`.

What the driver does, in order:

1. Checks everything it can before any worker starts: the dataset (``open_dataset``: a
   missing or empty dataset is a clear :class:`~pipeline.data.stream.DatasetError`), the
   batch split (``batch_size`` divisible by ``num_workers * grad_accum``), the class count
   against the dataset's labels, and the checkpoint storage (S3 bucket and credentials).
2. Looks for a previous run under ``<storage_path>/<run_name>`` (same name + storage path =
   same run): its newest *complete* checkpoint (:mod:`pipeline.train.resume`) is where the
   workers resume, and its data epoch is where the stream starts; the config must keep
   that checkpoint's network (else a one-line ConfigError, before MLflow is touched);
   ``fmpipe_run.json`` names the MLflow run to continue. A new run gets a new
   MLflow run, whose id is written to ``fmpipe_run.json`` before training starts, so even a
   run killed before its first checkpoint continues the same MLflow run when re-run.
3. Starts Ray if needed (local, ``log_to_driver=False``: Ray's own chatter stays in its log
   files under ``/tmp/ray/session_latest/logs``), builds the multi-epoch stream
   (:func:`pipeline.train.data.build_train_stream`) and the validation draws, and runs the
   ``TorchTrainer`` with ``RunConfig(name=run_name, storage_path=..., storage_filesystem=
   <explicit pyarrow filesystem for s3://>, failure_config=FailureConfig(max_failures),
   checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints))``.
4. Prints concise progress lines from what rank 0 sends through a small Ray queue, marks the
   MLflow run FINISHED / FAILED / KILLED, and returns a :class:`TrainResult`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.checkpoint import TrainState, data_shape_of
from pipeline.config import Config, ConfigError
from pipeline.data.stream import final_data_error, fresh_error
from pipeline.home import storage_path
from pipeline.lease import hold_run_lease
from pipeline.rayenv import ensure_ray, scoped_environ, train_environ
from pipeline.redact import scrub
from pipeline.storage import Location, StorageError, check_access, resolve
from pipeline.train.data import (
    BatchSource,
    StopOnDataErrors,
    ValSet,
    build_train_stream,
    epochs_needed,
    load_val_set,
)
from pipeline.train.loop import train_loop_per_worker
from pipeline.train.resume import (
    check_resumable,
    describe,
    find_resume_point,
    set_aside_broken_ray_snapshot,
)
from pipeline.train.spec import (
    InitWeights,
    RunContext,
    TrackingHandle,
    WorkerSpec,
    micro_batch_size,
)

__all__ = [
    "RUN_INFO_FILE",
    "TrainResult",
    "storage_location",
    "train",
]

log = logging.getLogger(__name__)

RUN_INFO_FILE = "fmpipe_run.json"  # beside Ray's files in <storage>/<run_name>/


@dataclass
class TrainResult:
    """What a training run produced (``metrics`` are rank 0's last report)."""

    metrics: dict[str, Any]
    images_seen: int
    checkpoint_uri: str | None  # the latest checkpoint directory (s3://... or a path)
    run_uri: str  # <storage_path>/<run_name>
    mlflow_run_id: str | None
    registered_model_name: str | None = None
    registered_version: str | None = None
    registered_alias: str | None = None  # train.alias, pointed at registered_version
    wall_seconds: float = 0.0
    resumed_from: int = 0  # images seen when this invocation started
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.metrics
        if self.resumed_from and self.resumed_from >= self.images_seen:
            head = f"run already complete at {self.images_seen:,} images: nothing to train"
        else:
            head = f"trained to {self.images_seen:,} images in {self.wall_seconds:.1f} s" + (
                f" (resumed at {self.resumed_from:,})" if self.resumed_from else ""
            )
        lines = [head]
        if m.get("val_loss") is not None:
            lines.append(f"  val_loss         {m['val_loss']:.5f}")
        if m.get("images_per_sec"):
            lines.append(
                f"  images/s         {m['images_per_sec']:.1f} "
                f"(data wait {100 * m.get('data_wait_fraction', 0.0):.1f}% of step time)"
            )
        lines.append(f"  checkpoint       {self.checkpoint_uri}")
        if self.mlflow_run_id:
            lines.append(f"  MLflow run       {self.mlflow_run_id}")
        if self.registered_version:
            lines.append(
                f"  registered model models:/{self.registered_model_name}/{self.registered_version}"
            )
        if self.registered_alias:
            lines.append(
                f"  alias            models:/{self.registered_model_name}@{self.registered_alias}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- storage
def storage_location(cfg: Config) -> Location:
    """``train.storage_path``, else ``$FMPIPE_HOME/runs``."""
    return resolve(storage_path(cfg), cfg.storage)


def _uri(loc: Location, path: str) -> str:
    return f"s3://{path}" if loc.is_s3 else path


def _read_run_info(run_dir: Location) -> dict[str, Any]:
    info = run_dir.child(RUN_INFO_FILE)
    try:
        if info.exists():
            return json.loads(info.read_bytes().decode())
    except Exception as exc:
        log.warning("ignoring unreadable %s: %s", info.uri, exc)
    return {}


# --------------------------------------------------------------------------- progress
def _format_progress(event: Mapping[str, Any]) -> str | None:
    kind = event.get("kind")
    seen = int(event.get("images_seen", 0))
    if kind == "start":
        how = f"resuming at {seen:,} images" if event.get("resumed") else "starting"
        return (
            f"[train] {how}: {event.get('world_size')} worker(s) x micro-batch "
            f"{event.get('micro_batch')}, to {int(event.get('total_images', 0)):,} images"
        )
    if kind == "log":
        total = int(event.get("total_images", 0)) or 1
        return (
            f"[train] {seen:>10,} / {total:,} images ({100 * seen / total:5.1f}%)  "
            f"loss {event.get('loss', float('nan')):.4f}  lr {event.get('lr', 0.0):.2e}  "
            f"{event.get('images_per_sec', 0.0):7.1f} img/s  "
            f"data wait {100 * event.get('data_wait_fraction', 0.0):4.1f}%"
        )
    if kind == "val":
        return f"[train] {seen:>10,} images  val_loss {event.get('val_loss', float('nan')):.5f}"
    if kind == "checkpoint":
        return f"[train] {seen:>10,} images  checkpoint{' (final)' if event.get('final') else ''}"
    if kind == "eval":
        accuracy = event.get("accuracy")
        return (
            f"[train] {seen:>10,} images  eval of {event.get('n')} samples: Fréchet distance "
            f"{event.get('fd', float('nan')):.4f} ({event.get('network')})"
            + ("" if accuracy is None else f", conditional accuracy {accuracy:.3f}")
        )
    if kind == "retry":
        return (
            f"[train] worker {event.get('rank')} failed: {event.get('error')}; restarting from "
            f"the last checkpoint in {float(event.get('delay_s', 0)):g} s (attempt "
            f"{event.get('attempt')} of {event.get('attempts')})"
        )
    return None


class _ProgressPrinter:
    """Driver thread printing what rank 0 sends through a Ray queue."""

    def __init__(
        self,
        print_fn: Callable[[str], None],
        on_event: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        self.print_fn = print_fn
        self.on_event = on_event  # also sees every event (the bad-sample report's epoch ends)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmpipe-progress", daemon=True)

    def __enter__(self) -> _ProgressPrinter:
        self._thread.start()
        return self

    def _drain(self, timeout: float) -> None:
        from ray.util.queue import Empty

        with contextlib.suppress(Empty):
            event = self.queue.get(timeout=timeout)
            line = _format_progress(event)
            if line:
                self.print_fn(line)
            if self.on_event is not None:
                try:
                    self.on_event(event)
                except Exception as exc:  # a report must never stop the progress lines
                    log.warning("progress event %s: %s", event.get("kind"), exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain(0.5)
            except Exception:  # the queue actor went away: stop quietly
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            while not self.queue.empty():
                self._drain(0.1)
        with contextlib.suppress(Exception):
            self.queue.shutdown()


# --------------------------------------------------------------------------- the steps
@dataclass
class _Inputs:
    """The data side of a run, checked before any worker starts."""

    data_shape: tuple[int, ...]
    manifest_hash: str = ""
    info: Any = None  # DatasetInfo of the train split (None with a caller's batch source)
    val_info: Any = None  # DatasetInfo of the val split, if there is one
    pairs: Any = None  # data.pairs: the PairSet trained on (then info is None)
    pair_shards: tuple[list[Any], list[Any]] = ([], [])  # its (train, val) shards
    notes: list[str] = field(default_factory=list)  # settings taken from the dataset


def _check_inputs(cfg: Config, batch_source: BatchSource | None, shape: Any) -> _Inputs:
    """The batch split, the dataset and its classes (or the caller's in-memory data)."""
    t = cfg.train
    micro_batch_size(cfg.data.batch_size, t.num_workers, t.grad_accum)
    if t.alias and not t.registered_model_name.strip():
        raise ConfigError(
            f"train.alias={t.alias!r} needs train.registered_model_name (the model whose "
            "version the alias points at)"
        )
    if t.objective == "distill" and batch_source is None and not cfg.data.pairs.strip():
        raise ConfigError(
            "train.objective=distill trains a student on a flow's own pairs: set data.pairs "
            "to a coupled set (fmpipe sample --pairs), or use fmpipe reflow's pairs"
        )
    if batch_source is not None:
        return _Inputs(data_shape=tuple(shape or data_shape_of(cfg)))
    if cfg.data.pairs.strip():
        return _check_pairs(cfg)
    from pipeline.data.manifest import MANIFEST_NAME
    from pipeline.data.stream import (
        adopt_dataset_shape,
        check_config_against_manifest,
        open_dataset,
    )

    info = open_dataset(cfg, "train")
    notes = adopt_dataset_shape(cfg, info)  # keys the config leaves unset: the dataset's
    check_config_against_manifest(cfg, info)
    labels = info.manifest.num_classes
    if cfg.model.num_classes and labels and cfg.model.num_classes != labels:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but dataset '{cfg.data.uri}' has "
            f"{labels} classes; set model.num_classes={labels} (or 0 for unconditional)"
        )
    if cfg.model.num_classes and not labels:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but dataset '{cfg.data.uri}' is "
            "unlabelled; set model.num_classes=0"
        )
    val_info = None
    if info.foreign:  # the index says whether it has a val split (data.val_uri/val_fraction)
        from pipeline.data.foreign import refresh_index

        has_val = bool(refresh_index(cfg, fresh=False).index.split_shards("val"))
    else:
        has_val = resolve(cfg.data.uri, cfg.storage).child("val", MANIFEST_NAME).exists()
    if has_val:  # a damaged val split is an error, like train's
        val_info = open_dataset(cfg, "val", fresh=False)
    else:
        log.warning("no validation loss: dataset '%s' has no val split", cfg.data.uri)
    return _Inputs(data_shape_of(cfg), info.manifest.content_hash(), info, val_info, notes=notes)


def check_model_fits(cfg: Config, data_shape: tuple[int, ...]) -> None:
    """Raise ConfigError if ``cfg.model`` cannot be built for samples of ``data_shape``.

    The network is built on PyTorch's meta device (shapes only: no memory, no init work), in
    the driver: a worker that fails to build it would fail again at every restart that
    ``train.max_failures`` allows, and each restart costs a worker's start.
    """
    import torch

    from pipeline.models import build_model

    try:
        with torch.device("meta"):
            build_model(cfg.model, data_shape)
    except ValueError as exc:
        raise ConfigError(
            f"model.kind={cfg.model.kind!r} does not fit the data (samples of shape "
            f"{tuple(data_shape)}): {exc}; change the model.* settings or data.resolution"
        ) from None


def _class_names(inputs: _Inputs) -> tuple[str, ...]:
    """Label id -> name of what the run trains on (the dataset's, or the coupled set's)."""
    if inputs.info is not None:
        return tuple(inputs.info.manifest.class_names)
    if inputs.pairs is not None:
        return tuple(inputs.pairs.manifest.class_names)
    return ()


def _pair_lineage(inputs: _Inputs) -> dict[str, str]:
    """``fmpipe.reflow.*`` tags of a run on a coupled set: which set, model and sampler."""
    if inputs.pairs is None:
        return {}
    return {
        f"fmpipe.reflow.{k}": "" if v is None else str(v) for k, v in inputs.pairs.lineage.items()
    }


def _pairs_model(inputs: _Inputs) -> str:
    """The model that made the coupled set (its version, pinned), or "" (not on pairs)."""
    if inputs.pairs is None:
        return ""
    made = inputs.pairs.lineage
    if made["model_name"] and made["model_version"]:
        return f"models:/{made['model_name']}/{made['model_version']}"
    return str(made["model_uri"] or "")


def _check_pairs(cfg: Config) -> _Inputs:
    """``data.pairs``: the coupled set, checked against the config before any worker."""
    from pipeline.data.pairs import open_pair_set, split_pair_shards

    pair_set = open_pair_set(resolve(cfg.data.pairs, cfg.storage))
    where = f"coupled set '{cfg.data.pairs}'"
    if cfg.data.coupling != "independent":
        raise ConfigError(
            f"data.coupling={cfg.data.coupling} with data.pairs: re-pairing inside a batch would "
            f"undo the coupling of {where} that reflow trains on; use data.coupling=independent"
        )
    if cfg.data.hflip:
        raise ConfigError(
            f"data.hflip=true with data.pairs: a flipped x_1 is not x_0's pair ({where})"
        )
    if tuple(pair_set.data_shape) != data_shape_of(cfg):
        c, r = pair_set.data_shape[0], pair_set.data_shape[1]
        raise ConfigError(
            f"{where} holds {pair_set.data_shape} samples but the config trains on "
            f"{data_shape_of(cfg)}; set data.channels={c} data.resolution={r}"
        )
    if cfg.model.num_classes != pair_set.num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but {where} was sampled from a model "
            f"with {pair_set.num_classes} classes; set model.num_classes={pair_set.num_classes}"
        )
    train_shards, val_shards = split_pair_shards(pair_set)
    if not val_shards:
        log.warning(
            "no validation loss: %s has one shard (the last of two or more is held out)", where
        )
    return _Inputs(
        data_shape=pair_set.data_shape,
        manifest_hash=pair_set.manifest.content_hash(),
        pairs=pair_set,
        pair_shards=(train_shards, val_shards),
    )


def _start_tracking(cfg: Config, run_dir: Location, previous: TrainState | None):
    """Continue the MLflow run this run started, else start one; record it in the run dir."""
    from pipeline.tracking import Tracker, tracking_uri

    t = cfg.train
    uri = tracking_uri(cfg)
    run_info = _read_run_info(run_dir)
    run_id = run_info.get("mlflow_run_id") or (previous.mlflow_run_id if previous else None)
    try:
        tracker = Tracker.start(
            cfg, experiment=cfg.tracking.experiment, run_name=t.run_name, run_id=run_id
        )
    except ValueError as exc:
        log.warning("starting a new MLflow run: %s", exc)
        tracker = Tracker.start(cfg, experiment=cfg.tracking.experiment, run_name=t.run_name)
    tracker.set_tags({"fmpipe.run_uri": run_dir.uri})
    if tracker.run_id != run_info.get("mlflow_run_id"):
        body = {"mlflow_run_id": tracker.run_id, "run_name": t.run_name, "tracking_uri": scrub(uri)}
        run_dir.child(RUN_INFO_FILE).write_bytes((json.dumps(body, indent=1) + "\n").encode())
    handle = TrackingHandle(uri, str(tracker.run_id), cfg.tracking.experiment, t.run_name)
    return tracker, handle


class _BadSampleReport:
    """Bad samples the stream skipped, per data epoch: a console line each (count, fraction
    and reasons) as the epoch ends (the loop's ``epoch_end`` event) or at the end of the run,
    and in MLflow a ``data/bad_samples`` metric per epoch plus ``data/bad_samples.json``
    listing every recorded ``{epoch, shard, key, reason}``."""

    def __init__(
        self, cfg: Config, info: Any, say: Callable[[str], None], handle: TrackingHandle | None,
        start_epoch: int = 0,
    ) -> None:  # fmt: skip
        self.cfg, self.info, self.say, self.handle = cfg, info, say, handle
        self.done: set[int] = set()  # epochs already reported
        self.pending = start_epoch  # the first epoch not reported yet (a resume starts later)
        self.ended = -1  # the last data epoch the loop has seen end
        self._attached: Any = None  # the MLflow run's tracker, once needed

    def _report(self, epoch: int) -> Any:
        from pipeline.data.stream import bad_sample_tracker

        return bad_sample_tracker(self.cfg, self.info, epoch).report()

    def _tracker(self) -> Any:
        from pipeline.tracking import Tracker

        if self.handle is None:
            return None
        if self._attached is None:  # one, outage-tolerant like the workers' (bad-sample counts)
            tracker = Tracker.attach(self.handle.uri, self.handle.run_id)
            # MLflow's full retries stay in this process: its end of the run must get through.
            self._attached = tracker.tolerate_outages(short_requests=False)
        return self._attached

    def epoch(self, epoch: int, final: bool = False) -> None:
        """Report ``epoch`` once, when every shard of it has been decoded (decode tasks run in
        parallel, so a shard may finish after the loop saw the next epoch: it is reported
        at a later event); ``final``: at the end of the run, whatever was read of it."""
        from pipeline.data.stream import reasons_of

        if epoch in self.done:
            return
        report = self._report(epoch)
        if not report.shards:
            return  # this epoch was not read (a resume started after it)
        read, shards = len(report.shards), len(self.info.shards)
        if read < shards and not final:
            return
        self.done.add(epoch)
        reasons = reasons_of(report)
        shown = ", ".join(f"{kind} {n:,}" for kind, n in list(reasons.items())[:4])
        part = f" (the {read} of {shards} shards read)" if read < shards else ""
        self.say(
            f"[data] epoch {epoch}{part}: {report.skipped:,} of {report.total:,} samples "
            f"skipped as bad ({report.fraction:.2%})" + (f": {shown}" if shown else "")
        )
        tracker = self._tracker()
        if tracker is not None:
            tracker.log_metrics({"data/bad_samples": report.skipped}, step=epoch)

    def on_event(self, event: Mapping[str, Any]) -> None:
        # Every event retries the ended epochs not reported yet: a shard's record may land
        # after its epoch's end event (decode tasks report asynchronously), and the next
        # epoch end may be far off, or never come.
        if event.get("kind") == "epoch_end":
            self.ended = max(self.ended, int(event["epoch"]))
        for epoch in range(self.pending, self.ended + 1):
            self.epoch(epoch)  # this one, and any earlier one that was still decoding
        while self.pending in self.done:  # no remote call for an epoch once reported
            self.pending += 1

    def finish(self, epochs: range) -> None:
        """The epochs not reported yet, then the artifact of every recorded bad sample."""
        records = []
        try:
            for epoch in epochs:
                self.epoch(epoch, final=True)
                if epoch in self.done:
                    records += [
                        {"epoch": epoch, "shard": r.shard, "key": r.key, "reason": r.reason}
                        for r in self._report(epoch).records
                    ]
        except Exception as exc:  # the report must never fail a finished run
            log.warning("no bad-sample report: %s", exc)
            return
        tracker = self._tracker()
        if tracker is not None and self.done:
            tracker.log_text(json.dumps(records, indent=1) + "\n", "data/bad_samples.json")
            try:
                tracker.flush()  # counts an MLflow outage kept
            except Exception as exc:
                log.warning("bad-sample counts not sent to MLflow: %s", scrub(str(exc)))


def _trainer(cfg: Config, spec: WorkerSpec, storage: Location, datasets: Any) -> Any:
    """The ``TorchTrainer`` for ``spec``: scaling, storage, failures and checkpoints from cfg."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    scaling = ray.train.ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=t.use_gpu,
        resources_per_worker=resources,
        placement_strategy=t.placement_strategy,
    )
    run_config = ray.train.RunConfig(
        name=t.run_name,
        storage_path=storage.path,
        storage_filesystem=storage.filesystem if storage.is_s3 else None,
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
        # a corrupt shard ends the run, once (not retried); other errors: backoff + a line
        callbacks=[
            StopOnDataErrors(t.max_failures, t.retry_backoff_s, spec.context.progress_queue)
        ],
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.to_loop_config(),
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
    )


def _fit(trainer: Any, run_uri: str) -> Any:
    """``trainer.fit()``; a final data error inside Ray's wrappers is raised as itself, and
    a failed write of Ray Train's controller into the run's folder (its checkpoint index:
    disk full, storage down) as a :class:`StorageError` naming the folder."""
    try:
        with scoped_environ(train_environ()):
            return trainer.fit()
    except Exception as exc:
        final = final_data_error(exc)
        if final is not None:
            raise fresh_error(final) from None
        cause = getattr(exc, "controller_failure", None)  # ray.train.ControllerError
        if isinstance(cause, OSError):
            raise StorageError(f"cannot write to the run's folder {run_uri}: {cause}") from None
        raise


# --------------------------------------------------------------------------- train
def train(
    cfg: Config,
    *,
    init: InitWeights | None = None,
    batch_source: BatchSource | None = None,
    data_shape: tuple[int, ...] | None = None,
    val_set: ValSet | None = None,
    print_fn: Callable[[str], None] | None = print,
    track: bool = True,
    lineage: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train ``cfg`` on Ray Train (see the module doc); resumes ``train.run_name`` if it exists.

    ``init``: weights a fresh run starts from (ignored when the run resumes a checkpoint).
    ``batch_source`` (tests, benchmarks) replaces the Ray Data stream; then ``data_shape``
    (default from ``cfg.data``) and ``val_set`` come from the caller and no dataset is read.
    ``track=False`` skips MLflow. ``lineage``: tags for the MLflow run and the registered
    version (with ``data.pairs`` the coupled set's own lineage is added: ``fmpipe.reflow.*``).
    """
    started = time.perf_counter()
    inputs = _check_inputs(cfg, batch_source, data_shape)
    check_model_fits(cfg, inputs.data_shape)
    storage = storage_location(cfg)
    if storage.is_s3:
        check_access(storage, must_exist=False)
    # One writer per run: refused (LeaseError naming the holder) before anything is written.
    with hold_run_lease(cfg, storage):
        return _train_leased(
            cfg, inputs, storage, started, init, batch_source, val_set, print_fn, track,
            {**_pair_lineage(inputs), **dict(lineage or {})},
        )  # fmt: skip


def _train_leased(
    cfg: Config, inputs: _Inputs, storage: Location, started: float, init: InitWeights | None,
    batch_source: BatchSource | None, val_set: ValSet | None,
    print_fn: Callable[[str], None] | None, track: bool, lineage: dict[str, str],
) -> TrainResult:  # fmt: skip
    """:func:`train` from the run's previous state on, under the run's lease."""
    t = cfg.train
    run_dir = storage.child(t.run_name)
    resume = find_resume_point(run_dir)
    set_aside = set_aside_broken_ray_snapshot(run_dir)
    if set_aside:
        log.warning("%s", set_aside)
    if resume is not None:
        check_resumable(cfg, resume)  # before MLflow: a refused resume changes nothing there
    previous = resume.state if resume else None
    start_images = previous.images_seen if previous else 0
    tracker, handle = _start_tracking(cfg, run_dir, previous) if track else (None, None)

    ensure_ray()
    datasets = None
    if inputs.info is not None:
        epochs = epochs_needed(
            max(t.total_images - start_images, 0), inputs.info.num_samples, cfg.data.batch_size
        )
        start_epoch = previous.data_epoch if previous else 0
        datasets = {"train": build_train_stream(cfg, inputs.info, start_epoch, epochs)}
        if inputs.val_info is not None and val_set is None:
            val_set = load_val_set(cfg, inputs.val_info, t.val_max_images)
    elif inputs.pairs is not None:
        from pipeline.data.pairs import build_pairs_stream, load_pairs_val_set

        train_shards, val_shards = inputs.pair_shards
        num_pairs = sum(s.num_samples for s in train_shards)
        epochs = epochs_needed(
            max(t.total_images - start_images, 0), num_pairs, cfg.data.batch_size
        )
        start_epoch = previous.data_epoch if previous else 0
        stream = build_pairs_stream(cfg, inputs.pairs, train_shards, start_epoch, epochs)
        datasets = {"train": stream}
        if val_shards and val_set is None:
            val_set = load_pairs_val_set(cfg, inputs.pairs, val_shards, t.val_max_images)
    say = print_fn or (lambda _line: None)
    for note in inputs.notes:
        say(f"[data] {note}")
    quality = None
    if t.eval_every_images:  # before any worker: a missing classifier fails here, at once
        from pipeline.eval.probe import QualityProbe

        quality = QualityProbe.from_config(cfg, say=say, data_of=_pairs_model(inputs))
    if resume is not None:
        say(f"[train] found {describe(resume)} in {run_dir.uri}")
    status = "FAILED"
    try:
        bad = _BadSampleReport(cfg, inputs.info, say, handle, start_epoch) if inputs.info else None
        printer = (
            _ProgressPrinter(say, bad.on_event if bad else None)
            if print_fn
            else contextlib.nullcontext()
        )
        with printer as p:
            context = RunContext(
                data_shape=inputs.data_shape, manifest_hash=inputs.manifest_hash,
                tracking=handle, resume=resume, init=init, batch_source=batch_source,
                val_set=val_set, quality=quality,
                class_names=_class_names(inputs), lineage=lineage,
                progress_queue=p.queue if p is not None else None, run_uri=run_dir.uri,
            )  # fmt: skip
            result = _fit(_trainer(cfg, WorkerSpec(cfg, context), storage, datasets), run_dir.uri)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.end(status)

    metrics = dict(result.metrics or {})
    if bad is not None:
        data_epoch = int(metrics.get("data_epoch", start_epoch) or 0)
        bad.finish(range(start_epoch, data_epoch + 1))
    return TrainResult(
        metrics=metrics,
        images_seen=int(metrics.get("images_seen", 0)),
        checkpoint_uri=_uri(storage, result.checkpoint.path) if result.checkpoint else None,
        run_uri=run_dir.uri,
        mlflow_run_id=handle.run_id if handle else None,
        registered_model_name=metrics.get("registered_model_name"),
        registered_version=metrics.get("registered_version"),
        registered_alias=metrics.get("registered_alias"),
        wall_seconds=time.perf_counter() - started,
        resumed_from=start_images,
    )
