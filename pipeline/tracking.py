"""MLflow tracking: one run per training (or sampling) job, written from rank 0 only.

Where the tracking server is (:func:`tracking_uri`): ``MLFLOW_TRACKING_URI`` wins, then
``tracking.uri`` from the config, else the embedded default, a sqlite file
``$FMPIPE_HOME/mlflow.db`` with artifacts in ``$FMPIPE_HOME/mlartifacts`` (MLflow 3.x refuses
the plain file store, so even the embedded default is sqlite).

:class:`Tracker` talks to MLflow through an explicit :class:`mlflow.MlflowClient` bound to a
run id, never through the fluent ``mlflow.start_run`` state: Ray workers are long-lived
processes that may run several jobs, and a global "active run" would leak between them.
Ranks other than 0 get :meth:`Tracker.disabled`, whose methods do nothing, so training code
calls the tracker unconditionally.

Models are not logged with ``mlflow.<flavor>.log_model`` (MLflow 3.x defaults to a
``torch.export`` format that needs an input example, and a sampler is an ODE loop rather than
one forward call). A checkpoint directory is logged as plain run artifacts and registered as
a model version whose source is that artifact directory; :mod:`pipeline.registry` looks
versions and aliases up and turns ``models:/<name>@<alias>`` or ``models:/<name>/<version>``
back into a local directory.

Credentials never reach MLflow: :func:`pipeline.redact.scrub` removes every secret it knows
(credential variables, the Ray token, ``user:password@`` in URLs, ...) from every param value,
tag and text written here, and param or tag keys that look like credentials are refused.
:func:`standard_tags` (git commit, package versions) comes from :mod:`pipeline.provenance`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import Config
from pipeline.home import embedded_tracking_uri
from pipeline.provenance import git_commit, standard_tags
from pipeline.redact import looks_like_secret_key, scrub

if TYPE_CHECKING:  # mlflow takes ~2 s to import: only the functions that talk to it import it
    from mlflow import MlflowClient

__all__ = [
    "Tracker",
    "TrackingUnreachable",
    "check_reachable",
    "embedded_tracking_uri",
    "find_run_id",
    "standard_tags",
    "tracking_uri",
]

log = logging.getLogger(__name__)

# MLflow limits (mlflow.utils.validation): a param value is at most 6000 characters, a tag
# value 8000, a key 250; one log_batch takes at most 100 params/tags and 1000 metrics.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
REGISTER_TIMEOUT_S = 300.0  # wait this long for a model version to become READY

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
_TRUNCATED = "...[truncated]"


# --------------------------------------------------------------------------- secrets


def _check_key(key: str, what: str) -> str:
    key = str(key)
    if looks_like_secret_key(key):
        raise ValueError(
            f"refusing to log {what} '{key}': the key looks like a credential; credentials come "
            "from the AWS chain / environment and are never tracked"
        )
    if not key or len(key) > MAX_KEY:
        raise ValueError(f"{what} key must be 1 to {MAX_KEY} characters, got {len(key)}: {key!r}")
    return key


def _limit(value: str, limit: int) -> str:
    """Cut ``value`` to ``limit`` characters, marking the cut (deterministic, for resume)."""
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNCATED)] + _TRUNCATED


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(str(v) for v in value) + "]"
    else:
        text = str(value)
    return _limit(scrub(text), MAX_PARAM_VALUE)


def _tag_value(value: Any) -> str:
    return _limit(scrub(str(value)), MAX_TAG_VALUE)


# --------------------------------------------------------------------------- where MLflow is


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` > ``cfg.tracking.uri`` > the embedded sqlite default."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if cfg.tracking.uri.strip():
        return cfg.tracking.uri.strip()
    return embedded_tracking_uri()


def _local_sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for servers and in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path("/" + path.lstrip("/")) if uri.startswith("sqlite:////") else Path(path)


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifact root for a new experiment: beside a local sqlite db, else the server's choice.

    For the embedded default that is ``<FMPIPE_HOME>/mlartifacts/<experiment>``.
    """
    db = _local_sqlite_path(uri)
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    root = db.absolute().parent / "mlartifacts" / safe
    root.mkdir(parents=True, exist_ok=True)
    return root.as_uri()


class TrackingUnreachable(RuntimeError):
    """The tracking server did not answer at all (refused, unknown host, timed out): a job
    fails at once, exit 1 (running it again once the server is up may succeed)."""


_ANSWERED: set[str] = set()  # server URIs that answered in this process
_PROBE_TRIES, _PROBE_TIMEOUT_S = 2, 10.0


