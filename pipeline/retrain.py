"""Scheduled retraining: new data -> a candidate -> promoted only if it beats the champion.

:func:`retrain` is safe to run from any scheduler at any frequency (cron, RayCronJob, a loop):

1. **What is new.** The train split's manifest hash (``Manifest.content_hash()``) against the
   ``manifest_hash`` tag of the version the ``retrain.alias`` alias (``champion``) points at.
   Equal: "no new data", recorded on the registered model (tags
   ``fmpipe.retrain.last_outcome`` / ``last_message`` / ``last_run_at``), exit 0, nothing
   trained. A version already evaluated for this data against this champion (tags
   ``manifest_hash`` + ``fmpipe.retrain.base_version`` + ``fmpipe.retrain.init``, decided
   ``promoted`` or ``rejected``) is not trained again either: a rejected candidate does not
   make every later tick retrain, and a human rollback of the alias is respected.
2. **One at a time.** The rest runs under an exclusive lock per (model, alias) (below). A run
   that finds it held reports "busy" and exits 0: the holder is doing the work.
3. **Candidate.** Trained by :func:`pipeline.train.trainer.train` as run
   ``<train.run_name>-retrain-<hash[:12]>-<v<champion>|scratch>`` for ``retrain.images``
   images. It continues from the champion's weights (model + EMA; fresh optimizer, learning-
   rate warm-up and schedule from 0) unless there is no champion or ``retrain.from_scratch``.
   The network architecture then comes from the champion's checkpoint (you cannot continue
   into another one). The champion's weights enter through the loop's own initialisation
   (:class:`pipeline.train.spec.InitWeights`, used when the run has no checkpoint of its
   own). The run name is deterministic, so a retrain killed mid-training resumes its
   candidate from its last checkpoint on the next tick.
4. **Evaluation.** Candidate and champion (EMA weights) on the same val split with the same
   fixed draws: :func:`pipeline.train.data.load_val_set` and
   :func:`pipeline.train.validate.validation_loss`, the trainer's own validation. With
   ``retrain.metric`` ``fd_classifier`` or ``fid``, also that Fréchet distance
   (:func:`pipeline.eval.job.score_models`: ``eval.num_samples`` samples of each at the same
   ``eval.seed``, solver and steps, against one stored reference of the new data), and that
   figure decides.
5. **Registration.** The candidate becomes a new version of ``train.registered_model_name``
   with tags ``manifest_hash``, ``images_seen``, ``val_loss``, ``champion_val_loss`` (and
   ``<metric>``, ``champion_<metric>`` when another metric decides), ``fmpipe.retrain.*``;
   promoted (``fmpipe.retrain.decision=promoted``) only when ``candidate < champion -
   retrain.promote_margin`` on the deciding metric; otherwise tagged ``rejected`` with the
   reason (both figures named). The training run gets the same decision and both losses.

Concurrency: why two runs cannot both promote
-------------------------------------------------
MLflow has no conditional alias update, so promotion is a compare-and-set built from two
parts:

- **An exclusive lease** on ``<train.storage_path>/_locks/<model>_<alias>.lock``
  (:func:`pipeline.lease.open_lease`): a conditional PUT on S3 (``If-None-Match: *``, renewed
  with ``If-Match``, taken over only after it expires), ``flock`` on a local path. Why that is
  exclusive, and its limits, is in :mod:`pipeline.lease`.
- **Compare-and-set under the lease.** The run remembers the champion version it compared
  against. Just before promoting it renews the lease (proving, atomically, that it still
  holds it), re-reads the alias, and moves it only if it still points at that version
  (or, with no champion before, still points nowhere). Otherwise the candidate is tagged
  ``rejected`` ("the champion moved ...") and the next run compares against the new one.

All fmpipe writers of the alias take the lease, so between the re-read and the move no
other retrain can move it; the re-read catches moves made while the run trained by anyone
(a person, a run whose lease had expired).

Limits: (a) the lease protects only runs that share it, i.e. the same model, alias and
``train.storage_path``; (b) a person moving the alias by hand (MLflow UI, client) takes no
lease, so a move in the instant between the re-read and the write can be overwritten; (c) a
process frozen for longer than ``LEASE_TTL_S`` between its last renewal and the alias write
could overlap with a run that took the expired lease (expiry uses wall clocks, so hosts need
roughly synchronised clocks); (d) ``flock`` on NFS depends on the NFS lock manager.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import Config, ConfigError

# The leases (S3 conditional writes, local flock) live in pipeline.lease; their names stay
# importable from here (jobs.retrain catches LeaseError).
from pipeline.lease import (
    LEASE_TTL_S,
    FileLease,
    Heartbeat,
    Lease,
    LeaseError,
    S3Lease,
    open_lease,
)

# Registry lookups: one implementation, in pipeline.registry, shared with fmpipe sample.
# Champion and read_champion stay importable from here (this module's public names).
from pipeline.registry import (
    Champion,
    alias_version,
    find_version,
    model_versions,
    read_champion,
    registered_model,
    registry_client,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.train.data import ValSet

__all__ = [
    "LEASE_TTL_S",
    "Champion",
    "FileLease",
    "Lease",
    "LeaseError",
    "RetrainResult",
    "S3Lease",
    "evaluate_checkpoint",
    "open_lease",
    "promote_if_unchanged",
    "read_champion",
    "record_outcome",
    "retrain",
]

log = logging.getLogger(__name__)

_CHECKPOINT_ARTIFACTS = "checkpoint"  # where the trainer logs its final checkpoint (loop.py)

Outcome = Literal["no_new_data", "already_evaluated", "busy", "promoted", "rejected"]

# version tags written here (besides the trainer's manifest_hash / images_seen / val_loss)
TAG_BASE = "fmpipe.retrain.base_version"  # champion version compared against ("none")
TAG_INIT = "fmpipe.retrain.init"  # "champion" | "scratch"
TAG_DECISION = "fmpipe.retrain.decision"  # pending | promoted | rejected | aborted
TAG_REJECTED = "rejected"  # the reason, on rejected versions
TAG_CHAMPION_VAL = "champion_val_loss"


def _prior_evaluation(
    client: MlflowClient, name: str, manifest_hash: str, base: str, init: str
) -> Any | None:
    """A version already decided for this data, this champion and this init, if any."""
    for mv in model_versions(client, name):
        tags = dict(mv.tags or {})
        if (
            tags.get("manifest_hash") == manifest_hash
            and tags.get(TAG_BASE) == base
            and tags.get(TAG_INIT) == init
            and tags.get(TAG_DECISION) in ("promoted", "rejected")
        ):
            return mv
    return None


def record_outcome(client: MlflowClient, name: str, outcome: str, message: str) -> None:
    """What the last retrain concluded, as tags of the registered model (best effort)."""
    from pipeline.redact import scrub

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        if registered_model(client, name) is None:
            return
        client.set_registered_model_tag(name, "fmpipe.retrain.last_outcome", outcome)
        client.set_registered_model_tag(name, "fmpipe.retrain.last_message", scrub(message)[:4000])
        client.set_registered_model_tag(name, "fmpipe.retrain.last_run_at", stamp)
    except Exception as exc:
        log.warning("could not record the retrain outcome on model %s: %s", name, exc)


PromoteStatus = Literal["promoted", "champion_moved", "lease_lost"]


def promote_if_unchanged(
    client: MlflowClient,
    name: str,
    alias: str,
    version: str,
    expected: str | None,
    lease: Lease,
) -> tuple[PromoteStatus, str]:
    """Compare-and-set: point ``alias`` at ``version`` only if it still points at
    ``expected`` (None: at nothing). The caller holds ``lease``; it is renewed first, which
    fails when the lease is no longer ours. Returns ``(status, reason when not promoted)``."""
    if not lease.renew():
        return "lease_lost", (
            "the retrain lease was lost before promotion (held too long without renewal and "
            "taken over); not promoted, the next run evaluates again"
        )
    current = alias_version(client, name, alias)
    if current != expected:
        return "champion_moved", (
            f"the '{alias}' alias moved from version {expected or 'none'} to "
            f"{current or 'none'} while this run trained; the next run compares against it"
        )
    client.set_registered_model_alias(name, alias, str(version))
    return "promoted", ""


# --------------------------------------------------------------------------- evaluation
def evaluate_checkpoint(checkpoint_dir: str | os.PathLike[str], val: ValSet) -> float:
    """Validation loss of a checkpoint's EMA weights on ``val`` (the trainer's metric)."""
    from pipeline.checkpoint import load_for_inference
    from pipeline.train.validate import validation_loss

    model, _ = load_for_inference(checkpoint_dir, use_ema=True)
    return validation_loss(model, val)


# --------------------------------------------------------------------------- retrain
@dataclass
class RetrainResult:
    outcome: Outcome
    message: str
    model_name: str
    manifest_hash: str
    champion_version: str | None = None  # the champion compared against (before the run)
    candidate_version: str | None = None
    candidate_val_loss: float | None = None
    champion_val_loss: float | None = None
    run_name: str | None = None
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"


def _candidate_config(cfg: Config, manifest_hash: str, champion: Champion | None, init: str):
    cand = cfg.model_copy(deep=True)
    base = f"v{champion.version}" if init == "champion" and champion else "scratch"
    cand.train.run_name = f"{cfg.train.run_name}-retrain-{manifest_hash[:12]}-{base}"
    cand.train.total_images = cfg.retrain.images
    cand.train.alias = ""  # the alias moves here, by compare-and-set, never in training
    cand.train.registered_model_name = ""  # registered here, after the evaluation
    return cand


def _adopt_architecture(cand: Config, champion_dir: Path, say: Callable[[str], None]) -> None:
    """Continuing: the network and image shape are the champion's (from its checkpoint)."""
    from pipeline.checkpoint import load_checkpoint

    own = load_checkpoint(champion_dir).config
    changed = own.model.model_dump() != cand.model.model_dump() or (
        own.data.resolution,
        own.data.channels,
    ) != (cand.data.resolution, cand.data.channels)
    if changed:
        say(
            "[retrain] the config's network differs from the champion's; continuing with the "
            "champion's (retrain.from_scratch=true trains the configured one)"
        )
    cand.model = own.model.model_copy(deep=True)
    cand.data.resolution = own.data.resolution
    cand.data.channels = own.data.channels


