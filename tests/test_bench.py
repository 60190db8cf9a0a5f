"""The benchmarks' timing helpers (what they time, not how fast anything is)."""

from bench import first_and_median, interleaved_medians, median_time


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


def test_interleaved_medians_alternates_the_variants_round_by_round():
  order = []
  fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
  out = interleaved_medians(fns, steps=3, warmup=2)
  # first calls (timed alone), one untimed round, three timed rounds: always a, b, c in turn
  assert order == ["a", "b", "c"] * (1 + 1 + 3)
  assert set(out) == {"a", "b", "c"} and all(first >= 0 and t >= 0 for first, t in out.values())


def test_gemm_floor_lists_the_matmuls_of_the_real_lora_step():
  """``bench.gemm_floor``'s GEMM list against XLA's cost analysis of the compiled MiniLM
  LoRA r8 q,v step: the GEMMs are all but the elementwise remainder of the step's FLOPs."""
  import jax
  import jax.numpy as jnp
  import optax

  import lowrank_jax as lj
  from bench import gemm_floor
  from lowrank_jax import train
  from lowrank_jax.models import bert

  config = bert.BertConfig.from_json(bert.minilm_path() + "/config.json")
  theta0 = {"bert": bert.init_bert(jax.random.key(0), config, pooler=False),
            "head": bert.init_classifier(jax.random.key(1), config.hidden_size, 3)}
  ids = jnp.zeros((gemm_floor.B, gemm_floor.T), jnp.int32)
  batch = {"input_ids": ids, "labels": jnp.zeros((gemm_floor.B,), jnp.int32)}

  def loss_fn(theta, b, rng):
    h = bert.bert_forward(theta["bert"], config, b["input_ids"])
    return train.softmax_cross_entropy(bert.classifier_logits(theta["head"], h), b["labels"])

  reparam = lj.chain(lj.lora(r"(query|value)/kernel", rank=gemm_floor.R, alpha=16), lj.full(r"^head/"))
  opt = optax.adamw(1e-4)
  phi = reparam.init(jax.random.key(2), theta0)
  step = train.make_train_step(reparam, opt, loss_fn)
  cost = step.lower(phi, opt.init(phi), theta0, batch, None).compile().cost_analysis()
  total = float((cost[0] if isinstance(cost, list) else cost)["flops"])
  listed = gemm_floor.total_flops()
  assert 0.97 * total < listed <= total


def test_gemm_floor_sums_count_times_time():
  from bench import gemm_floor
  counts = [c for *_, c in gemm_floor.gemms()]
  assert gemm_floor.floor([1.0] * len(counts)) == sum(counts)
  times = [0.001 * (i + 1) for i in range(len(counts))]
  assert abs(gemm_floor.floor(times) - sum(c * t for c, t in zip(counts, times))) < 1e-12


def test_bench_methods_has_a_valid_row_for_every_registered_method():
  """``bench.methods`` takes its methods from the registry: a setting for each (under the
  registry name), every row a valid registry config, every row in the default run."""
  from bench import methods
  from lowrank_jax.methods import registry
  assert set(methods.SETTINGS) == set(registry.METHODS)
  assert all(row.method == name for name, row in methods.SETTINGS.items())
  assert methods.DEFAULT.split(",") == list(methods.ROWS)
  for name, row in methods.ROWS.items():
    if row.method is None:
      assert name == "frozen"
      continue
    cfg = registry.parse(row.method, row.params)  # raises on a stale setting
    assert cfg.method_name == row.method
