"""``fmpipe bench reflow``: quality against NFE of a base model and its reflow, and the
samples/s each needs for the base's best quality.

1. ``fmpipe reflow`` of the base (its pairs, sampled at ``sample.solver`` x ``sample.steps``,
   timed apart from the training: the pairs are a one-off cost, counted separately).
2. With ``distill_steps`` K > 0, ``fmpipe reflow --distill K``: a K-step student
   (``distill_images`` images) of the reflowed model on its own pairs (at
   ``distill_pair_steps`` Euler steps, default ``sample.steps``), or with
   ``distill_from="base"`` of the base on the pairs step 1 sampled (no new sampling: the
   student's target is then the base's own many-step map, not the reflowed one's).
3. The base, the reflowed model and the student through ``fmpipe eval``'s sweep of several
   models (Euler at each of ``--steps``, ``eval.num_samples`` samples at ``eval.seed``, one
   reference): FD in the dataset classifier's features, recall, conditional accuracy; one
   plot with the three curves, in one MLflow run. With several ``eval_seeds`` the sweep runs
   at each (one MLflow run each) and the figures below are the seeds' means: at a few
   thousand samples one model's FD moves by tens of per cent between seeds, more than the
   differences the verdict is about.
4. Matched quality: the target is the base's FD at its largest step count; each model's
   fewest NFE whose FD is at most that target.
5. Samples/s at those NFE, measured side by side in this process with the sampler's own
   :func:`pipeline.sample.sampler.integrate_range` on the same blocks; the ratio is each
   model's against the base's (the named baseline: the base at its target NFE).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import Config

__all__ = ["Curve", "matched_quality", "mean_over_seeds", "run_reflow_benchmark"]


@dataclass
class Curve:
    name: str
    model: str
    points: list  # pipeline.eval.job.SweepPoint, in steps order

    def fewest_nfe(self, target_fd: float) -> float | None:
        """The smallest NFE whose FD reaches ``target_fd``, or None."""
        hits = [p.nfe for p in self.points if p.scores.fd <= target_fd]
        return min(hits) if hits else None


def mean_over_seeds(sweeps: list[list]) -> list:
    """One sweep (``SweepPoint`` list) whose scores are the means of ``sweeps``, the same
    models and steps evaluated at several seeds (:func:`pipeline.eval.scores.mean_scores`)."""
    from dataclasses import replace

    from pipeline.eval.scores import mean_scores

    keys = [[(p.model, p.solver, p.steps) for p in sweep] for sweep in sweeps]
    if not keys or any(k != keys[0] for k in keys):
        raise ValueError("the sweeps to average must hold the same models and steps")
    return [
        replace(points[0], scores=mean_scores([p.scores for p in points]))
        for points in zip(*sweeps, strict=True)
    ]


def _samples_per_second(cfg: Config, model: str, steps: int, num_samples: int) -> float:
    """The sampler's own integration (Euler, ``steps``) of ``num_samples`` samples, in
    whole blocks, on the CPU with this process's threads."""
    from pipeline.sample.plan import sampler_settings
    from pipeline.sample.sampler import integrate_range, prepare_model
    from pipeline.sample.source import load_model_source

    run = cfg.model_copy(deep=True)
    run.sample.model, run.sample.solver, run.sample.steps = model, "euler", int(steps)
    source = load_model_source(run)
    block = 50
    settings = sampler_settings(run, source, None, block)
    network = prepare_model(source.factory(), torch.device("cpu"))
    count = max(block, num_samples // block * block)
    integrate_range(network, 0, block, settings)  # warm-up: allocator, oneDNN kernels
    began = time.perf_counter()
    integrate_range(network, 0, count, settings)
    return count / (time.perf_counter() - began)


def _registered(result) -> str:
    return f"models:/{result.train.registered_model_name}/{result.train.registered_version}"


def run_reflow_benchmark(
    cfg: Config,
    *,
    steps: tuple[int, ...] = (1, 2, 4, 8, 32),
    speed_samples: int = 200,
    distill_steps: int = 1,
    distill_images: int | None = None,
    distill_pair_steps: int | None = None,
    distill_from: str = "reflowed",
    eval_seeds: tuple[int, ...] = (),
    log: Callable[[str], None] = print,
) -> dict[str, float | None]:
    """Run the benchmark (module doc) on ``cfg.reflow.base``; prints the tables and returns
    the figures (``speedup``: the reflowed model's samples/s at its matched NFE over the
    base's; ``student_speedup`` the student's; None where a model misses the target).
    ``eval_seeds``: the sweep's seeds (default ``eval.seed`` alone)."""
    if distill_from not in ("reflowed", "base"):
        raise ValueError(f"distill_from={distill_from!r}: 'reflowed' or 'base'")
    if distill_from == "base" and distill_pair_steps:
        raise ValueError(
            "distill_pair_steps sets the reflowed teacher's new pairs; a student of the base "
            "trains on the base's pairs (sample.steps)"
        )
    from pipeline.eval.job import evaluate, sweep_table
    from pipeline.reflow import reflow

    log(f"machine: {platform.node()} {platform.machine()}, torch threads "
        f"{torch.get_num_threads()}, no GPU" if not torch.cuda.is_available() else
        f"machine: {platform.node()}, GPU {torch.cuda.get_device_name()}")  # fmt: skip
    began = time.perf_counter()
    result = reflow(cfg, print_fn=log)
    total = time.perf_counter() - began
    train_s = result.train.wall_seconds
    rf_name = f"{result.k + 1}-RF"  # Liu et al.'s names: the base is 1-RF, k reflows (k + 1)-RF
    models = {"base": cfg.reflow.base, rf_name: _registered(result)}
    log(f"\nreflow: {total:.0f} s in all, training {train_s:.0f} s, pairs and set-up "
        f"{total - train_s:.0f} s ({result.pairs_sampled:,} pairs sampled now)")  # fmt: skip
    figures: dict[str, float | None] = {"pairs_s": total - train_s}
    if distill_steps > 0:
        dcfg = cfg.model_copy(deep=True)
        if distill_from == "base":  # the same base and sampler: the pairs sampled above
            dcfg.reflow.pairs_out = result.pairs_uri
        else:
            dcfg.reflow.base, dcfg.reflow.pairs_out = models[rf_name], ""
        dcfg.train.objective, dcfg.train.distill_steps = "distill", distill_steps
        dcfg.train.run_name = ""  # distill-<teacher>-<K>step-<loss>-<states>-p<pairs digest>
        if distill_images:
            dcfg.train.total_images = distill_images
        if distill_pair_steps:  # the reflowed teacher's pairs (checked above)
            dcfg.sample.steps = distill_pair_steps
        began = time.perf_counter()
        student = reflow(dcfg, print_fn=log)
        models[f"student-{distill_steps}"] = _registered(student)
        figures["student_pairs_s"] = time.perf_counter() - began - student.train.wall_seconds
        log(f"\ndistillation: {time.perf_counter() - began:.0f} s in all, training "
            f"{student.train.wall_seconds:.0f} s")  # fmt: skip

    sweep = cfg.model_copy(deep=True)
    sweep.eval.sweep_solvers, sweep.eval.sweep_steps = ["euler"], list(steps)
    seeds = tuple(eval_seeds) or (cfg.eval.seed,)
    sweeps = []
    for seed in seeds:
        sweep.eval.seed = seed
        done = evaluate(sweep, model=list(models.values()), names=list(models), sweep=True,
                        say=log)  # fmt: skip
        log(f"\neval seed {seed}:\n{sweep_table(done.sweep)}")
        log(f"plot: {done.plot_path}" + (f" (MLflow run {done.run_id})" if done.run_id else ""))
        sweeps.append(done.sweep)
    points = mean_over_seeds(sweeps)
    if len(seeds) > 1:
        log(f"\nmean over eval seeds {', '.join(map(str, seeds))}:\n{sweep_table(points)}")
    curves = [
        Curve(name, model, [p for p in points if p.model == name]) for name, model in models.items()
    ]

    def rate(curve: Curve, nfe: int) -> float:
        return _samples_per_second(cfg, curve.model, nfe, speed_samples)

    figures.update(matched_quality(curves, rate, rf_name, log))
    return figures


def matched_quality(
    curves: list[Curve],
    rate: Callable[[Curve, int], float],
    rf_name: str,
    log: Callable[[str], None] = print,
) -> dict[str, float | None]:
    """Steps 4 and 5 of the module doc over swept ``curves`` (the base first).

    The target is the base's FD at its last (largest-steps) point; each curve's matched NFE
    is its fewest NFE with FD <= target (``<name>_nfe``, None if none reaches it); ``rate``
    (curve, NFE) -> samples/s is called once per curve that reaches it; ``speedup`` (the
    curve named ``rf_name``) and ``student_speedup`` (the others) are rates over the base's,
    None where either side misses the target.
    """
    base = curves[0]
    target = base.points[-1].scores.fd
    figures: dict[str, float | None] = {"target_fd": target}
    log(f"\nmatched quality: FD <= {target:.4f} (the base at {base.points[-1].nfe:g} NFE)")
    rates = {}
    for curve in curves:
        nfe = curve.fewest_nfe(target)
        figures[f"{curve.name}_nfe"] = nfe
        if nfe is None:
            best = min(curve.points, key=lambda p: p.scores.fd)
            steps = ", ".join(f"{p.steps}" for p in curve.points)
            log(f"  {curve.name:<10} does not reach it at {steps} steps "
                f"(best FD {best.scores.fd:.4f} at {best.nfe:g} NFE)")  # fmt: skip
            continue
        rates[curve.name] = rate(curve, int(nfe))
        log(f"  {curve.name:<10} {nfe:g} NFE  {rates[curve.name]:8.1f} samples/s")
    for curve in curves[1:]:
        key = "speedup" if curve.name == rf_name else "student_speedup"
        if "base" in rates and curve.name in rates:
            figures[key] = rates[curve.name] / rates["base"]
            log(f"  ratio {curve.name} / base at equal quality: {figures[key]:.2f}x (goal >= 8x)")
        else:
            figures[key] = None
            log(f"  ratio {curve.name} / base: {curve.name} does not reach the base's quality")
    return figures
