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


def first_and_median(fn, steps: int, warmup: int = 2) -> tuple[float, float]:
  """``(first call incl. compile, median of steps)``: times ``fn()`` once, then
  :func:`median_time` over ``steps`` calls after the remaining ``warmup - 1`` untimed ones
  (the first call is warm-up 1)."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  return first, median_time(fn, steps, max(warmup - 1, 0))
