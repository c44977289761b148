"""Dispatcher: ``python -m bench <benchmark> [options]``.

Each benchmark is one module with ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args) -> int``; to add one, import it here and add it to ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Protocol

from bench import (
    analyze,
    invalidation,
    l1,
    l1_policies,
    materialize,
    node_rate,
    predictions,
    read,
    serve,
    stampede,
)


class Benchmark(Protocol):
    DESCRIPTION: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


BENCHMARKS: dict[str, Benchmark] = {
    "read": read,
    "l1_policies": l1_policies,
    "l1": l1,
    "stampede": stampede,
    "invalidation": invalidation,
    "materialize": materialize,
    "node_rate": node_rate,
    "analyze": analyze,
    "serve": serve,
    "predictions": predictions,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="featcache benchmarks (run from the repo root)"
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, bench in BENCHMARKS.items():
        sub_parser = sub.add_parser(name, help=bench.DESCRIPTION, description=bench.DESCRIPTION)
        bench.add_arguments(sub_parser)
        sub_parser.set_defaults(_bench=bench)
    args = parser.parse_args(argv)
    chosen: Benchmark = args._bench
    return chosen.run(args)


if __name__ == "__main__":
    sys.exit(main())
