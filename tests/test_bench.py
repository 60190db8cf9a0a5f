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


def test_layer_gemms_count_the_forward_and_input_gradient_flops():
  from bench.lora_step import gemm_flops, layer_gemms
  g = layer_gemms(2048, 384, 1536)
  assert len(g) == 12 and sum(t for *_, t in g) == 6
  # forward: 4 square projections + two feed-forward GEMMs; the input gradients the same again
  assert gemm_flops(g) == 2 * 2 * 2048 * (4 * 384 * 384 + 2 * 384 * 1536)
  assert (2048, 1536, 384, True) in g and (2048, 384, 1536, True) in g


def test_gemm_rate_times_each_distinct_shape_with_its_operands():
  from bench.lora_step import gemm_rate, layer_gemms
  seen = []

  def matmul(a, w, transposed):
    seen.append((a.shape, w.shape, transposed))
    return lambda: (a @ w.T if transposed else a @ w)

  g = layer_gemms(8, 4, 16)
  assert gemm_rate(matmul, g, steps=1) > 0
  assert sorted(seen) == sorted({((m, k), (n, k) if t else (k, n), t) for m, k, n, t in g})