def retrain(cfg: Config, *, print_fn: Callable[[str], None] | None = print) -> RetrainResult:
    """One scheduled retraining step (see the module doc). Never raises for "nothing to do"."""
    say = print_fn or (lambda _line: None)
    name = cfg.train.registered_model_name.strip()
    alias = cfg.retrain.alias
    if not name:
        raise ConfigError(
            "train.registered_model_name is empty: retrain needs the registered model whose "
            f"'{alias}' alias it maintains (e.g. train.registered_model_name=digits)"
        )
    from pipeline.data.stream import open_dataset

    manifest_hash = open_dataset(cfg, "train").manifest.content_hash()
    client = registry_client(cfg)
    init = "scratch" if cfg.retrain.from_scratch else "champion"

    def done(outcome: Outcome, message: str, champion: Champion | None, **kw) -> RetrainResult:
        say(f"[retrain] {message}")
        record_outcome(client, name, outcome, message)
        return RetrainResult(
            outcome,
            message,
            name,
            manifest_hash,
            champion_version=champion.version if champion else None,
            **kw,
        )

    def nothing_to_do(champion: Champion | None) -> RetrainResult | None:
        if champion is not None and champion.manifest_hash == manifest_hash:
            return done(
                "no_new_data",
                f"no new data: {name}@{alias} (version {champion.version}) was trained on "
                f"dataset {manifest_hash[:12]}, the current one; nothing to train",
                champion,
            )
        effective_init = init if champion is not None else "scratch"
        base = champion.version if champion else "none"
        prior = _prior_evaluation(client, name, manifest_hash, base, effective_init)
        if prior is not None:
            tags = dict(prior.tags or {})
            return done(
                "already_evaluated",
                f"dataset {manifest_hash[:12]} was already evaluated against "
                f"{alias} version {base}: version {prior.version} was "
                f"{tags.get(TAG_DECISION)}"
                + (f" ({tags[TAG_REJECTED]})" if tags.get(TAG_REJECTED) else "")
                + "; nothing to train",
                champion,
            )
        return None

    # fast path, without the lease: most scheduled ticks end here
    champion = read_champion(client, name, alias)
    early = nothing_to_do(champion)
    if early is not None:
        return early

    lease = open_lease(cfg, name, alias)
    if not lease.acquire():
        holder = lease.holder() or {}
        until = holder.get("expires_at")
        when = f", lease until {time.strftime('%H:%M:%S', time.localtime(until))}" if until else ""
        message = (
            f"busy: another retrain of {name}@{alias} holds {lease.uri} "
            f"({holder.get('owner', 'unknown owner')}{when}); it does the work"
        )
        say(f"[retrain] {message}")
        return RetrainResult(
            "busy",
            message,
            name,
            manifest_hash,
            champion_version=champion.version if champion else None,
        )
    try:
        with Heartbeat(lease, lease.ttl):
            # authoritative: the champion may have changed before we got the lease
            champion = read_champion(client, name, alias)
            early = nothing_to_do(champion)
            if early is not None:
                return early
            return _train_evaluate_promote(cfg, client, lease, champion, manifest_hash, say)
    finally:
        lease.release()