def check_reachable(uri: str) -> None:
    """Raise :class:`TrackingUnreachable` in one line when an ``http(s)://`` tracking server
    does not answer; nothing for sqlite or file stores, or a server already heard from.

    MLflow's client retries a refused connection 7 times with exponential backoff before
    it gives up (about 4 minutes, a urllib3 warning on the console per try); a job's driver
    asks once, up front, with a short timeout. Any HTTP answer (401, 404 too) or a TLS
    error (MLflow's own certificate settings may differ) counts as an answer.
    """
    if not uri.startswith(("http://", "https://")) or uri in _ANSWERED:
        return
    import requests

    problem = ""
    for attempt in range(_PROBE_TRIES):
        if attempt:
            time.sleep(1.0)
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=_PROBE_TIMEOUT_S)
        except requests.exceptions.SSLError:
            break
        except (requests.ConnectionError, requests.Timeout) as exc:
            problem = _connection_problem(exc)
            continue
        break
    else:
        raise TrackingUnreachable(
            f"MLflow tracking server {scrub(uri)} cannot be reached ({problem}): start it, or "
            "point tracking.uri / MLFLOW_TRACKING_URI at one that runs"
        )
    _ANSWERED.add(uri)


def _connection_problem(exc: BaseException) -> str:
    """The innermost reason of a requests connection error, in a few words."""
    text = str(exc)
    for needle, words in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("Temporary failure in name resolution", "unknown host"),
        ("timed out", f"no answer in {_PROBE_TIMEOUT_S:g} s"),
    ):
        if needle in text:
            return words
    return type(exc).__name__


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


