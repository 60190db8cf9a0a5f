"""Intrinsic SAID: FWHT against a dense Hadamard matrix, Fastfood against the explicit dense
H G Π H B matrix, gradients in closed form, O(D) memory (jaxpr inspection) and jit."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings, strategies as st

import lowrank_jax as lj
from lowrank_jax.methods import said


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 64, 128, 2048, 4096])
def test_fwht_equals_dense_hadamard(n):
  x = np.random.default_rng(n).normal(size=(3, n)).astype(np.float32)
  tol = 1e-5 * max(np.sqrt(n), 10.0)  # entries grow like sqrt(n); float64 reference
  ref = x.astype(np.float64) @ scipy.linalg.hadamard(n)
  np.testing.assert_allclose(said.fwht(jnp.asarray(x)), ref, rtol=1e-5, atol=tol)
  # H H = n I
  np.testing.assert_allclose(said.fwht(said.fwht(jnp.asarray(x))), n * x, rtol=1e-5, atol=tol * np.sqrt(n))
  with pytest.raises(ValueError, match="power-of-two"):
    said.fwht(jnp.ones(6))


def test_fwht_shapes_and_gradient():
  """Any leading shape; H is symmetric, so the VJP of x -> x H is c -> c H."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 256)).astype(np.float32)
  H = scipy.linalg.hadamard(256)
  np.testing.assert_allclose(said.fwht(jnp.asarray(x)), x @ H, rtol=1e-5, atol=1e-4)
  v = rng.normal(size=512).astype(np.float32)
  np.testing.assert_allclose(said.fwht(jnp.asarray(v)), v @ scipy.linalg.hadamard(512), rtol=1e-5, atol=1e-4)
  c = rng.normal(size=x.shape).astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(said.fwht(x) * c))(jnp.asarray(x))
  np.testing.assert_allclose(g, c @ H, rtol=1e-5, atol=1e-4)


def _dense_fastfood(params: said.FastfoodParams, d_out: int, d: int) -> np.ndarray:
  """The explicit [d_out, d] matrix (H G Π H B)[:d_out, :d] / divisor, built from numpy."""
  n = params.b.shape[0]
  H = scipy.linalg.hadamard(n).astype(np.float64)
  Pi = np.zeros((n, n))
  Pi[np.arange(n), np.asarray(params.perm)] = 1.0
  M = H @ np.diag(np.asarray(params.g, np.float64)) @ Pi @ H @ np.diag(np.asarray(params.b, np.float64))
  M = M[:d_out] / float(params.divisor)
  if d <= n:
    return M[:, :d]
  return np.concatenate([M, np.zeros((d_out, d - n))], axis=1)  # z is truncated to n entries


