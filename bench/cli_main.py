"""The shared ``main()`` of the ``python -m scission.bench.<name>`` entry points."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable


def bench_main(prog: str, description: str | None,
               add_arguments: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """Parse ``argv`` with the module's options, set INFO logging, and return ``run(args)``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)  # may set its own formatter_class
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


def report(table: str, output: object) -> int:
    """Print a benchmark's result table and where its JSON went; returns exit status 0."""
    print(table)
    print(f"wrote {output}", file=sys.stderr)
    return 0
