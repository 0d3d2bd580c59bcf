"""fmpipe prepare: write WebDataset shards + _manifest.json (train and val) from images.

Sources:
  digits            scikit-learn's bundled 8x8 handwritten digits (1,797, no download)
  folder:PATH       an image folder, one subfolder per class, any format Pillow reads
  synthetic:shapes  coloured shapes drawn from the seed (--num-samples of them)
  webdataset:ADDR   another tool's WebDataset shards (folder/prefix, brace pattern, list;
                    s3:// or local), re-encoded at --resolution (data.resize, data.label_*)

folder: an x.cls beside x.png (an int: the class id, or a class name) overrides x's
subfolder; s3:// folders work. Files that are not images, and samples without an image
or a readable label, are skipped and counted with their reasons in the summary.
--out must be empty or fmpipe's own earlier output: a folder holding other files
(another tool's shards) is refused, exit 2.

Output: s3://bucket/prefix or a local path (default $FMPIPE_HOME/store/<source>), holding
train/ and val/, each with shard-NNNNNN.tar files and a _manifest.json. Re-running the
same command skips the shards already in place (checked by sha256) and rewrites the rest.

Examples:
  fmpipe prepare --source digits --out s3://data/digits --resolution 16
  fmpipe prepare --source synthetic:shapes --num-samples 1000000 --channels 3 --out ./shapes
  fmpipe prepare --source folder:./pets --out s3://data/pets prepare.image_format=jpg
  fmpipe prepare --source 'webdataset:s3://b/laion/{000000..000099}.tar' --out s3://data/laion64 \
      --resolution 64 --channels 3
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
        prog="fmpipe prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--source",
        metavar="SPEC",
        help="digits | folder:PATH | synthetic:shapes | webdataset:ADDRESS "
        "(prepare.source; default digits)",
    )
    parser.add_argument(
        "--out", metavar="URI", help="s3://bucket/prefix or a local path (prepare.out)"
    )
    parser.add_argument(
        "--resolution", type=int, metavar="R", help="stored image size, square (prepare.resolution)"
    )
    parser.add_argument(
        "--shard-size", type=int, metavar="N", help="samples per shard (prepare.shard_size)"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="fraction held out as the val split (prepare.val_fraction)",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        metavar="N",
        help="samples of a synthetic source (prepare.num_samples)",
    )
    parser.add_argument(
        "--channels", type=int, metavar="C", help="1 (L) or 3 (RGB) (prepare.channels)"
    )
    parser.add_argument("--seed", type=int, help="seed of the split and synthetic data (seed)")
    add_config_arguments(parser)
    return parser


# flag (argparse dest) -> config key
SHORTCUTS = {
    "source": "prepare.source",
    "out": "prepare.out",
    "resolution": "prepare.resolution",
    "shard_size": "prepare.shard_size",
    "val_fraction": "prepare.val_fraction",
    "num_samples": "prepare.num_samples",
    "channels": "prepare.channels",
    "seed": "seed",
}


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags given, as ``key=value`` overrides."""
    return overrides_from(shortcut_values(args, SHORTCUTS))


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(build_parser(), argv)

    def body() -> int:
        cfg = resolve_config(args, shortcuts=SHORTCUTS)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        # Imported here: `fmpipe prepare --help` stays fast.
        from pipeline.data.prepare import prepare_dataset

        return run_guarded(
            "prepare",
            lambda: prepare_dataset(cfg),
            "run the same command again to resume (the shards in place are kept)",
            bad_input=(ValueError,),  # the sources refuse a bad spec or folder with it
        )

    return run_job(body, "prepare")


if __name__ == "__main__":
    sys.exit(main())
