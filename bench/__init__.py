"""Benchmarks: ``python -m bench.NAME``; each prints a side-by-side table."""

import time

import numpy as np


def median_time(fn, steps: int, warmup: int = 2) -> float:
  """Median wall time of ``fn()`` over ``steps`` calls after ``warmup`` untimed ones
  (``fn`` must block on its results, e.g. ``jax.block_until_ready``)."""
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    fn()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return float(np.median(times))
