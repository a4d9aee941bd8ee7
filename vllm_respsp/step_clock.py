"""Wall time per respsp phase in this process (`timed("draft")`, ...), reported in the stats
file. Its own module: the runtime, the backends and the patches all time their phases, and none
of them may import another just for a clock."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager

SECONDS: Counter[str] = Counter()


@contextmanager
def timed(phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        SECONDS[phase] += time.perf_counter() - start
