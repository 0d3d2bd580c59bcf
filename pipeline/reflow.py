"""`fmpipe reflow`: a k-rectified flow from a base model's own couplings, end to end.

1. **Pairs.** ``reflow.num_pairs`` samples of ``reflow.base`` with ``sample.pairs``: each
   sample's float32 ``x_1`` is kept and its ``x_0`` is the sampler's noise of
   ``(sample.seed, index)`` (:mod:`pipeline.data.pairs`). Written by the sample job itself
   (Ray actor pool, resumable shard by shard) into ``reflow.pairs_out``, by default
   ``<train.storage_path>/reflow-pairs/<base digest>-<sampler>-<N>``: a re-run finds the
   complete set there and reuses it; an interrupted one finishes its missing shards.
2. **Training.** The Ray Train loop on ``data.pairs`` (the fixed coupling, no noise drawn),
   from the weights that made the pairs (the base's EMA unless ``sample.use_ema=false``),
   with the base's architecture and image shape. ``train.*`` as for any run; an empty
   ``train.run_name`` (``jobs/configs/reflow.yaml``) becomes ``reflow-<base>-k<k>-p<pairs>``
   (the pair set's URI digest), so a re-run resumes it, a reflow on other pairs starts its
   own run, and a reflow never continues the base's own run.
3. **Lineage.** The run and the registered version (``train.registered_model_name``,
   default the base's registered name) carry ``fmpipe.reflow.k`` (the base's k + 1),
   ``fmpipe.reflow.base`` and the pair set's own tags (set, seed, solver, steps).

``train.objective=distill`` (``--distill K``) trains a K-step student on the same pairs
instead (:mod:`pipeline.flow.distill`): run ``distill-<base>-<K>step-<loss>-<states>-p<pairs>``,
the teacher's k, and tags ``fmpipe.distill.steps`` / ``.loss`` / ``.states`` and the sampling
rule it is meant for (``fmpipe.sample.solver=euler``, ``fmpipe.sample.steps=K``).

The math is :mod:`pipeline.flow.reflow`.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.home import storage_path

__all__ = ["ReflowResult", "default_pairs_uri", "reflow"]

K_TAG = "fmpipe.reflow.k"


@dataclass
class ReflowResult:
    """What one ``fmpipe reflow`` produced."""

    base: str  # the base model as given
    k: int  # this flow's rectification count (the base's + 1)
    pairs_uri: str
    pairs_sampled: int  # pairs written by this run (0: the set was already complete)
    num_pairs: int
    train: Any  # pipeline.train.trainer.TrainResult

    def summary_lines(self) -> list[str]:
        made = f"{self.pairs_sampled:,} sampled now" if self.pairs_sampled else "reused"
        lines = [
            "",
            f"reflow k={self.k} of {self.base}",
            f"  pairs            {self.num_pairs:,} at {self.pairs_uri} ({made})",
        ]
        lines += ["  " + line for line in self.train.summary().splitlines()]
        return lines


@dataclass
class _Base:
    uri: str
    directory: Path
    name: str | None
    version: str | None
    k: int  # the base's own rectification count (0 for a model trained on data)


def _open_base(cfg: Config, into: Path) -> _Base:
    """The base checkpoint as a local directory, with its registry name, version and k."""
    from pipeline.registry import resolve_model_uri
    from pipeline.sample.source import download_checkpoint

    uri = cfg.reflow.base.strip()
    if not uri:
        raise ConfigError(
            "reflow.base is empty: give the model to straighten (--base models:/<name>@<alias>, "
            "models:/<name>/<version> or a checkpoint directory)"
        )
    resolved = resolve_model_uri(uri, cfg)
    location = resolved.checkpoint_uri
    if location.startswith("s3://"):
        directory = download_checkpoint(location, cfg, into / "base")
    else:
        directory = Path(location.removeprefix("file://")).expanduser()
    try:
        k = int(resolved.tags.get(K_TAG, "0") or 0)
    except ValueError:
        k = 0
    return _Base(uri, directory, resolved.name, resolved.version, k)


def default_pairs_uri(cfg: Config, digest: str) -> str:
    """``<train.storage_path>/reflow-pairs/<digest[:12]>-<sampler>-n<N>``: one set per base
    weights and sampler settings, so a re-run finds its own set and another sampler its own."""
    s = cfg.sample
    sampler = f"s{s.seed}-{s.solver}{s.steps}-g{s.guidance_scale:g}"
    if s.label is not None:
        sampler += f"-y{s.label}"
    tag = hashlib.sha256(f"{sampler}|{s.precision}|{s.use_ema}".encode()).hexdigest()[:6]
    name = f"{digest[:12]}-{sampler}-{tag}-n{cfg.reflow.num_pairs}"
    return f"{storage_path(cfg).rstrip('/')}/reflow-pairs/{name}"


def _pairs(cfg: Config, base: _Base, say: Callable[[str], None]) -> tuple[str, int]:
    """The complete coupled set of the base: found, or sampled now. ``(uri, pairs written)``."""
    from pipeline.data.pairs import PairSetError, open_pair_set
    from pipeline.sample import generate
    from pipeline.sample.source import load_model_source
    from pipeline.storage import resolve

    scfg = cfg.model_copy(deep=True)
    scfg.sample.model = base.uri
    source = load_model_source(scfg)  # named as given: the set's manifest says which model
    out = cfg.reflow.pairs_out.strip() or default_pairs_uri(cfg, source.digest)
    try:
        found = open_pair_set(resolve(out, cfg.storage))
        same_model = found.manifest.extra.get("model_digest") == source.digest
        if same_model and found.num_pairs == cfg.reflow.num_pairs:
            say(f"[reflow] {found.num_pairs:,} pairs of {base.uri} already at {out}")
            return out, 0
    except PairSetError:
        pass  # not there or unfinished: the sample job writes (or finishes) it
    scfg.sample.out = out
    scfg.sample.pairs = True
    scfg.sample.num_samples = cfg.reflow.num_pairs
    say(f"[reflow] sampling {cfg.reflow.num_pairs:,} pairs of {base.uri} into {out}")
    result = generate(scfg, source=source, track=False, log_line=say)
    return out, int(result.samples_written)


def _train_config(cfg: Config, base: _Base, pairs_uri: str, own: Config | None = None) -> Config:
    """The run's config: the base's network and image shape (``own``: the base checkpoint's
    config, read here when not given), the pairs as its data."""
    if own is None:
        from pipeline.checkpoint import load_checkpoint

        own = load_checkpoint(base.directory).config
    tcfg = cfg.model_copy(deep=True)
    tcfg.model = own.model.model_copy(deep=True)
    tcfg.data.resolution, tcfg.data.channels = own.data.resolution, own.data.channels
    tcfg.data.pairs = pairs_uri
    if not cfg.train.run_name.strip():  # jobs/configs/reflow.yaml: never the base's run
        stem = f"{base.name}-v{base.version}" if base.name else Path(base.uri).name
        # the pair set's own digest too: the same command resumes its run, and other pairs
        # (another reflow.num_pairs or sampler) start a run of their own instead of meeting
        # one that cannot resume on them
        pairs = hashlib.sha256(pairs_uri.encode()).hexdigest()[:8]
        tcfg.train.run_name = (
            f"{_kind(cfg)}-{stem}-"
            + (f"{cfg.train.distill_steps}step" if _distilling(cfg) else f"k{base.k + 1}")
            + "".join(f"-{setting}" for setting in _student_variant(cfg))
            + f"-p{pairs}"
        )
    if not tcfg.train.registered_model_name.strip() and base.name:
        tcfg.train.registered_model_name = base.name
    return tcfg


def _student_variant(cfg: Config) -> list[str]:
    """A student's loss and states, which its run name says: another choice on the same
    pairs is a run of its own, not one to resume (nor one a resume would refuse)."""
    if not _distilling(cfg):
        return []
    return [cfg.train.distill_loss, cfg.train.distill_states]


def _distilling(cfg: Config) -> bool:
    return cfg.train.objective == "distill"


def _kind(cfg: Config) -> str:
    return "distill" if _distilling(cfg) else "reflow"


def _lineage(cfg: Config, base: _Base) -> dict[str, str]:
    """Tags of the run and version: k (a student keeps its teacher's k), the base, and a
    student's own sampling rule (Euler with its k steps)."""
    from pipeline.sample.source import SOLVER_TAG, STEPS_TAG
    from pipeline.train.objective import Objective

    tags = {
        K_TAG: str(base.k if _distilling(cfg) else base.k + 1),
        "fmpipe.reflow.base": base.uri,
        "fmpipe.reflow.base_version": base.version or "",
    }
    rule = Objective.from_config(cfg.train).sampling_rule()
    if rule is not None:  # a student
        tags |= {
            "fmpipe.distill.steps": str(cfg.train.distill_steps),
            "fmpipe.distill.loss": cfg.train.distill_loss,
            "fmpipe.distill.states": cfg.train.distill_states,
            SOLVER_TAG: rule[0],
            STEPS_TAG: str(rule[1]),
        }
    return tags


def reflow(cfg: Config, *, print_fn: Callable[[str], None] | None = print) -> ReflowResult:
    """Sample the base's pairs (or reuse them), train the rectified flow, register it.

    Raises:
        ConfigError: no ``reflow.base``, or train settings that break the coupling.
        pipeline.registry.ModelNotFound, pipeline.checkpoint.CheckpointError: a bad base.
    """
    from pipeline.checkpoint import load_checkpoint
    from pipeline.train.spec import InitWeights
    from pipeline.train.trainer import train

    say = print_fn or (lambda _line: None)
    with tempfile.TemporaryDirectory(prefix="fmpipe-reflow-") as tmp:
        base = _open_base(cfg, Path(tmp))
        pairs_uri, sampled = _pairs(cfg, base, say)
        loaded = load_checkpoint(base.directory)  # once: its config and its weights
        tcfg = _train_config(cfg, base, pairs_uri, loaded.config)
        made_by = loaded.ema if cfg.sample.use_ema and loaded.ema is not None else loaded.model
        init = InitWeights(source=base.uri, model=made_by, ema=made_by)
        lineage = _lineage(cfg, base)
        k = int(lineage[K_TAG])
        what = f"a {cfg.train.distill_steps}-step student" if _distilling(cfg) else f"k={k}"
        say(f"[reflow] training '{tcfg.train.run_name}' ({what}) from {base.uri}")
        result = train(tcfg, init=init, print_fn=say, lineage=lineage)
    # _pairs returned a complete set of exactly reflow.num_pairs (found, or written now)
    return ReflowResult(base.uri, k, pairs_uri, sampled, cfg.reflow.num_pairs, result)