@dataclass
class _Evaluation:
    """Candidate and champion (EMA weights) on the same val split, same fixed draws; with
    ``retrain.metric`` other than val_loss also that metric, on the same seeds and reference.
    """

    candidate: float
    champion: float | None
    images: int  # validation images
    margin: float
    metric: str = "val_loss"  # what decides
    candidate_metric: float | None = None  # the deciding metric, when not val_loss
    champion_metric: float | None = None

    def deciding(self) -> tuple[str, float, float | None]:
        """``(metric, candidate, champion)`` of the figure that decides."""
        if self.metric == "val_loss" or self.candidate_metric is None:
            return "val_loss", self.candidate, self.champion
        return self.metric, self.candidate_metric, self.champion_metric

    def verdict(self, base: str) -> tuple[bool, str]:
        """``(better, reason it is not)``: better when cand < champ - margin (or no champ)."""
        metric, cand, champ = self.deciding()
        if champ is None or cand < champ - self.margin:
            return True, ""
        reason = (
            f"{metric} {cand:.5f} is not below the champion's (version {base}) "
            f"{champ:.5f} - margin {self.margin:g}"
        )
        if metric != "val_loss" and self.champion is not None:
            reason += f" (val_loss {self.candidate:.5f} vs {self.champion:.5f})"
        return False, reason

    def tags(self) -> dict[str, str]:
        """Version tags: val loss always, the deciding metric of both when it is another."""
        tags = {
            "val_loss": f"{self.candidate:.6g}",
            TAG_CHAMPION_VAL: "" if self.champion is None else f"{self.champion:.6g}",
            "fmpipe.retrain.metric": self.metric,
        }
        if self.metric != "val_loss" and self.candidate_metric is not None:
            tags[self.metric] = f"{self.candidate_metric:.6g}"
            champ = self.champion_metric
            tags[f"champion_{self.metric}"] = "" if champ is None else f"{champ:.6g}"
        return tags


