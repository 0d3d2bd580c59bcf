"""fmpipe bench: benchmarks that print a ratio against a named baseline, side by side.

fmpipe bench toy    2-D example: sliced W2 per solver vs two independent data draws
fmpipe bench data   input pipeline vs a decode ceiling and webdataset + DataLoader
                    (--foreign: JPEG ShardWriter shards in S3, read through the index)
fmpipe bench train  fmpipe training (1 Ray Train worker + Ray Data) vs a plain PyTorch loop
fmpipe bench sample sampler and Ray batch inference vs a torchdiffeq loop; quality vs NFE
fmpipe bench gpu    U-Net training MFU and sampling samples/s on one GPU (no Ray needed)
fmpipe bench eval   feature extraction: the Ray Data job per actor vs a plain loop
fmpipe bench reflow quality vs NFE of a model, its reflow and a student; samples/s at equal quality
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from jobs._common import add_config_arguments, parse_job_args, resolve_config, run_job
from pipeline.config import Config, ConfigError
from pipeline.flow.solver_specs import SOLVERS

DEFAULT_SAMPLE_MODEL = "models:/digits@champion"  # what `make demo` registers
# `fmpipe bench sample` flag (argparse dest) -> config key
SAMPLE_SHORTCUTS = {
    "solver": "sample.solver",
    "steps": "sample.steps",
    "num_samples": "sample.num_samples",
    "actors": "sample.num_actors",
}


def _toy_parser(sub: argparse._SubParsersAction) -> None:
    toy = sub.add_parser("toy", help="2-D example: sample quality per solver vs the data floor")
    toy.add_argument("--num-samples", type=int, default=10_000, help="samples per figure")
    add_config_arguments(toy)


def _data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="input pipeline vs decode ceiling and a plain baseline")
    data.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    data.add_argument(
        "--num-samples",
        type=int,
        default=40_000,
        help="images per resolution (40,000: an epoch of several seconds, so the per-epoch "
        "start-up does not dominate)",
    )
    data.add_argument("--cores", type=int, default=2, help="Ray CPUs = DataLoader workers")
    data.add_argument(
        "--foreign",
        action="store_true",
        help="another tool's shards (issue 14): webdataset.ShardWriter shards of photo-like "
        "JPEGs (128-512 px a side) in S3 (a SeaweedFS of its own, or AWS_ENDPOINT_URL_S3), "
        "streamed at 64x64: (a) a plain decode_image loop on one core, (b) webdataset's "
        "decode('pil') pipeline in a DataLoader, (c) the fmpipe stream via its index; "
        "also build_index against raw GETs of the same shards",
    )
    data.add_argument(
        "--images",
        type=int,
        default=2048,
        metavar="N",
        help="with --foreign: images to write (128 a shard; default 2048)",
    )


def _train_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="images/s of fmpipe training (1 worker, Ray Data) vs a plain PyTorch loop",
        description="Same model, batch and data: (a) a plain single-process PyTorch loop over "
        "in-memory tensors, (b) fmpipe train with 1 Ray Train worker fed by the Ray Data "
        "stream. Prints steady-state images/s (first 10 steps excluded), b/a and (b)'s data "
        "wait; on CUDA also bf16 images/s and MFU at 32x32 and 64x64. Config: "
        "jobs/configs/train.yaml < --config < overrides; digits are prepared into a "
        "temporary directory unless data.uri is set.",
    )
    train.add_argument(
        "--images", type=int, default=12_800, metavar="N", help="images per side (whole batches)"
    )
    train.add_argument(
        "--gpu-batch",
        type=int,
        metavar="B",
        help="batch of the CUDA MFU rows (default data.batch_size)",
    )
    train.add_argument(
        "--peak-tflops",
        type=float,
        metavar="T",
        help="GPU dense bf16 peak for MFU (default: from the device name, H200 989)",
    )
    add_config_arguments(train)


def _sample_parser(sub: argparse._SubParsersAction) -> None:
    sample = sub.add_parser(
        "sample",
        help="samples/s of the sampler and the Ray job vs a torchdiffeq loop; quality vs NFE",
        description="Same weights, solver and steps: (a) a plain torchdiffeq.odeint loop, (b) "
        "the fmpipe sampler in one process, (c) fmpipe sample on Ray Data end to end (shards "
        "written to a temporary directory). Prints b/a and c/(b*A), then sliced W2 against "
        "real training images per solver setting, with the real-vs-real floor.",
    )
    sample.add_argument(
        "--model",
        metavar="URI",
        help="models:/<name>@<alias>, models:/<name>/<version> or a checkpoint directory "
        f"(default {DEFAULT_SAMPLE_MODEL}, what `make demo` registers)",
    )
    sample.add_argument(
        "--num-samples", type=int, metavar="N", help="samples per side (sample.num_samples, 1000)"
    )
    sample.add_argument(
        "--steps", type=int, metavar="K", help="fixed-step solver steps (sample.steps, 32)"
    )
    sample.add_argument("--solver", metavar="NAME", help=f"{' | '.join(SOLVERS)} (sample.solver)")
    sample.add_argument(
        "--actors", type=int, metavar="A", help="actors of (c) (sample.num_actors, 1)"
    )
    sample.add_argument(
        "--data",
        metavar="URI",
        help="dataset of real images for the quality table (default: the model's data.uri)",
    )
    sample.add_argument(
        "--quality-samples",
        type=int,
        metavar="n",
        help="samples per setting of the quality table (default N, at most half the real "
        "images; 0 skips the table)",
    )
    sample.add_argument(
        "--speed-samples",
        type=int,
        metavar="n",
        help="samples (a) and (b) each time, in whole blocks (default N): a large N for (c) "
        "then costs no more time on (a) and (b)",
    )
    add_config_arguments(sample)


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    evaluation = sub.add_parser(
        "eval",
        help="feature extraction images/s: the Ray Data job per actor vs a plain loop",
        description="Same shards (a split of data.uri), network and batch: (a) a plain loop in "
        "this process, (b) the Ray Data job of fmpipe eval with A actors. Prints images/s and "
        "b/(a*A), for the whole call and its steady part (first batch back to last).",
    )
    evaluation.add_argument(
        "--network", default="classifier", help="classifier (default) | inception"
    )
    evaluation.add_argument("--split", default="train", help="the split read (default train)")
    evaluation.add_argument(
        "--max-shards", type=int, default=0, metavar="S", help="read only the first S shards"
    )
    evaluation.add_argument("--actors", type=int, default=1, metavar="A", help="actors of (b)")
    evaluation.add_argument("--batch-size", type=int, default=64, metavar="B", help="batch")
    add_config_arguments(evaluation)


def _reflow_parser(sub: argparse._SubParsersAction) -> None:
    rf = sub.add_parser(
        "reflow",
        help="quality vs NFE of a model, its reflow and a student; samples/s at equal quality",
        description="fmpipe reflow of --base (default the demo's models:/digits@champion; "
        "reflow.* / sample.* / train.* settings), a --distill K-step student (of the reflowed "
        "model, or of the base with --distill-from base), then fmpipe eval's Euler sweep of "
        "the three (one plot, one MLflow run); the fewest NFE at which each reaches the "
        "base's largest-steps FD, and the samples/s there, side by side in this process "
        "(ratio to the base).",
    )
    rf.add_argument("--base", metavar="MODEL", help="the base model (reflow.base)")
    rf.add_argument(
        "--steps", type=int, nargs="+", default=[1, 2, 4, 8, 32], metavar="K",
        help="Euler steps of the sweep (default 1 2 4 8 32; the last is the quality target)",
    )  # fmt: skip
    rf.add_argument(
        "--speed-samples", type=int, default=200, metavar="n", help="samples timed per model"
    )
    rf.add_argument(
        "--distill", type=int, default=1, metavar="K", help="also a K-step student of the "
        "teacher --distill-from names (default 1; 0: none)",
    )  # fmt: skip
    rf.add_argument(
        "--distill-from", choices=("reflowed", "base"), default="reflowed",
        help="the student's teacher: the reflowed model on its own new pairs (default), or "
        "the base on the pairs its reflow was trained on (no new sampling)",
    )  # fmt: skip
    rf.add_argument(
        "--distill-images", type=int, metavar="N", help="the student's training images "
        "(default train.total_images)",
    )  # fmt: skip
    rf.add_argument(
        "--distill-pair-steps", type=int, metavar="K", help="Euler steps of the reflowed "
        "model's pairs for its student (--distill-from reflowed; default sample.steps; its "
        "paths are straight, so fewer steps give nearly the same map for a fraction of the "
        "sampling)",
    )  # fmt: skip
    rf.add_argument(
        "--eval-seeds", type=int, nargs="+", metavar="S", help="run the sweep at each of these "
        "eval seeds and judge the seeds' mean figures (default eval.seed alone; at a few "
        "thousand samples one seed's FD is noisy)",
    )  # fmt: skip
    add_config_arguments(rf)


def _gpu_parser(sub: argparse._SubParsersAction) -> None:
    gpu = sub.add_parser(
        "gpu",
        help="U-Net bf16 training images/s + MFU and sampling samples/s on one GPU",
        description="On one GPU, a CIFAR-class U-Net (jobs/configs/gpu.yaml < --config < "
        "overrides) at each resolution: the bf16 matrix-product ceiling; the plain bf16 "
        "training step, eager and torch.compile, with images/s and MFU; fmpipe's sampler "
        "(Euler) in bf16 and fp32, and bf16 compiled, with samples/s. Runs go most important "
        "first and stop starting after --budget seconds. Needs PyTorch and pydantic only.",
    )
    gpu.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    gpu.add_argument("--train-batch", type=int, default=256, metavar="B", help="training batch")
    gpu.add_argument(
        "--block", type=int, default=500, metavar="B", help="sampling compute block (500)"
    )
    gpu.add_argument("--steps", type=int, default=32, metavar="K", help="Euler steps (32)")
    gpu.add_argument(
        "--blocks", type=int, default=2, metavar="n", help="timed blocks per sampling row"
    )
    gpu.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    gpu.add_argument(
        "--budget", type=float, default=420.0, metavar="S", help="start no run after S seconds"
    )
    gpu.add_argument(
        "--peak-tflops", type=float, metavar="T", help="dense bf16 peak (default: by name)"
    )
    gpu.add_argument(
        "--runs",
        nargs="+",
        default=["train", "nhwc", "sample", "train-compile", "sample-compile"],
        metavar="KIND",
        help="which rows: train nhwc sample train-compile sample-compile (default all)",
    )
    gpu.add_argument(
        "--profile", action="store_true", help="first print the eager step's top GPU kernels"
    )
    gpu.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    gpu.add_argument("--device", default="cuda", help="cuda (default) or cpu, to try the code path")
    add_config_arguments(gpu)


def _config(args: argparse.Namespace, **how: object) -> Config | None:
    """The benchmark's config (``how``: :func:`jobs._common.resolve_config`'s defaults and
    shortcuts), or None once ``--print-config`` has printed it."""
    cfg = resolve_config(args, **how)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return None
    return cfg


def _run_toy(args: argparse.Namespace) -> int:
    from pipeline.bench.toy import run_toy_benchmark

    if (cfg := _config(args, defaults="toy")) is not None:
        run_toy_benchmark(cfg, args.num_samples)
    return 0


def _run_data(args: argparse.Namespace) -> int:
    if args.foreign:
        from pipeline.bench.foreign import run_foreign_benchmark

        run_foreign_benchmark(args.images, args.cores)
    else:
        from pipeline.bench.data import run_data_benchmark

        run_data_benchmark(tuple(args.resolutions), args.num_samples, args.cores)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from pipeline.bench.train import run_train_benchmark

    if (cfg := _config(args, defaults="train")) is not None:
        run_train_benchmark(
            cfg, args.images, gpu_batch=args.gpu_batch, peak_tflops=args.peak_tflops
        )
    return 0


def _run_sample(args: argparse.Namespace) -> int:
    from pipeline.bench.sample import BenchSampleError, run_sample_benchmark

    if (cfg := _config(args, shortcuts=SAMPLE_SHORTCUTS)) is None:
        return 0
    model = args.model or cfg.sample.model.strip() or DEFAULT_SAMPLE_MODEL
    if model.startswith(("models:/", "runs:/")):
        import mlflow  # noqa: F401  (its import resets its logger to INFO)

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no DB-creation notices
    try:
        run_sample_benchmark(
            cfg,
            model,
            data_uri=args.data,
            quality_samples=args.quality_samples,
            speed_samples=args.speed_samples,
        )
    except BenchSampleError as exc:
        print(f"fmpipe bench sample: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from pipeline.bench.eval import run_eval_benchmark
    from pipeline.home import data_uri

    if (cfg := _config(args, defaults="train")) is not None:
        cfg.data.uri = data_uri(cfg)
        run_eval_benchmark(cfg, network=args.network, split=args.split,
                           max_shards=args.max_shards, actors=args.actors,
                           batch_size=args.batch_size)  # fmt: skip
    return 0


def _run_reflow(args: argparse.Namespace) -> int:
    from pipeline.bench.reflow import run_reflow_benchmark

    if (cfg := _config(args, defaults=["train", "reflow"])) is None:
        return 0
    cfg.reflow.base = args.base or cfg.reflow.base.strip() or DEFAULT_SAMPLE_MODEL
    if args.distill_from == "base" and args.distill_pair_steps:
        raise ConfigError(
            "--distill-pair-steps sets the reflowed model's new pairs; --distill-from "
            "base trains on the base's own pairs (sample.steps)"
        )
    run_reflow_benchmark(cfg, steps=tuple(args.steps), speed_samples=args.speed_samples,
                         distill_steps=args.distill, distill_images=args.distill_images,
                         distill_pair_steps=args.distill_pair_steps,
                         distill_from=args.distill_from,
                         eval_seeds=tuple(args.eval_seeds or ()))  # fmt: skip
    return 0


def _run_gpu(args: argparse.Namespace) -> int:
    from pipeline.bench.gpu import run_gpu_benchmark

    if (cfg := _config(args, defaults="gpu")) is not None:
        run_gpu_benchmark(
            cfg,
            resolutions=tuple(args.resolutions),
            train_batch=args.train_batch,
            sample_block=args.block,
            sample_steps=args.steps,
            sample_blocks=args.blocks,
            compile=not args.no_compile,
            peak_tflops=args.peak_tflops,
            budget_seconds=args.budget,
            device=args.device,
            json_out=args.json,
            runs=tuple(args.runs),
            profile=args.profile,
        )
    return 0


# name -> (declares its sub-command and flags, runs it); the order of `fmpipe bench --help`
BENCHES: dict[str, tuple[Callable[[argparse._SubParsersAction], None],
                         Callable[[argparse.Namespace], int]]] = {
    "toy": (_toy_parser, _run_toy),
    "data": (_data_parser, _run_data),
    "train": (_train_parser, _run_train),
    "sample": (_sample_parser, _run_sample),
    "eval": (_eval_parser, _run_eval),
    "reflow": (_reflow_parser, _run_reflow),
    "gpu": (_gpu_parser, _run_gpu),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmpipe bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{" + ",".join(BENCHES) + "}")
    for add_parser, _ in BENCHES.values():
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(build_parser(), argv)
    _, run = BENCHES[args.bench]
    return run_job(lambda: run(args), "bench")


if __name__ == "__main__":
    sys.exit(main())
