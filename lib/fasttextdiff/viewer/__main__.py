"""`python -m fasttextdiff.viewer --server URL`: the viewer without loading the rest of the command
line (no torch import: it starts in a few seconds). Same options as `fasttextdiff viewer`."""

from __future__ import annotations

import argparse
import logging
import sys

from fasttextdiff.utils.errors import FastTextDiffError
from fasttextdiff.viewer.cli import add_viewer_arguments, run_viewer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fasttextdiff.viewer", description=__doc__.splitlines()[0])
    add_viewer_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_viewer(args)
    except FastTextDiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