def _train_candidate(
    cfg: Config, cand: Config, champion: Champion | None, init: str, champion_dir: Path | None,
    say: Callable[[str], None],
) -> Any:  # fmt: skip
    """Train the candidate run: from the champion's weights, or from scratch."""
    from pipeline.train.spec import InitWeights
    from pipeline.train.trainer import train

    weights = None
    if init == "champion" and champion is not None and champion_dir is not None:
        _adopt_architecture(cand, champion_dir, say)
        source = f"models:/{cfg.train.registered_model_name.strip()}/{champion.version}"
        weights = InitWeights.from_checkpoint(champion_dir, source)
        say(f"[retrain] candidate '{cand.train.run_name}' starts from {source}")
    else:
        say(f"[retrain] candidate '{cand.train.run_name}' trains from scratch")
    return train(cand, init=weights, print_fn=say)


def _evaluate(
    cand: Config, run_id: str, artifact_path: str, champion_dir: Path | None, tmp: str
) -> _Evaluation:
    from pipeline.data.stream import open_dataset
    from pipeline.registry import resolve_model_uri
    from pipeline.train.data import load_val_set

    cand_dir = Path(tmp, "candidate")
    resolve_model_uri(f"runs:/{run_id}/{artifact_path}", cand, dst_dir=cand_dir)
    val = load_val_set(cand, open_dataset(cand, "val"), cand.train.val_max_images)
    cand_val = evaluate_checkpoint(cand_dir, val)
    champ_val = evaluate_checkpoint(champion_dir, val) if champion_dir is not None else None
    ev = _Evaluation(cand_val, champ_val, len(val), cand.retrain.promote_margin,
                     cand.retrain.metric)  # fmt: skip
    if ev.metric != "val_loss":  # same seeds, solver and reference for both
        from pipeline.eval.job import score_models

        models = [str(cand_dir)] + ([str(champion_dir)] if champion_dir is not None else [])
        scores = score_models(cand, ev.metric, models, out_root=str(Path(tmp, "eval")),
                              say=lambda _line: None)  # fmt: skip
        ev.candidate_metric = scores[0].fd
        ev.champion_metric = scores[1].fd if len(scores) > 1 else None
    return ev


def _register(
    client: MlflowClient, tracker: Any, name: str, run_id: str, artifact_path: str,
    tags: dict[str, Any],
) -> str:  # fmt: skip
    """Register the candidate (once, even when re-run after a crash) with its tags."""
    version = find_version(client, name, run_id, artifact_path)
    if version is None:
        return tracker.register_model_version(name, artifact_path, tags)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return version


