"""fmpipe demo: the main job on embedded defaults (what `make demo` runs).

For now this is the 2-D example (`fmpipe toy`); the image pipeline replaces it as the
prepare -> train -> sample chain lands.
"""

from __future__ import annotations

import argparse
import sys

from jobs import toy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fmpipe demo", description=__doc__)
    parser.parse_args(argv)
    return toy.main([])


if __name__ == "__main__":
    sys.exit(main())