@settings(max_examples=8, deadline=None)
@given(d_out=st.integers(1, 40), d=st.integers(1, 70), seed=st.integers(0, 100))
def test_fastfood_equals_dense_matrix(d_out, d, seed):
  params = said.fastfood_params(jax.random.key(seed), d_out)
  n = params.b.shape[0]
  assert n >= d_out and n & (n - 1) == 0 and (n == 1 or n // 2 < d_out)
  # P applied to the identity columns
  P = np.asarray(jax.jit(jax.vmap(lambda e, p: said.fastfood(e, p, d_out), (0, None), 1))(jnp.eye(d), params))
  np.testing.assert_allclose(P, _dense_fastfood(params, d_out, d), rtol=1e-4, atol=1e-5)
  # normalisation: divisor^2 = n * sum(g^2) * d_out / n
  np.testing.assert_allclose(float(params.divisor) ** 2, float(np.sum(np.asarray(params.g) ** 2)) * d_out,
                             rtol=1e-5)


def _theta():
  k = jax.random.split(jax.random.key(0), 3)
  return {"dense": {"kernel": jax.random.normal(k[0], (6, 5)), "bias": jax.random.normal(k[1], (5,))},
          "emb": jax.random.normal(k[2], (3, 4)).astype(jnp.bfloat16),
          "step": jnp.asarray(3, jnp.int32)}


def _dense_projections(theta0, reparam_seed, selected_paths, d_z):
  root = jax.random.key(reparam_seed)
  out = {}
  for i, (p, w) in enumerate([(p, w) for p, w in lj.flatten_with_paths(theta0) if p in selected_paths]):
    size = int(np.prod(w.shape))
    out[p] = _dense_fastfood(said.fastfood_params(jax.random.fold_in(root, i), size), size, d_z)
  return out


def test_reparam_against_dense_projection_and_grads():
  theta0 = _theta()
  d = 20
  r = said.intrinsic_said(d, seed=7)
  phi = r.init(jax.random.key(1), theta0)
  paths = ["dense/bias", "dense/kernel", "emb"]  # every float leaf, not the int step
  assert phi["z"].shape == (d - 3,) and phi["lam"].shape == (3,)
  np.testing.assert_array_equal(phi["z"], 0)
  apply = jax.jit(r.apply)
  out0 = apply(theta0, phi)
  for p, w in lj.flatten_with_paths(theta0):
    np.testing.assert_array_equal(dict(lj.flatten_with_paths(out0))[p], w)
  rng = np.random.default_rng(0)
  phi = {"z": jnp.asarray(rng.normal(size=d - 3), jnp.float32), "lam": jnp.asarray([0.5, -2.0, 3.0])}
  out = apply(theta0, phi)
  dense = _dense_projections(theta0, 7, paths, d - 3)
  flat_out = dict(lj.flatten_with_paths(out))
  for i, p in enumerate(paths):
    w0 = np.asarray(dict(lj.flatten_with_paths(theta0))[p], np.float32)
    ref = w0 + float(phi["lam"][i]) * (dense[p] @ np.asarray(phi["z"])).reshape(w0.shape)
    tol = 2e-2 if p == "emb" else 1e-5
    np.testing.assert_allclose(np.asarray(flat_out[p], np.float32), ref, rtol=tol, atol=tol)
  assert out["emb"].dtype == jnp.bfloat16 and out["step"].dtype == jnp.int32
  # gradients: dL/dz = Σ_i λ_i P_iᵀ g_i, dL/dλ_i = g_i · P_i z for L = Σ <θ_i, C_i>
  C = {p: rng.normal(size=np.shape(dict(lj.flatten_with_paths(theta0))[p])).astype(np.float32) for p in paths[:2]}

  def loss(phi):
    th = r.apply(theta0, phi)
    return jnp.sum(th["dense"]["bias"] * C["dense/bias"]) + jnp.sum(th["dense"]["kernel"] * C["dense/kernel"])

  g = jax.jit(jax.grad(loss))(phi)
  gz = sum(float(phi["lam"][i]) * dense[p].T @ C[p].ravel() for i, p in enumerate(paths[:2]))
  np.testing.assert_allclose(g["z"], gz, rtol=1e-4, atol=1e-5)
  for i, p in enumerate(paths[:2]):
    np.testing.assert_allclose(g["lam"][i], C[p].ravel() @ dense[p] @ np.asarray(phi["z"]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g["lam"][2], 0.0)
  # unmerge inverts apply on the float32 leaves
  back = r.unmerge(out, phi)
  np.testing.assert_allclose(back["dense"]["kernel"], theta0["dense"]["kernel"], atol=1e-5)


def test_did_variant_and_where():
  theta0 = _theta()
  r = said.intrinsic_said(8, where=r"kernel", said=False)
  phi = r.init(jax.random.key(0), theta0)
  assert set(phi) == {"z"} and phi["z"].shape == (8,)
  out = r.apply(theta0, {"z": jnp.ones(8)})
  np.testing.assert_array_equal(out["dense"]["bias"], theta0["dense"]["bias"])
  assert not np.allclose(out["dense"]["kernel"], theta0["dense"]["kernel"])
  with pytest.raises(ValueError, match="must exceed"):
    said.intrinsic_said(3).init(jax.random.key(0), theta0)
  with pytest.raises(TypeError, match="step"):
    said.intrinsic_said(8, where="step", said=False).init(jax.random.key(0), theta0)
  with pytest.raises(ValueError, match="phi\\['z'\\] has shape"):
    r.apply(theta0, {"z": jnp.ones(5)})


def _all_avals(jaxpr):
  for v in list(jaxpr.invars) + list(jaxpr.outvars) + list(jaxpr.constvars):
    if hasattr(v, "aval"):
      yield v.aval
  for eqn in jaxpr.eqns:
    for v in list(eqn.invars) + list(eqn.outvars):
      if hasattr(v, "aval"):
        yield v.aval
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _all_avals(sub)


def test_memory_is_linear_in_D():
  """No intermediate of the forward or backward pass has D x d entries (the dense P)."""
  D_shape, d = (64, 64), 512  # D = 4096, dense P would hold 2M entries
  theta0 = {"w": jnp.zeros(D_shape)}
  r = said.intrinsic_said(d, seed=1)
  phi = r.init(jax.random.key(0), theta0)

  def loss(phi):
    return jnp.sum(r.apply(theta0, phi)["w"] ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(phi).jaxpr
  sizes = [int(np.prod(a.shape)) for a in _all_avals(jaxpr) if hasattr(a, "shape")]
  D = 64 * 64
  assert max(sizes) <= 4 * D, max(sizes)  # O(D): a few padded copies at most
  assert max(sizes) < D * d // 100


def test_jit_matches_eager():
  theta0 = _theta()
  r = said.intrinsic_said(30, seed=3)
  phi = {"z": jnp.linspace(-1, 1, 27), "lam": jnp.asarray([1.0, 0.5, 2.0])}
  eager = r.apply(theta0, phi)
  jitted = jax.jit(r.apply)(theta0, phi)
  for (p, a), (_, b) in zip(lj.flatten_with_paths(eager), lj.flatten_with_paths(jitted)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-5,
                               err_msg=p)


@settings(max_examples=20, deadline=None)
@given(d_out=st.integers(1, 5000), seed=st.integers(0, 2**31 - 1))
def test_fastfood_params_are_a_permutation_and_signs(d_out, seed):
  params = said.fastfood_params(jax.random.key(seed), d_out)
  n = params.b.shape[0]
  np.testing.assert_array_equal(np.sort(np.asarray(params.perm)), np.arange(n))
  assert set(np.unique(np.asarray(params.b)).tolist()) <= {-1.0, 1.0}
  assert params.perm.dtype == jnp.int32 and params.g.shape == (n,)


def test_fastfood_params_statistics():
  """The hashed diagonals behave like the i.i.d. draws of Le et al.: G standard normal (moments,
  tails), B fair signs, Π uncorrelated with the index (n = 2^20)."""
  n = 1 << 20
  p = jax.jit(lambda k: said.fastfood_params(k, n))(jax.random.key(11))
  g, b, perm = np.asarray(p.g, np.float64), np.asarray(p.b), np.asarray(p.perm)
  se = 1 / np.sqrt(n)
  assert abs(g.mean()) < 5 * se and abs(g.std() - 1) < 5 * se * np.sqrt(2)
  assert abs(np.mean(g ** 4) - 3) < 5 * se * np.sqrt(96)
  np.testing.assert_allclose(np.mean(np.abs(g) > 3), 2 * 0.0013499, rtol=0.1)
  assert abs(b.mean()) < 5 * se
  assert abs(np.corrcoef(np.arange(n), perm)[0, 1]) < 5 * se
  # displacement of neighbours: |π(j+1) - π(j)| / n of a uniform permutation has mean 1/3
  np.testing.assert_allclose(np.mean(np.abs(np.diff(perm))) / n, 1 / 3, atol=0.01)
  # different keys give different projections
  q = said.fastfood_params(jax.random.key(12), n)
  assert np.mean(np.asarray(q.perm) == perm) < 1e-3 and np.mean(np.asarray(q.b) == b) < 0.55


def test_hashed_normal_is_finite_at_the_extremes():
  """The largest and smallest hash words map inside (0, 1): no infinite G entry (a 24-bit
  uniform rounded 1 - 2^-25 up to 1.0 in float32, and a MiniLM SAID run went NaN)."""
  bits = jnp.asarray([0, 1, 2**31, 2**32 - 512, 2**32 - 1], jnp.uint32)
  g = np.asarray(said._normal_from_bits(bits))
  assert np.all(np.isfinite(g)) and g[0] < -5 and g[-1] > 5
  np.testing.assert_allclose(g[-1], -g[0], rtol=1e-5)
  # every entry of many diagonals is finite
  for seed in range(8):
    p = said.fastfood_params(jax.random.key(seed), 1 << 20)
    assert np.all(np.isfinite(np.asarray(p.g))) and np.isfinite(float(p.divisor))