def _get_or_create_experiment(client: MlflowClient, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException as exc:  # created concurrently by another process
            if "ALREADY_EXISTS" not in _error_code(exc):
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        log.warning("MLflow experiment '%s' was deleted; restoring it", name)
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


# --------------------------------------------------------------------------- the tracker


def find_run_id(
    cfg: Config, *, experiment: str, run_name: str, tags: Mapping[str, str] | None = None
) -> str | None:
    """The newest run named ``run_name`` (and carrying ``tags``) in ``experiment``, or None.

    For a restarted job that did not keep its run id: pass the result to
    :meth:`Tracker.start` as ``run_id`` to continue that run.
    """
    client = _client(tracking_uri(cfg))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None

    def quote(value: str) -> str:
        return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"

    clauses = [f"attributes.run_name = {quote(run_name)}"]
    clauses += [f"tags.`{k}` = {quote(v)}" for k, v in (tags or {}).items()]
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


# A tracker that tolerates outages (`Tracker.tolerate_outages`) makes each MLflow request
# short: MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) hold one call, and
# with it the training step that made it, for minutes when the server is down.
_OUTAGE_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
MAX_PENDING_METRICS = 200_000  # kept through an outage (~20 MB); older ones are dropped


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking server or its artifact store cannot be reached
    (connection refused or reset, a timeout, a 5xx), rather than that a request was wrong
    (a 4xx: an invalid metric, a deleted run), which stays an error."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        text = str(exc)
        return status >= 500 or "Max retries exceeded" in text or "failed with exception" in text
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    return isinstance(exc, BotoCoreError)


class _Outage:
    """What a tolerant tracker does while MLflow is down: metrics wait (in order, up to
    :data:`MAX_PENDING_METRICS`) and go out with the first call that gets through; grids
    and other artifacts of the outage are skipped and counted; a call is tried again every
    ``retry_every_s`` at most, so training is not held up by each one."""

    def __init__(self, where: str, retry_every_s: float) -> None:
        self.where, self.retry_every_s = where, retry_every_s
        self.pending: list[Any] = []  # mlflow.entities.Metric, oldest first
        self.down_since: float | None = None
        self.retry_at = 0.0
        self.dropped = 0  # metrics beyond MAX_PENDING_METRICS
        self.skipped = 0  # artifacts not logged

    def _waiting(self) -> bool:
        return self.down_since is not None and time.monotonic() < self.retry_at

    def _went_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning(
                "MLflow at %s cannot be reached (%s); training goes on: metrics are kept and "
                "sent when it is back, sample grids of the outage are skipped",
                self.where, scrub(f"{type(exc).__name__}: {exc}")[:300],
            )  # fmt: skip
        self.retry_at = now + self.retry_every_s

    def _came_back(self, sent: int) -> None:
        if self.down_since is not None:
            log.warning(
                "MLflow at %s is reachable again after %.0f s: %d metric(s) sent late, "
                "%d dropped, %d artifact(s) skipped", self.where,
                time.monotonic() - self.down_since, sent, self.dropped, self.skipped,
            )  # fmt: skip
        self.down_since, self.dropped, self.skipped = None, 0, 0

    def metrics(self, items: list[Any], send: Any) -> None:
        self.pending.extend(items)
        if len(self.pending) > MAX_PENDING_METRICS:
            self.dropped += len(self.pending) - MAX_PENDING_METRICS
            del self.pending[: len(self.pending) - MAX_PENDING_METRICS]
        if self._waiting():
            return
        late = len(self.pending) - len(items)
        try:
            self.send_pending(send)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._went_down(exc)
            return
        self._came_back(max(late, 0))

    def send_pending(self, send: Any) -> None:
        """``send`` the kept metrics batch by batch, each batch dropped once sent, so a
        failure half way never sends one twice; raises what ``send`` raises."""
        while self.pending:
            batch = self.pending[:METRICS_PER_BATCH]
            send(batch)
            del self.pending[: len(batch)]

    def artifact(self, call: Any) -> None:
        if self._waiting():
            self.skipped += 1
            return
        try:
            call()
        except Exception as exc:
            if not is_outage(exc):
                raise
            self.skipped += 1
            self._went_down(exc)


class Tracker:
    """One MLflow run, written through an explicit client. Disabled trackers do nothing.

    >>> tracker = Tracker.start(cfg, experiment="fmpipe", run_name="digits") if rank == 0 \\
    ...     else Tracker.disabled()
    >>> tracker.log_config(cfg); tracker.log_metrics({"train/loss": 0.3}, step=100)
    >>> tracker.end()
    """

    def __init__(self, client: MlflowClient | None, run_id: str | None, uri: str | None) -> None:
        self._client = client
        self._run_id = run_id
        self._uri = uri
        self._ended = False
        self._outage: _Outage | None = None  # set by tolerate_outages()

    # ---- construction

    @classmethod
    def disabled(cls) -> Tracker:
        """A tracker whose methods are no-ops (ranks other than 0, or tracking off)."""
        return cls(None, None, None)

    @classmethod
    def attach(cls, uri: str, run_id: str) -> Tracker:
        """A tracker on run ``run_id``, which another process (the training driver) started
        and will end: no tags set, no status changed, the URI used exactly as given."""
        return cls(_client(uri), run_id, uri)

    @classmethod
    def start(
        cls,
        cfg: Config,
        *,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        enabled: bool = True,
    ) -> Tracker:
        """Continue run ``run_id`` (after a restart) or create a run in ``experiment``.

        ``enabled=False`` returns :meth:`disabled` without contacting MLflow (``enabled=rank
        == 0`` in a training worker). A resumed run that had ended is set RUNNING again.
        """
        if not enabled:
            return cls.disabled()
        from mlflow.exceptions import MlflowException

        uri = tracking_uri(cfg)
        check_reachable(uri)
        client = _client(uri)
        all_tags = {**standard_tags(), **dict(tags or {})}
        if run_id:
            try:
                run = client.get_run(run_id)
            except MlflowException as exc:
                raise ValueError(
                    f"cannot resume MLflow run '{run_id}' at {scrub(uri)}: {scrub(str(exc))}"
                ) from None
            if run.info.lifecycle_stage == "deleted":
                raise ValueError(f"cannot resume MLflow run '{run_id}': the run was deleted")
            experiment_id = run.info.experiment_id
            found = client.get_experiment_by_name(experiment)
            if found is None or found.experiment_id != experiment_id:
                log.warning(
                    "resuming MLflow run %s of experiment id %s, not of '%s'",
                    run_id,
                    experiment_id,
                    experiment,
                )
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            tracker = cls(client, run_id, uri)
            log.info("resumed MLflow run %s (%s)", run_id, run.info.run_name)
        else:
            experiment_id = _get_or_create_experiment(client, uri, experiment)
            run = client.create_run(experiment_id, run_name=run_name)
            tracker = cls(client, run.info.run_id, uri)
            log.info("created MLflow run %s (%s) in '%s'", run.info.run_id, run_name, experiment)
        tracker.set_tags(all_tags)
        return tracker

    def tolerate_outages(self, retry_every_s: float = 30.0, short_requests: bool = True) -> Tracker:
        """From now on a server that cannot be reached does not fail :meth:`log_metrics`,
        :meth:`log_image` or :meth:`log_text`: metrics wait and are sent when it is back,
        artifacts of the outage are skipped (one warning when it starts, one when it ends).
        For a long job whose MLflow is observability, not its output (training: the
        checkpoints are). ``short_requests``: make this process's MLflow requests short
        (fewer retries, a 20 s timeout) unless the ``MLFLOW_HTTP_REQUEST_*`` variables are
        set; for a process that does nothing else with MLflow (a training worker), not for
        one whose later calls must ride out a blip (the driver). Returns self.
        """
        if self._client is not None and self._outage is None:
            for key, value in _OUTAGE_HTTP_ENV.items() if short_requests else ():
                os.environ.setdefault(key, value)
            self._outage = _Outage(scrub(str(self._uri)), retry_every_s)
        return self

    def flush(self) -> None:
        """Send the metrics an outage kept, now; raises if the server still cannot be
        reached (call before what must not be lost, such as the final model's artifacts)."""
        outage = self._outage
        if outage is not None and outage.pending:
            late = len(outage.pending)
            outage.send_pending(self._send_metrics)
            outage._came_back(late)

    # ---- properties

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (None when disabled): keep it to resume the same run."""
        return self._run_id

    @property
    def tracking_uri(self) -> str | None:
        return self._uri

    @property
    def client(self) -> MlflowClient | None:
        return self._client

    def artifact_uri(self, artifact_path: str = "") -> str | None:
        """Where this run's artifact ``artifact_path`` lives (s3://, mlflow-artifacts:/, file:)."""
        if self._client is None:
            return None
        root = self._client.get_run(self._run_id).info.artifact_uri.rstrip("/")
        return f"{root}/{artifact_path.strip('/')}" if artifact_path.strip("/") else root

    # ---- params, tags, metrics

    def log_params(self, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        """Log params (values stringified, scrubbed, truncated to MLflow's limit).

        Params already on the run with the same value are skipped (resume); MLflow refuses to
        change a param, so a different value is skipped with a warning, and the conflicts are
        returned as ``{key: (logged, new)}``. Keys that look like credentials raise ValueError.
        """
        wanted = {_check_key(k, "param"): _param_value(v) for k, v in params.items()}
        if self._client is None:
            return {}
        from mlflow.entities import Param

        existing = self._client.get_run(self._run_id).data.params
        conflicts = {
            k: (existing[k], v) for k, v in wanted.items() if k in existing and existing[k] != v
        }
        if conflicts:
            log.warning(
                "MLflow run %s already has different values for %s; params cannot change, "
                "keeping the logged values (the new config is in config.yaml)",
                self._run_id,
                ", ".join(sorted(conflicts)),
            )
        new = [Param(k, v) for k, v in wanted.items() if k not in existing]
        for i in range(0, len(new), PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=new[i : i + PARAMS_PER_BATCH])
        return conflicts

    def log_config(self, cfg: Config) -> dict[str, tuple[str, str]]:
        """``cfg.flat()`` as params and the resolved YAML as artifact ``config.yaml``.

        Returns the params whose value differs from the one logged before (see
        :meth:`log_params`); ``config.yaml`` always holds the latest config.
        """
        conflicts = self.log_params(cfg.flat())
        self.log_text(cfg.to_yaml(), "config.yaml")
        return conflicts

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values scrubbed, truncated; credential-like keys raise ValueError)."""
        from_tags = {_check_key(k, "tag"): _tag_value(v) for k, v in tags.items()}
        if self._client is None or not from_tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in from_tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, tags=items[i : i + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log ``{name: value}`` at ``step`` in one ``log_batch`` (tensors/numpy accepted)."""
        if self._client is None or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            number = float(value.item() if hasattr(value, "item") else value)
            if math.isinf(number):  # MLflow stores inf as +-max float; say so in the log
                log.warning("metric %s is %s at step %d", key, number, step)
            items.append(Metric(str(key), number, now, int(step)))
        if self._outage is not None:
            self._outage.metrics(items, self._send_metrics)
        else:
            self._send_metrics(items)

    def _send_metrics(self, items: list[Any]) -> None:
        for i in range(0, len(items), METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=items[i : i + METRICS_PER_BATCH])

    def last_step(self, key: str) -> int:
        """The highest step at which metric ``key`` was logged in this run; -1 if never.

        A run continued after a restart redoes the steps since its checkpoint; the loop
        skips logging those again, so every step holds one value.
        """
        if self._client is None:
            return -1
        history = self._client.get_metric_history(self._run_id, key)
        return max((int(m.step) for m in history), default=-1)

    # ---- artifacts

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` (scrubbed) as run artifact ``artifact_file`` (e.g. ``notes/a.txt``)."""
        if self._client is None:
            return
        self._artifact(lambda: self._client.log_text(self._run_id, scrub(text), artifact_file))

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Log a PIL image, uint8 array (H,W[,C]) or (C,H,W) tensor as ``artifact_file``.

        Use a PNG path such as ``grids/step_000100.png``: the MLflow UI previews it.
        """
        if self._client is None:
            return
        from pipeline.viz import as_pil

        pil = as_pil(image)
        suffix = Path(artifact_file).suffix or ".png"
        with tempfile.TemporaryDirectory(prefix="fmpipe-img-") as tmp:
            local = Path(tmp) / (Path(artifact_file).stem + suffix)
            pil.save(local)
            parent = str(Path(artifact_file).parent).replace(os.sep, "/")
            where = None if parent in ("", ".") else parent
            self._artifact(
                lambda: self._client.log_artifact(self._run_id, str(local), artifact_path=where)
            )

    def _artifact(self, call: Any) -> None:
        """``call()``; through the outage rule once :meth:`tolerate_outages` was called."""
        if self._outage is not None:
            self._outage.artifact(call)
        else:
            call()

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None):
        """Log one local file under ``artifact_path`` (a directory in the run's artifacts)."""
        if self._client is None:
            return
        self._client.log_artifact(self._run_id, str(local_path), artifact_path=artifact_path)

    def log_artifacts(self, local_dir: str | os.PathLike[str], artifact_path: str | None) -> None:
        """Log the files under ``local_dir`` as run artifacts under ``artifact_path``."""
        if self._client is None:
            return
        if not Path(local_dir).is_dir():
            raise ValueError(f"log_artifacts: '{local_dir}' is not a directory")
        self._client.log_artifacts(self._run_id, str(local_dir), artifact_path=artifact_path)

    def list_artifacts(self, artifact_path: str | None = None) -> list[str]:
        """Paths of the artifacts directly under ``artifact_path`` ([] when disabled)."""
        if self._client is None:
            return []
        return [f.path for f in self._client.list_artifacts(self._run_id, artifact_path)]

    # ---- registry

    def register_model_version(
        self, name: str, artifact_path: str, tags: Mapping[str, Any] | None = None
    ) -> str:
        """Register this run's artifact directory ``artifact_path`` as a version of ``name``.

        Creates the registered model when missing, waits until the version is READY and
        returns its version number ("" when disabled). Every version should point at its own
        artifact directory (e.g. ``checkpoints/images_00200000``): a version is a pointer, so
        logging over the same path later would change what an older version loads.
        """
        version_tags = {"fmpipe.git_commit": git_commit() or "unknown", **dict(tags or {})}
        checked = {_check_key(k, "tag"): _tag_value(v) for k, v in version_tags.items()}
        if self._client is None:
            return ""
        from mlflow.exceptions import MlflowException

        artifact_path = artifact_path.strip("/")
        if not artifact_path or not self._client.list_artifacts(self._run_id, artifact_path):
            raise ValueError(
                f"cannot register '{name}': run {self._run_id} has no artifacts under "
                f"'{artifact_path}'; log the checkpoint directory there first"
            )
        try:
            self._client.create_registered_model(name)
        except MlflowException as exc:
            if "ALREADY_EXISTS" not in _error_code(exc):
                raise
        source = self.artifact_uri(artifact_path)
        mv = self._client.create_model_version(
            name, source, run_id=self._run_id, tags=checked, await_creation_for=0
        )
        deadline = time.monotonic() + REGISTER_TIMEOUT_S
        while mv.status != "READY":
            if mv.status == "FAILED_REGISTRATION":
                raise RuntimeError(
                    f"registering {name} version {mv.version} failed: {mv.status_message}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{name} version {mv.version} not READY after {REGISTER_TIMEOUT_S:.0f} s "
                    f"(status {mv.status})"
                )
            time.sleep(0.5)
            mv = self._client.get_model_version(name, mv.version)
        log.info("registered %s version %s from %s", name, mv.version, source)
        return str(mv.version)

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        """Point alias ``alias`` (e.g. ``champion``) of model ``name`` at ``version``."""
        if self._client is None:
            return
        self._client.set_registered_model_alias(name, alias, str(version))

    # ---- end

    def end(self, status: RunStatus = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED`` (idempotent)."""
        if status not in _END_STATUSES:
            raise ValueError(f"end status must be one of {', '.join(_END_STATUSES)}, not {status}")
        if self._client is None or self._ended:
            return
        self._client.set_terminated(self._run_id, status=status)
        self._ended = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")
