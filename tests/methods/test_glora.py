"""GLoRA against peft's golden data, a NumPy reference of the unified formula, the supernet's
weight sharing and the evolutionary search on a problem with a known optimum."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.methods.glora import (CHOICES, GLoRAWeight, LayerConfig, glora, glora_layers,
                                       glora_param_count, glora_search, glora_subnet)
from tests.methods import peft_harness as H


def test_matches_peft():
  _, meta, _ = H.golden_linear("peft_glora")
  cfg = meta["config"]
  config = LayerConfig(A=cfg["config_A_B"], B=cfg["config_A_B"], C=cfg["config_C"], D=cfg["config_D_E"],
                       E=cfg["config_D_E"])
  spec = {"lin/kernel/a_u": "glora_A.default.Xu", "lin/kernel/a_d": "glora_A.default.Xd",
          "lin/kernel/b_u": "glora_B.default.Xu", "lin/kernel/b_d": "glora_B.default.Xd",
          "lin/kernel/c_u": "glora_C.default.Xu", "lin/kernel/c_d": "glora_C.default.Xd",
          "lin/kernel/d": "glora_D.default.X", "lin/kernel/e": "glora_E.default.X"}
  H.check_against_peft("peft_glora", glora("lin/kernel", rank=cfg["r"], config=config), spec,
                       lazy_type=GLoRAWeight)


def _numpy_support(p, x, kind, d_in, d_out):
  """Dense support tensors in torch orientation, straight from the paper's definitions."""
  if kind == "none":
    return 0.0
  if kind == "lora":
    return (p[x + "_u"] @ p[x + "_d"]).T  # torch [out, in] (A, B) or [in, 1] (C)
  if kind == "vector":
    return p[x][:, None] if x in "abc" else p[x]  # [out, 1] for A, B; [in, 1] for C
  return p[x]


CONFIGS = [LayerConfig("vector", "lora", "vector", "vector", "none"),
           LayerConfig("constant", "vector", "none", "constant", "vector"),
           LayerConfig("none", "constant", "lora", "none", "constant"),
           LayerConfig("lora", "none", "none", "vector", "vector"),
           LayerConfig("none", "none", "none", "none", "none")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c))
def test_unified_formula_lazy_dense_and_unmerge(config):
  rng = np.random.default_rng(0)
  d_in, d_out = 10, 7
  theta0 = {"l": {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=d_out), jnp.float32)}}
  reparam = glora("l/kernel", rank=3, config=config)
  phi = reparam.init(jax.random.key(0), theta0)
  chex.assert_trees_all_close(lj.merge(reparam, theta0, phi), theta0)  # identity at init
  phi = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.3, jnp.float32), phi)
  p = {k: np.asarray(v, np.float64) for k, v in phi["l"]["kernel"].items()}
  w = np.asarray(theta0["l"]["kernel"], np.float64).T
  b0 = np.asarray(theta0["l"]["bias"], np.float64)
  A, B, C, D, E = (_numpy_support(p, x, k, d_in, d_out) for x, k in zip("abcde", config))
  w_ref = w + w * A + B
  c_term = (w @ C)[:, 0] if config.C != "none" else 0.0
  b_ref = b0 + b0 * D + E + c_term
  x = jnp.asarray(rng.normal(size=(4, d_in)), jnp.float32)
  y_ref = np.asarray(x, np.float64) @ w_ref.T + b_ref

  theta = reparam.apply(theta0, phi)
  assert isinstance(theta["l"]["kernel"], GLoRAWeight)
  np.testing.assert_allclose(H.forward({"lin": theta["l"]}, x), y_ref, rtol=1e-5, atol=1e-5)
  merged = lj.merge(reparam, theta0, phi)
  np.testing.assert_allclose(merged["l"]["kernel"], w_ref.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(merged["l"]["bias"], b_ref, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(lj.unmerge(reparam, merged, phi), theta0, atol=1e-4)

  def loss(phi, dense):
    t = reparam.apply(theta0, phi)
    t = lj.materialize(t) if dense else t
    return jnp.sum(jnp.sin(H.forward({"lin": t["l"]}, x)))

  f = jax.jit(lambda q: (jax.grad(loss)(q, False), jax.grad(loss)(q, True)))
  g_lazy, g_dense = f(phi)
  chex.assert_trees_all_close(g_lazy, g_dense, rtol=1e-4, atol=1e-5)


def test_bias_is_required_only_when_used():
  theta0 = {"w": {"kernel": jnp.ones((6, 4))}}
  with pytest.raises(ValueError, match=r"'w/kernel' has no sibling 'bias'"):
    glora("w/kernel", rank=2).init(jax.random.key(0), theta0)
  cfg = LayerConfig("lora", "vector", "none", "none", "none")
  phi = glora("w/kernel", rank=2, config=cfg).init(jax.random.key(0), theta0)
  assert set(phi["w"]["kernel"]) == {"a_u", "a_d", "b"}
  with pytest.raises(ValueError, match="not one of"):
    glora("w/kernel", config=LayerConfig(C="constant"))


def _super_setup():
  rng = np.random.default_rng(1)
  theta0 = {"p": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=6), jnp.float32)},
            "q": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=5), jnp.float32)}}
  sup = glora(r"kernel$", rank=3, supernet=True)
  phi = sup.init(jax.random.key(0), theta0)
  phi = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), phi)
  return theta0, phi