def _train_evaluate_promote(
    cfg: Config,
    client: MlflowClient,
    lease: Lease,
    champion: Champion | None,
    manifest_hash: str,
    say: Callable[[str], None],
) -> RetrainResult:
    from pipeline.redact import scrub
    from pipeline.registry import resolve_model_uri
    from pipeline.tracking import Tracker, tracking_uri

    name, alias = cfg.train.registered_model_name.strip(), cfg.retrain.alias
    init = "champion" if champion is not None and not cfg.retrain.from_scratch else "scratch"
    cand = _candidate_config(cfg, manifest_hash, champion, init)
    base = champion.version if champion else "none"
    say(
        f"[retrain] new data: dataset {manifest_hash[:12]}"
        + (
            f" vs {name}@{alias} = version {champion.version} "
            f"(dataset {champion.manifest_hash[:12] or 'unknown'})"
            if champion
            else f" and no {name}@{alias} yet"
        )
    )
    with tempfile.TemporaryDirectory(prefix="fmpipe-retrain-") as tmp:
        champion_dir: Path | None = None
        if champion is not None:
            champion_dir = Path(tmp, "champion")
            resolve_model_uri(f"models:/{name}/{champion.version}", cfg, dst_dir=champion_dir)
        result = _train_candidate(cfg, cand, champion, init, champion_dir, say)
        run_id = result.mlflow_run_id
        if not run_id:
            raise RuntimeError("the candidate run has no MLflow run id; cannot register it")
        artifact_path = str(
            result.metrics.get("checkpoint_artifacts")
            or f"{_CHECKPOINT_ARTIFACTS}/images_{result.images_seen:012d}"
        )
        ev = _evaluate(cand, run_id, artifact_path, champion_dir, tmp)
    say(
        f"[retrain] val_loss on {ev.images} images: candidate {ev.candidate:.5f}"
        + (f", champion {ev.champion:.5f}" if ev.champion is not None else "")
        + f" (margin {ev.margin:g})"
    )
    if ev.candidate_metric is not None:
        say(
            f"[retrain] {ev.metric} of {cand.eval.num_samples} samples: candidate "
            f"{ev.candidate_metric:.5f}"
            + (f", champion {ev.champion_metric:.5f}" if ev.champion_metric is not None else "")
        )

    tracker = Tracker(client, run_id, tracking_uri(cfg))
    tags = {
        "manifest_hash": manifest_hash,
        "images_seen": result.images_seen,
        **ev.tags(),
        "run_name": cand.train.run_name,
        TAG_BASE: base,
        TAG_INIT: init,
        "fmpipe.retrain.margin": f"{ev.margin:g}",
        TAG_DECISION: "pending",
    }
    version = _register(client, tracker, name, run_id, artifact_path, tags)

    # ---- decide, then compare-and-set the alias under the lease
    better, reason = ev.verdict(base)
    status = "not_better"
    if better:
        status, reason = promote_if_unchanged(
            client, name, alias, version, champion.version if champion else None, lease
        )
    promoted = status == "promoted"
    # a lost lease is no verdict on the candidate: "aborted" lets the next run decide again
    decision = "promoted" if promoted else "aborted" if status == "lease_lost" else "rejected"
    client.set_model_version_tag(name, version, TAG_DECISION, decision)
    if not promoted:
        client.set_model_version_tag(name, version, TAG_REJECTED, scrub(reason))
    metrics = {"retrain/candidate_val_loss": ev.candidate, "retrain/promoted": float(promoted)}
    if ev.champion is not None:
        metrics["retrain/champion_val_loss"] = ev.champion
    if ev.candidate_metric is not None:
        metrics[f"retrain/candidate_{ev.metric}"] = ev.candidate_metric
        if ev.champion_metric is not None:
            metrics[f"retrain/champion_{ev.metric}"] = ev.champion_metric
    tracker.log_metrics(metrics, step=result.images_seen)
    tracker.set_tags(
        {"fmpipe.job": "retrain", TAG_DECISION: decision, "fmpipe.retrain.version": version,
         TAG_BASE: base}
    )  # fmt: skip
    if promoted:
        metric, cand_figure, champ_figure = ev.deciding()
        message = f"promoted {name} version {version} to '{alias}' ({metric} {cand_figure:.5f}"
        message += (
            f" < {champ_figure:.5f} - {ev.margin:g}, was version {base})"
            if champ_figure is not None
            else ")"
        )
    else:
        now_at = alias_version(client, name, alias) or "none"
        message = f"rejected {name} version {version}: {reason}; '{alias}' is at version {now_at}"
    say(f"[retrain] {message}")
    record_outcome(client, name, decision, message)
    return RetrainResult(
        "promoted" if promoted else "rejected",
        message,
        name,
        manifest_hash,
        champion_version=champion.version if champion else None,
        candidate_version=version,
        candidate_val_loss=ev.candidate,
        champion_val_loss=ev.champion,
        run_name=cand.train.run_name,
        mlflow_run_id=run_id,
    )
