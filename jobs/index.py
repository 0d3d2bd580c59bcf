"""fmpipe index: index WebDataset shards fmpipe did not write, in place (never into them).

The dataset ADDRESS is given as to WebDataset: a folder or prefix of .tar shards
(s3://bucket/shards, ./shards), a brace pattern (s3://b/train-{000000..000999}.tar, {a,b}
lists), or a comma-separated list. Every shard is read once, in parallel Ray tasks; the
index records per shard its size, ETag or mtime, sha256, samples, image formats, sizes and
modes, raw labels and bad members (with reasons), and for the dataset its classes,
channels, resolution range and a content hash. Re-running reads only new or changed
shards.

The index goes to --index URI (data.index_uri), else $FMPIPE_HOME/indexes/<hash>.json;
never inside the dataset's own folders. Labels: data.label_source=auto|cls|json|txt|none
and data.label_field=meta.class (a dotted .json path); .txt captions are not classes
unless data.label_source=txt. Validation: --val ADDRESS, or data.val_fraction=0.05 (whole
shards, by a seeded hash: adding shards never moves old ones).

Examples:
  fmpipe index --data 's3://laion/shards/{00000..00999}.tar'
  fmpipe index --data ./shards --val ./val-shards --index s3://meta/pets-index.json
  fmpipe index --data s3://b/hf-export data.label_source=json data.label_field=meta.class
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import (
    add_config_arguments,
    overrides_from,
    parse_job_args,
    resolve_config,
    run_guarded,
    run_job,
    shortcut_values,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmpipe index",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data", metavar="ADDRESS", help="the dataset's shards: folder, pattern or list (data.uri)"
    )
    parser.add_argument(
        "--val", metavar="ADDRESS", help="validation shards of their own (data.val_uri)"
    )
    parser.add_argument(
        "--index", metavar="URI", help="where the index goes (data.index_uri; default: home)"
    )
    add_config_arguments(parser)
    return parser


# flag (argparse dest) -> config key
SHORTCUTS = {"data": "data.uri", "val": "data.val_uri", "index": "data.index_uri"}


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags given, as ``key=value`` overrides."""
    return overrides_from(shortcut_values(args, SHORTCUTS))


def summary(result: object) -> str:
    """The lines printed at the end of a run (an :class:`pipeline.data.index.IndexResult`)."""
    index = result.index  # type: ignore[attr-defined]
    splits = ", ".join(
        f"{name} {v['shards']} shard(s) / {v['samples']:,} samples"
        for name, v in index.splits.items()
    )
    bad = ", ".join(f"{kind} {n}" for kind, n in index.bad_counts.items()) or "none"
    if index.class_names:
        shown = ", ".join(index.class_names[:8]) + (", ..." if index.num_classes > 8 else "")
        classes = f"{index.num_classes} ({shown})"
    else:
        classes = "none (unlabelled)"
    res = index.resolution
    size = (
        f"{res['width_min']}-{res['width_max']} x {res['height_min']}-{res['height_max']} px"
        if res
        else "no images"
    )
    return "\n".join(
        [
            f"shards: {result.read} read, {result.reused} reused"  # type: ignore[attr-defined]
            f" ({len(index.shards)} in the index)",
            f"samples: {index.num_samples:,} ({splits or 'none'})",
            f"bad members: {bad}",
            f"classes: {classes}",
            f"images: {index.channels} channel(s), {size}",
            f"content hash: {index.content_hash[:16]}",
            f"index written to {result.uri}",  # type: ignore[attr-defined]
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(build_parser(), argv)

    def body() -> int:
        cfg = resolve_config(args, shortcuts=SHORTCUTS)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        # Imported here: `fmpipe index --help` stays fast.
        from pipeline.data.index import build_index

        def action() -> None:
            result = build_index(cfg, progress=lambda line: print(line, flush=True))
            print(summary(result), flush=True)

        return run_guarded(
            "index",
            action,
            "run the same command again: the shards indexed so far are reused",
        )

    return run_job(body, "index")


if __name__ == "__main__":
    sys.exit(main())
