"""A serving process of ``test_models`` with an L1: answers commands read from stdin, a JSON
line each on stdout, so the test can invalidate from its own process and see this one's L1.

Usage: ``python models_l1_worker.py REDIS_URL KEY_PREFIX``, then lines of ``get BIAS`` (the
outputs and statuses of inputs x=1 and x=2, computed as 2 * x + BIAS when missing),
``applied`` (invalidation stream entries this process's L1 has applied) and ``quit``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from featdata import make_cache, make_view


def main() -> None:
    redis_url, key_prefix = sys.argv[1:3]
    view = make_view("mv", "mv", None)
    offline = f"sqlite:///{Path(tempfile.mkdtemp()) / 'offline.db'}"
    with make_cache([view], redis_url, offline, key_prefix, l1_policy="lru",
                    l1_max_ttl=60.0) as cache:
        ranker = cache.model("ranker", version="v1")
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            command, *args = line.split()
            answer: dict[str, Any]
            if command == "get":
                bias = float(args[0])
                result = ranker.get_or_compute(
                    [{"x": 1, "kind": "a"}, {"x": 2, "kind": "a"}],
                    compute=lambda batch, bias=bias: [2.0 * x["x"] + bias for x in batch])
                answer = {"outputs": list(result),
                          "statuses": [str(s) for s in result.statuses]}
            elif command == "applied":
                answer = {"applied": cache.subscriber_stats()["entries_applied"]}
            else:
                return
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
