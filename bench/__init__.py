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
  """``(first call incl. compile, median of steps)``: times ``fn()`` once, then the median
  of ``steps`` calls after the remaining ``warmup - 1`` untimed ones (the first call is
  warm-up 1); :func:`interleaved_medians` with one function."""
  return interleaved_medians({"fn": fn}, steps, warmup)["fn"]


def interleaved_medians(fns: dict, steps: int, warmup: int = 2) -> dict:
  """``{name: (first call incl. compile, median)}`` with the calls interleaved: each
  ``fn`` once (timed alone, its first call), ``warmup - 1`` untimed rounds, then ``steps``
  timed rounds calling every ``fn`` once in turn. A slow spell of a shared machine then
  falls on every variant alike instead of on whichever ran in it, which keeps the ratios
  between the variants honest."""
  first = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    fn()
    first[name] = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(steps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: (first[name], float(np.median(times[name]))) for name in fns}
