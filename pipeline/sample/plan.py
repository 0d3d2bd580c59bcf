"""Step 1 of ``fmpipe sample``: decide what the job will do, before any Ray work.

:func:`plan_job` resolves the model, checks the sampling settings against it, resolves and
checks the output location, fixes the job's identity (and refuses an output that holds
another job's samples), and finds the shards already complete there. Everything that can
fail because of the user's input fails here, in seconds, with a message naming the input;
the result, a :class:`SamplePlan`, is what the run and finalize steps work from.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import Config
from pipeline.data.manifest import ShardInfo, shard_name
from pipeline.flow.solvers import effective_steps, effective_tolerances
from pipeline.home import sample_out
from pipeline.sample.determinism import default_block_size, shard_ranges
from pipeline.sample.sampler import SamplerSettings
from pipeline.sample.shards import check_shard, sample_key
from pipeline.sample.source import ModelSource, load_model_source

if TYPE_CHECKING:
    from pipeline.storage import Location

__all__ = [
    "JOB_FILE",
    "SampleJobError",
    "SamplePlan",
    "job_identity",
    "plan_job",
    "sampler_settings",
    "validate_settings",
]

log = logging.getLogger(__name__)

JOB_FILE = "_sample_job.json"
_READ_THREADS = 8  # existing shards are read back in parallel (object storage latency)
# Sample metadata that may differ between shards of one job: per sample, or naming the
# model by a URI that can change (an alias) while the weights stay the same.
_META_FREE = ("index", "label", "model", "model_version")


class SampleJobError(ValueError):
    """The job cannot run as asked (settings that clash with the model or the output)."""


@dataclass
class SamplePlan:
    """What the job will do: the output, its shards, which are done, and the actor settings."""

    source: ModelSource  # the network and what to say about it
    out: Location  # the output root (checked writable)
    block_size: int  # samples per compute block (part of the identity)
    identity: dict[str, Any]  # what makes two runs the same job (_sample_job.json)
    ranges: list[tuple[int, int]]  # shard j holds samples [ranges[j][0], ranges[j][1])
    settings: SamplerSettings  # pickled to every actor
    done: dict[int, ShardInfo]  # shards already complete under their final name
    todo: list[tuple[int, int, int]]  # (shard, start, stop) still to write


# --------------------------------------------------------------------------- checks


def validate_settings(cfg: Config, source: ModelSource) -> None:
    """Refuse ``cfg.sample`` settings that the model cannot honour, before any work.

    The model must make images (C, H, W) with C = 1 or 3; ``sample.label`` must be one of
    its classes; a label or a guidance scale other than 1 needs a class-conditional model.
    ``fmpipe bench sample`` calls it too, so both commands refuse the same settings.

    Raises:
        SampleJobError: naming the setting and what the model allows.
    """
    s = cfg.sample
    shape = tuple(source.data_shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise SampleJobError(
            f"model {source.uri} produces samples of shape {shape}; fmpipe sample writes images "
            "and needs (C, H, W) with C = 1 or 3"
        )
    if source.num_classes:
        if s.label is not None and not 0 <= s.label < source.num_classes:
            raise SampleJobError(
                f"sample.label={s.label} is not a class of model {source.label} "
                f"(classes 0..{source.num_classes - 1})"
            )
    else:
        if s.label is not None:
            raise SampleJobError(
                f"sample.label={s.label} given, but model {source.label} is unconditional"
            )
        if s.guidance_scale != 1.0:
            raise SampleJobError(
                f"sample.guidance_scale={s.guidance_scale} needs a class-conditional model; "
                f"model {source.label} is unconditional"
            )


def job_identity(cfg: Config, source: ModelSource, block_size: int) -> dict[str, Any]:
    """Every setting that changes a sample's bits: two runs with equal identities are one job.

    Settings the solver ignores are recorded as None (:func:`effective_steps`), so e.g. a
    dopri5 job does not change identity when ``sample.steps`` does.
    """
    s = cfg.sample
    tolerances = effective_tolerances(s.solver, s.atol, s.rtol)
    return {
        "format": "fmpipe-sample-job/1",
        "model_digest": source.digest,
        "data_shape": list(source.data_shape),
        "num_classes": source.num_classes,
        "seed": s.seed,
        "solver": s.solver,
        "steps": effective_steps(s.solver, s.steps),
        "atol": tolerances[0] if tolerances else None,
        "rtol": tolerances[1] if tolerances else None,
        "guidance_scale": s.guidance_scale if source.num_classes else None,
        "label": s.label,
        "num_samples": s.num_samples,
        "shard_size": s.shard_size,
        "block_size": block_size,
        "device": "cuda" if s.use_gpu else "cpu",
        # the network's memory layout (prepare_model) changes the last bits of samples
        "layout": "as-built" if s.use_gpu else "channels-last",
        **({"pairs": True} if s.pairs else {}),  # absent when off: older job files still match
    }


def sampler_settings(
    cfg: Config, source: ModelSource, out: Location | None, block: int
) -> SamplerSettings:
    """The :class:`SamplerSettings` every actor gets (plain data, pickled). ``out``: where
    the shards go; None for settings that only integrate (``fmpipe bench sample``)."""
    from pipeline.storage import s3_endpoint

    s = cfg.sample
    storage = cfg.storage.model_dump()
    if out is not None and out.is_s3:  # actors use the endpoint the driver resolved
        storage["endpoint_url"] = s3_endpoint(cfg.storage) or ""
    return SamplerSettings(
        seed=s.seed,
        solver=s.solver,
        steps=s.steps,
        atol=s.atol,
        rtol=s.rtol,
        guidance_scale=s.guidance_scale,
        label=s.label,
        num_classes=source.num_classes,
        data_shape=tuple(source.data_shape),
        block_size=block,
        chunk_size=s.batch_size,
        use_gpu=s.use_gpu,
        precision=s.precision,
        out_uri=out.uri if out is not None else "",
        class_names=tuple(source.class_names),
        pairs=s.pairs,
        storage=storage,
        meta={
            "model": source.uri,
            "model_version": source.version,
            "model_digest": source.digest[:16],
        },
    )


# --------------------------------------------------------------------------- the output


def _check_job_file(out: Location, identity: dict[str, Any], source: ModelSource) -> list[str]:
    """Write ``_sample_job.json`` or refuse when the one there describes another job.

    Returns the identity keys the file there does not record at all (it was written by an
    older fmpipe, before those keys existed): the caller may finish reading such an output,
    but must not add samples to it (:func:`_refuse_to_mix`).
    """
    location = out.child(JOB_FILE)
    if location.exists():
        try:
            previous = json.loads(location.read_bytes())
        except ValueError:
            previous = {}
        prior = previous.get("identity", {})
        unrecorded = sorted(k for k in identity if prior and k not in prior)
        changed = sorted(k for k in identity if k not in unrecorded and prior.get(k) != identity[k])
        changed += sorted(k for k in prior if k not in identity)  # e.g. pairs there, not now
        if changed:
            shown = "; ".join(
                f"{k}: {prior.get(k)!r} there, {identity.get(k)!r} now" for k in changed
            )
            raise SampleJobError(
                f"output {out.uri} already holds samples of another job ({shown}); use another "
                f"--out, or delete {out.uri} to start over"
            )
        return unrecorded
    body = {"identity": identity, "model": source.describe()}
    location.write_bytes((json.dumps(body, indent=1, sort_keys=True) + "\n").encode())
    return []


def _refuse_to_mix(out: Location, unrecorded: list[str], missing_shards: int) -> None:
    """An older fmpipe's output: complete, it is used as it is; incomplete, it is refused."""
    if unrecorded and missing_shards:
        raise SampleJobError(
            f"output {out.uri} was started by an older fmpipe, which did not record "
            f"{', '.join(unrecorded)}; its {missing_shards} missing shard(s) would not match "
            f"the shards there bit for bit. Use another --out, or delete {out.uri} to start over"
        )


