"""Adapter merging against peft's add_weighted_adapter (golden), dense math and Eckart-Young."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
import lowrank_jax.merging as mg
from tests.conftest import load_golden

P = "param/base_model.model.lin."
SCALE = 2.0  # both golden adapters: r=4, lora_alpha=8 (checked in test_golden_scales)


def _golden():
  g, meta = load_golden("peft_merge")
  theta0 = {"lin": {"kernel": jnp.asarray(g[P + "base_layer.weight"].T),
                    "bias": jnp.asarray(g[P + "base_layer.bias"])}}
  phis = [{"lin": {"kernel": {"a": jnp.asarray(g[P + f"lora_A.{n}.weight"].T),
                              "b": jnp.asarray(g[P + f"lora_B.{n}.weight"].T)}, "bias": None}}
          for n in ("a", "b")]
  return g, meta, theta0, phis


def _delta_torch(phi_leaf):
  """Torch-layout ``[out, in]`` product ``B A`` of a merged adapter (scale 1)."""
  return np.asarray(phi_leaf["b"]).T @ np.asarray(phi_leaf["a"]).T


def test_golden_scales():
  g, meta, _, phis = _golden()
  cat_A = g["merged/cat/A"]
  np.testing.assert_allclose(cat_A[:4] / (meta["weights"][0] * g[P + "lora_A.a.weight"]), SCALE, rtol=1e-5)
  np.testing.assert_allclose(cat_A[4:] / (meta["weights"][1] * g[P + "lora_A.b.weight"]), SCALE, rtol=1e-5)


@pytest.mark.parametrize("combination", ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune_svd"])
def test_peft_compatible_matches_golden(combination):
  g, meta, _, phis = _golden()
  kw = meta["combinations"][combination]
  m = mg.add_weighted_adapter(phis, meta["weights"], [SCALE, SCALE], combination,
                              peft_compatible=True, **kw)
  leaf = m.phi["lin"]["kernel"]
  assert m.phi["lin"]["bias"] is None
  np.testing.assert_allclose(m.alpha / m.rank, g[f"merged/{combination}/scaling"])
  A_ref, B_ref = g[f"merged/{combination}/A"], g[f"merged/{combination}/B"]
  assert leaf["a"].T.shape == A_ref.shape and leaf["b"].T.shape == B_ref.shape
  if combination.endswith("svd"):
    # SVD factors are sign-ambiguous: compare the products B @ A
    np.testing.assert_allclose(_delta_torch(leaf), B_ref @ A_ref, rtol=1e-4, atol=1e-5)
  else:
    np.testing.assert_allclose(leaf["a"].T, A_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(leaf["b"].T, B_ref, rtol=1e-5, atol=1e-6)


def _dense_deltas(phis, scales):
  return [s * np.asarray(p["lin"]["kernel"]["a"]) @ np.asarray(p["lin"]["kernel"]["b"])
          for p, s in zip(phis, scales)]


def test_default_linear_is_exact_and_peft_linear_is_not():
  g, meta, theta0, phis = _golden()
  w = meta["weights"]
  d = _dense_deltas(phis, [SCALE, SCALE])
  exact = w[0] * d[0] + w[1] * d[1]
  m = mg.add_weighted_adapter(phis, w, [SCALE, SCALE], "linear")
  assert m.rank == 8
  merged = lj.merge(m.reparam(), theta0, m.phi)
  np.testing.assert_allclose(merged["lin"]["kernel"] - theta0["lin"]["kernel"], exact, rtol=1e-4, atol=1e-5)
  # peft's factor-wise linear has cross terms
  pc = mg.add_weighted_adapter(phis, w, [SCALE, SCALE], "linear", peft_compatible=True)
  approx = np.asarray(pc.phi["lin"]["kernel"]["a"]) @ np.asarray(pc.phi["lin"]["kernel"]["b"])
  assert np.abs(approx - exact).max() > 0.1 * np.abs(exact).max()
  # and it equals the closed form (Σ c_i a_i)(Σ c_j b_j), c = sqrt(w s)
  c = np.sqrt(np.array(w) * SCALE)
  A = sum(ci * np.asarray(p["lin"]["kernel"]["a"]) for ci, p in zip(c, phis))
  B = sum(ci * np.asarray(p["lin"]["kernel"]["b"]) for ci, p in zip(c, phis))
  np.testing.assert_allclose(approx, A @ B, rtol=1e-4, atol=1e-5)


def _truncate(m, r):
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r]


def _np_ties(ts, ws, density):
  pruned = []
  for t in ts:
    k = int(density * t.size)
    thr = np.sort(np.abs(t).ravel())[::-1][k - 1]
    pruned.append(np.where(np.abs(t) >= thr, t, 0))
  st = np.stack(pruned)
  elected = np.where(st.sum(0) >= 0, 1, -1)
  agree = np.sign(st) == elected
  return (st * np.array(ws)[:, None, None] * agree).sum(0) / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("combination", ["svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"])
def test_default_mode_against_dense_math(combination):
  g, meta, _, phis = _golden()
  w, density = meta["weights"], 0.5
  d = _dense_deltas(phis, [SCALE, SCALE])
  base = combination.replace("_svd", "")
  if base == "svd":
    ref = w[0] * d[0] + w[1] * d[1]
  elif base == "ties":
    ref = _np_ties(d, w, density)
  else:
    ref = sum(wi * np.asarray(mg.magnitude_prune_tensor(jnp.asarray(t), density)) for wi, t in zip(w, d))
    # magnitude pruning keeps exactly half of the entries of each update
    assert all(np.count_nonzero(np.asarray(mg.magnitude_prune_tensor(jnp.asarray(t), density))) == t.size // 2
               for t in d)
  m = mg.add_weighted_adapter(phis, w, [SCALE, SCALE], combination, density=density, svd_rank=4)
  ours = np.asarray(m.phi["lin"]["kernel"]["a"]) @ np.asarray(m.phi["lin"]["kernel"]["b"])
  np.testing.assert_allclose(ours, _truncate(ref, 4), rtol=1e-3, atol=1e-4)


def test_dare_against_dense_math():
  rng = np.random.default_rng(0)
  ts = [jnp.asarray(rng.normal(size=(6, 5)), jnp.float32) for _ in range(3)]
  key = jax.random.key(3)
  out = mg.dare_linear(key, ts, [0.5, 1.0, -2.0], 0.3)
  keys = jax.random.split(key, 3)
  masks = [np.asarray(jax.random.bernoulli(k, 0.3, (6, 5))) for k in keys]
  ref = sum(w * np.where(m, np.asarray(t), 0) / 0.3 for w, m, t in zip([0.5, 1.0, -2.0], masks, ts))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  assert 0.1 < np.mean(np.concatenate([m.ravel() for m in masks])) < 0.5
  # density 1: no pruning, no rescale
  np.testing.assert_allclose(mg.dare_linear(key, ts, [1, 1, 1], 1.0), sum(np.asarray(t) for t in ts), rtol=1e-6)
  # dare_ties with density 1 is ties without pruning
  np.testing.assert_allclose(mg.dare_ties(key, ts, [1, 2, 3], 1.0), mg.ties(ts, [1, 2, 3], 1.0), rtol=1e-6)
  # through add_weighted_adapter: requires a key
  g, meta, _, phis = _golden()
  with pytest.raises(ValueError, match="key="):
    mg.add_weighted_adapter(phis, [1, 1], [SCALE, SCALE], "dare_linear", density=0.5)
  m = mg.add_weighted_adapter(phis, [1, 1], [SCALE, SCALE], "dare_linear_svd", density=0.5, key=key)
  assert m.phi["lin"]["kernel"]["a"].shape == (64, 4)


def test_majority_sign_methods():
  st = jnp.asarray([[1.0, -3.0], [1.0, 1.0], [-5.0, 1.0]])
  # totals (-3, -1) elect (-, -); sign counts (+1, +1) elect (+, +)
  np.testing.assert_array_equal(mg.majority_sign_mask(st, "total"),
                                np.array([[False, True], [False, False], [True, False]]))
  np.testing.assert_array_equal(mg.majority_sign_mask(st, "frequency"),
                                np.array([[True, False], [True, True], [False, True]]))


def test_stack_equals_cat_merge():
  g, meta, theta0, phis = _golden()
  r = lj.lora("lin/kernel", rank=4, alpha=8)
  reparam, phi = mg.stack((r, phis[0]), (r, phis[1]))
  stacked = lj.merge(reparam, theta0, phi)
  m = mg.add_weighted_adapter(phis, [1.0, 1.0], [SCALE, SCALE], "cat")
  chex.assert_trees_all_close(stacked, lj.merge(m.reparam(), theta0, m.phi), rtol=1e-5, atol=1e-5)
  d = _dense_deltas(phis, [SCALE, SCALE])
  np.testing.assert_allclose(stacked["lin"]["kernel"], np.asarray(theta0["lin"]["kernel"]) + d[0] + d[1],
                             rtol=1e-5, atol=1e-5)


def test_extract_lora_eckart_young():
  rng = np.random.default_rng(0)
  w0 = jnp.asarray(rng.normal(size=(20, 16)), jnp.float32)
  low = rng.normal(size=(20, 3)) @ rng.normal(size=(3, 16))
  noise = 0.01 * rng.normal(size=(20, 16))
  theta0 = {"w": w0, "bias": jnp.zeros(16)}
  theta_ft = {"w": w0 + jnp.asarray(low + noise, jnp.float32), "bias": jnp.ones(16)}
  reparam, phi = mg.extract_lora(theta_ft, theta0, rank=3, alpha=6.0)
  assert phi["bias"] is None and phi["w"]["a"].shape == (20, 3)
  rec = lj.merge(reparam, theta0, phi)["w"] - w0
  sv = np.linalg.svd(low + noise, compute_uv=False)
  np.testing.assert_allclose(np.linalg.norm(rec - (low + noise)), np.sqrt(np.sum(sv[3:] ** 2)), rtol=1e-3)
  # exact when the true rank fits
  _, phi5 = mg.extract_lora({"w": w0 + jnp.asarray(low, jnp.float32)}, {"w": w0}, rank=5)
  np.testing.assert_allclose(lj.merge(lj.lora("w", rank=5), {"w": w0}, phi5)["w"] - w0, low, atol=1e-4)
  with pytest.raises(ValueError, match="exceeds"):
    mg.extract_lora(theta_ft, theta0, rank=17)


def test_errors_and_single_adapter():
  g, meta, _, phis = _golden()
  with pytest.raises(ValueError, match="unknown combination"):
    mg.add_weighted_adapter(phis, [1, 1], [1, 1], "average")
  with pytest.raises(ValueError, match="density"):
    mg.add_weighted_adapter(phis, [1, 1], [1, 1], "ties")
  dora_like = {"lin": {"kernel": {**phis[0]["lin"]["kernel"], "m": jnp.ones(48)}, "bias": None}}
  with pytest.raises(ValueError, match=r"leaf 'lin/kernel' has keys \['a', 'b', 'm'\]"):
    mg.add_weighted_adapter([dora_like, phis[1]], [1, 1], [1, 1], "cat")
  small = {"lin": {"kernel": {"a": phis[1]["lin"]["kernel"]["a"][:, :2],
                              "b": phis[1]["lin"]["kernel"]["b"][:2]}, "bias": None}}
  with pytest.raises(ValueError, match="equal rank"):
    mg.add_weighted_adapter([phis[0], small], [1, 1], [1, 1], "linear", peft_compatible=True)
  # ranks may differ for cat and svd
  assert mg.add_weighted_adapter([phis[0], small], [1, 1], [1, 1], "cat").rank == 6
  assert mg.add_weighted_adapter([phis[0], small], [1, 1], [1, 1], "svd").rank == 4
  # a single adapter: peft forces linear, which is exact for one adapter up to the sqrt split
  one = mg.add_weighted_adapter(phis[:1], [0.5], [SCALE], "svd", peft_compatible=True)
  np.testing.assert_allclose(_delta_torch(one.phi["lin"]["kernel"]).T, 0.5 * _dense_deltas(phis[:1], [SCALE])[0],
                             rtol=1e-5, atol=1e-6)


def test_lj_merge_still_callable_after_import():
  """Importing lowrank_jax.merging leaves the package's ``merge`` function alone."""
  import importlib
  importlib.import_module("lowrank_jax.merging")
  theta0 = {"w": jnp.ones((3, 2))}
  phi = {"w": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 2))}}
  out = lj.merge(lj.lora("w", rank=1), theta0, phi)
  np.testing.assert_allclose(out["w"], 2 * np.ones((3, 2)))
  assert callable(mg.add_weighted_adapter)