def test_supernet_weight_sharing():
  theta0, phi = _super_setup()
  sp = phi["p"]["kernel"]
  assert sp["a_u"].shape == (8, 3) and sp["c_d"].shape == (3, 8) and sp["d"].shape == (6,)
  cfg = LayerConfig("vector", "constant", "vector", "constant", "vector")
  sub = glora_subnet(phi, theta0, r"kernel$", cfg)["p"]["kernel"]
  np.testing.assert_array_equal(sub["a"], sp["a_d"][0])        # vector = first column of Xd
  np.testing.assert_array_equal(sub["b"], sp["b_d"][0, 0])     # constant = Xd[0, 0]
  np.testing.assert_array_equal(sub["c"], sp["c_d"][0])
  np.testing.assert_array_equal(sub["d"], sp["d"][0])
  np.testing.assert_array_equal(sub["e"], sp["e"])
  # the supernet reparam equals the fixed reparam on the sliced phi, and grads reach the supernet
  x = jnp.ones((2, 8))
  r = glora(r"kernel$", rank=3, config=cfg, supernet=True)
  fixed = glora(r"kernel$", rank=3, config=cfg)
  y_sup = H.forward({"lin": r.apply(theta0, phi)["p"]}, x)
  y_fix = H.forward({"lin": fixed.apply(theta0, glora_subnet(phi, theta0, r"kernel$", cfg))["p"]}, x)
  np.testing.assert_allclose(y_sup, y_fix, rtol=1e-6)
  g = jax.grad(lambda ph: jnp.sum(H.forward({"lin": r.apply(theta0, ph)["p"]}, x)))(phi)
  assert float(jnp.abs(g["p"]["kernel"]["a_d"][0]).sum()) > 0
  assert float(jnp.abs(g["p"]["kernel"]["a_d"][1:]).sum()) == 0.0  # only the shared row is used


def test_traced_choices_equal_static_configs():
  """Integer choices (traced under jit, e.g. sampled per step) give the same weights."""
  theta0, phi = _super_setup()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 8)), jnp.float32)

  @jax.jit
  def forward_codes(phi, codes):
    r = glora(r"kernel$", rank=3, config=LayerConfig(*codes), supernet=True)
    t = r.apply(theta0, phi)
    return H.forward({"lin": t["p"]}, x), t["q"]["bias"]

  rng = np.random.default_rng(3)
  for _ in range(6):
    codes = [int(rng.integers(len(CHOICES[t]))) for t in "ABCDE"]
    cfg = LayerConfig(*(CHOICES[t][c] for t, c in zip("ABCDE", codes)))
    t = glora(r"kernel$", rank=3, config=cfg, supernet=True).apply(theta0, phi)
    y, qb = forward_codes(phi, jnp.asarray(codes))
    np.testing.assert_allclose(y, H.forward({"lin": t["p"]}, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qb, t["q"]["bias"], rtol=1e-5, atol=1e-5)


def test_param_count_matches_phi():
  rng = np.random.default_rng(4)
  theta0 = {"l": {"kernel": jnp.ones((12, 5)), "bias": jnp.ones(5)}}
  for _ in range(8):
    cfg = LayerConfig(*(CHOICES[t][rng.integers(len(CHOICES[t]))] for t in "ABCDE"))
    phi = glora("l/kernel", rank=3, config=cfg).init(jax.random.key(0), theta0)
    assert lj.count_params(phi) == glora_param_count(cfg, 12, 5, 3), cfg
  assert glora_layers(theta0, "kernel") == [("l/kernel", 12, 5)]


def _matches(cand, target):
  return sum(a == b for c, t in zip(cand, target) for a, b in zip(c, t))


def test_search_finds_known_optimum():
  layers = [(16, 8), (8, 8), (8, 4)]
  target = (LayerConfig("vector", "lora", "none", "constant", "vector"),
            LayerConfig("none", "constant", "lora", "vector", "none"),
            LayerConfig("lora", "none", "vector", "none", "constant"))
  calls = []

  def fitness(cand):
    calls.append(cand)
    return float(_matches(cand, target))

  res = glora_search(jax.random.key(0), layers, fitness, rank=4, population=30, select=10, mutation=15,
                     crossover=15, epochs=15)
  assert res.best == target and res.best_fitness == 15.0
  assert len(calls) == len(set(calls)) == res.evaluated  # each candidate evaluated once
  assert all(b >= a for a, b in zip(res.history, res.history[1:]))  # top-k never gets worse
  # deterministic given the key
  res2 = glora_search(jax.random.key(0), layers, lambda c: float(_matches(c, target)), rank=4, population=30,
                      select=10, mutation=15, crossover=15, epochs=15)
  assert res2.top == res.top


def test_search_respects_param_limit():
  layers = [(32, 32), (32, 32)]
  cheap = (LayerConfig("constant", "constant", "none", "constant", "constant"),) * 2
  rich = (LayerConfig("lora", "lora", "lora", "vector", "vector"),) * 2
  limit = 200
  n = lambda cand: sum(glora_param_count(c, 32, 32, 4) for c in cand)
  assert n(cheap) <= limit < n(rich)
  seen = []

  def fitness(cand):  # prefers parameters: the optimum under the limit is on the boundary
    seen.append(n(cand))
    return float(n(cand))

  res = glora_search(jax.random.key(1), layers, fitness, rank=4, population=20, epochs=10, param_limit=limit)
  assert max(seen) <= limit
  assert res.best_fitness <= limit and res.best_fitness >= 0.8 * limit
  with pytest.raises(ValueError, match="no random candidate"):
    glora_search(jax.random.key(0), layers, fitness, rank=4, population=5, epochs=1,
                 min_param_limit=10**9)