def _existing_shards(
    out: Location,
    ranges: list[tuple[int, int]],
    conditional: bool,
    expect: dict[str, Any],
    pairs: bool = False,
) -> tuple[dict[int, ShardInfo], list[int]]:
    """Shards already complete under their final name, and the broken ones (to redo)."""
    present = set(out.list_names(".tar"))
    wanted = [j for j in range(len(ranges)) if shard_name(j) in present]

    def inspect(j: int) -> tuple[int, Any]:
        a, b = ranges[j]
        data = out.child(shard_name(j)).read_bytes()
        return j, check_shard(data, a, b, conditional, expect, pairs=pairs)

    done: dict[int, ShardInfo] = {}
    broken: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        for j, check in pool.map(inspect, wanted):
            if check.ok:
                done[j] = ShardInfo(
                    shard_name(j), check.num_samples, check.sha256, sample_key(ranges[j][0])
                )
            else:
                log.warning(
                    "shard %s at %s is broken (%s): writing it again",
                    shard_name(j),
                    out.uri,
                    check.problem,
                )
                broken.append(j)
    return done, broken


def _output(cfg: Config, source: ModelSource) -> Location:
    """``sample.out`` (default ``$FMPIPE_HOME/store/samples/<model>``), checked writable."""
    from pipeline.storage import check_access, resolve

    out = resolve(sample_out(cfg, source.name or "model"), cfg.storage)
    check_access(out, must_exist=False)
    return out


# --------------------------------------------------------------------------- the plan


def plan_job(
    cfg: Config,
    source: ModelSource | None,
    block_size: int | None,
    say: Callable[[str], None],
) -> SamplePlan:
    """Validate, resolve the model and the output, fix the job's identity, find what is done.

    ``source``: the network, or None to resolve ``cfg.sample.model``. ``block_size``: None
    for the device's default. Writes ``<out>/_sample_job.json`` on a new output.

    Raises:
        pipeline.registry.ModelNotFound, pipeline.checkpoint.CheckpointError: bad model.
        pipeline.storage.StorageError: the output cannot be used.
        SampleJobError: settings that clash with the model or with the output's earlier job.
    """
    s = cfg.sample
    if source is None:
        source = load_model_source(cfg)
    validate_settings(cfg, source)
    out = _output(cfg, source)
    block = int(block_size or default_block_size("cuda" if s.use_gpu else "cpu"))
    if block < 1:
        raise SampleJobError(f"block_size must be >= 1, got {block}")
    say(f"model: {source.label} ({source.checkpoint or source.uri}), output: {out.uri}")

    identity = job_identity(cfg, source, block)
    unrecorded = _check_job_file(out, identity, source)
    ranges = shard_ranges(s.num_samples, s.shard_size)
    settings = sampler_settings(cfg, source, out, block)
    # Existing shards must come from these weights and settings (the URI naming them may differ).
    expect = {k: v for k, v in settings.sample_meta(0, None).items() if k not in _META_FREE}
    done, _broken = _existing_shards(
        out, ranges, source.num_classes > 0, expect, pairs=settings.pairs
    )
    todo = [(j, a, b) for j, (a, b) in enumerate(ranges) if j not in done]
    _refuse_to_mix(out, unrecorded, len(todo))
    if done:
        say(f"{len(done)} of {len(ranges)} shards already at {out.uri}; writing {len(todo)}")
    return SamplePlan(source, out, block, identity, ranges, settings, done, todo)
