"""The benchmarks' timing helpers (what they time, not how fast anything is)."""

from bench import first_and_median, median_time


def _counter():
  calls = []
  return calls, lambda: calls.append(len(calls))


def test_median_time_runs_warmup_plus_steps():
  calls, fn = _counter()
  t = median_time(fn, steps=5, warmup=3)
  assert len(calls) == 8 and t >= 0.0


def test_first_and_median_counts_the_first_call_as_warmup():
  calls, fn = _counter()
  first, t = first_and_median(fn, steps=4, warmup=2)
  assert len(calls) == 1 + 1 + 4  # first (timed alone), one more warm-up, four timed
  assert first >= 0.0 and t >= 0.0
  calls, fn = _counter()
  first_and_median(fn, steps=3, warmup=0)
  assert len(calls) == 1 + 3
