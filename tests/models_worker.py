"""A serving process of ``test_models``: asks a model cache for 50 inputs when told to, with
a slow compute that logs every input it is given, and prints its answer as JSON.

Usage: ``python models_worker.py REDIS_URL KEY_PREFIX LOG_PATH TAG``; it prints ``ready``
once its cache is open, and asks when a line arrives on stdin (the test sends it to every
worker at once).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from featdata import make_cache, make_view


def main() -> None:
    redis_url, key_prefix, log, tag = sys.argv[1:5]
    view = make_view("mv", "mv", None)
    offline = f"sqlite:///{Path(tempfile.mkdtemp()) / 'offline.db'}"

    def compute(batch: list[Any]) -> list[float]:
        with open(log, "a") as out:  # one line per call: O_APPEND keeps lines whole
            out.write(json.dumps({"tag": tag, "inputs": [x["x"] for x in batch]}) + "\n")
        time.sleep(1.0)  # slow: the other process must wait for it, not compute too
        return [2.0 * x["x"] for x in batch]

    with make_cache([view], redis_url, offline, key_prefix) as cache:
        ranker = cache.model("ranker", version="v1", lease_wait=20.0)
        print("ready", flush=True)
        sys.stdin.readline()
        result = ranker.get_or_compute([{"x": n} for n in range(50)], compute=compute)
        print(json.dumps({"outputs": list(result), "statuses": [str(s) for s in
                                                                result.statuses]}))


if __name__ == "__main__":
    main()
