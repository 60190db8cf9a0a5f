"""LoRA against peft's golden outputs, closed-form math and dense references."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings, strategies as st

import lowrank_jax as lj
from tests.methods import peft_harness as H

SPEC = {"lin/kernel/a": "lora_A.default.weight", "lin/kernel/b": "lora_B.default.weight"}


def _reparam(cfg):
  return lj.lora("lin/kernel", rank=cfg["r"], alpha=cfg["lora_alpha"], rslora=cfg["use_rslora"])


def _peft_scale(cfg):
  return cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])


@pytest.mark.parametrize("name", ["peft_lora", "peft_lora_rslora"])
def test_matches_peft(name):
  """``y``, gradients and merge (lazy and materialized paths) against the golden file, and
  unmerge(merge) == theta0; the stored merge is ``W + s·B A`` with peft's (rs)LoRA scale."""
  g, meta, _ = H.golden_linear(name)
  cfg = meta["config"]
  H.assert_merge_is(g, _peft_scale(cfg) * np.asarray(H.peft_param(g, "lora_B.default.weight"), np.float64)
                    @ np.asarray(H.peft_param(g, "lora_A.default.weight"), np.float64))
  H.check_against_peft(name, _reparam(cfg), SPEC, lazy_type=lj.LoRAWeight)


@pytest.mark.parametrize("name", ["peft_lora", "peft_lora_rslora"])
def test_peft_itself_agrees(name):
  """Runs peft (optional extra) on the stored params: it gives the stored ``y`` and ours."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  g, meta, theta0 = H.golden_linear(name)
  cfg = meta["config"]
  reparam = _reparam(cfg)
  phi = H.phi_from_peft(g, reparam, theta0, SPEC)

  pm = H.peft_linear(peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                                     use_rslora=cfg["use_rslora"], target_modules=["lin"]))
  pm.load_state_dict({k[len("param/"):]: torch.tensor(v) for k, v in g.items() if k.startswith("param/")},
                     strict=False)
  y_peft = pm(torch.tensor(g["x"])).detach().numpy()
  np.testing.assert_allclose(y_peft, g["y"], rtol=1e-5, atol=1e-5)
  y = H.forward(reparam.apply(theta0, phi), jnp.asarray(g["x"]))
  np.testing.assert_allclose(y, y_peft, rtol=1e-5, atol=1e-5)


def test_scaling_closed_form():
  assert lj.lora_scale(4, 8) == 2.0
  assert lj.lora_scale(4, 8, rslora=True) == 4.0
  assert lj.lora_scale(16, None) == 1.0


def _theta(key, d_in=32, d_out=24, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  return {"l": {"kernel": jax.random.normal(k1, (d_in, d_out), dtype), "bias": jnp.zeros(d_out, dtype)},
          "m": {"kernel": jax.random.normal(k2, (d_out, d_in), dtype)}}


def test_kaiming_init_matches_peft_distribution():
  theta0 = {"w": jnp.zeros((400, 300))}
  phi = lj.lora("w", rank=64).init(jax.random.key(0), theta0)
  a, b = phi["w"]["a"], phi["w"]["b"]
  bound = 1 / math.sqrt(400)
  assert float(jnp.max(jnp.abs(a))) <= bound
  # Uniform(-c, c) has variance c^2/3.
  np.testing.assert_allclose(float(jnp.var(a)), bound**2 / 3, rtol=0.05)
  assert float(jnp.max(jnp.abs(b))) == 0.0
  # B = 0 makes the adapted model equal to the base at init.
  chex.assert_trees_all_close(lj.merge(lj.lora("w", rank=64), theta0, phi), theta0)


def test_gaussian_init_std():
  theta0 = {"w": jnp.zeros((500, 400))}
  phi = lj.lora("w", rank=8, init="gaussian").init(jax.random.key(1), theta0)
  np.testing.assert_allclose(float(jnp.std(phi["w"]["a"])), 1 / 8, rtol=0.03)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_preserve_weights(init):
  theta0 = _theta(jax.random.key(2))
  reparam = lj.lora(r"kernel$", rank=4, alpha=8, init=init)
  with pytest.raises(ValueError, match="rewrites"):
    reparam.init(jax.random.key(0), theta0)
  base, phi = lj.initialize(reparam, jax.random.key(0), theta0)
  # residual + s A B reproduces the original weights
  chex.assert_trees_all_close(lj.merge(reparam, base, phi), theta0, atol=1e-5)
  w = np.asarray(theta0["l"]["kernel"])
  delta = np.asarray(theta0["l"]["kernel"] - base["l"]["kernel"])
  if init == "pissa":
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(delta, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-4)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(base["l"]["kernel"]), compute_uv=False),
                               np.concatenate([s[4:], np.zeros(4)]), atol=1e-4)
  else:
    q, _ = np.linalg.qr(w.T)  # B's columns (torch layout) are orthonormal
    bt = np.asarray(phi["l"]["kernel"]["b"]).T
    np.testing.assert_allclose(np.abs(bt.T @ bt), np.eye(4), atol=1e-5)
    np.testing.assert_allclose(np.abs(bt), np.abs(q[:, :4]), atol=1e-5)


@settings(max_examples=12, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(d_in=st.integers(2, 40), d_out=st.integers(2, 40), rank_frac=st.floats(0.01, 1.0),
       batch=st.integers(1, 5), seed=st.integers(0, 2**16),
       mode=st.sampled_from(["factored", "merged"]))
def test_lazy_equals_dense_property(d_in, d_out, rank_frac, batch, seed, mode):
  rank = max(1, int(rank_frac * min(d_in, d_out)))
  key = jax.random.key(seed)
  kw, kx, ka, kb = jax.random.split(key, 4)
  theta0 = {"w": jax.random.normal(kw, (d_in, d_out))}
  reparam = lj.lora("w", rank=rank, alpha=2 * rank, matmul=mode)
  phi = {"w": {"a": jax.random.normal(ka, (d_in, rank)) / np.sqrt(d_in),
               "b": jax.random.normal(kb, (rank, d_out)) / np.sqrt(rank)}}
  x = jax.random.normal(kx, (batch, d_in)) / np.sqrt(d_in)

  def loss(phi, lazy):
    theta = reparam.apply(theta0, phi)
    if not lazy:
      theta = lj.materialize(theta)
    return jnp.sum(jnp.tanh(lj.dot(x, theta["w"])))

  dense_w = np.asarray(theta0["w"]) + 2.0 * np.asarray(phi["w"]["a"]) @ np.asarray(phi["w"]["b"])

  @jax.jit
  def run(phi):
    y = lj.dot(x, reparam.apply(theta0, phi)["w"])
    return y, jax.grad(loss)(phi, True), jax.grad(loss)(phi, False)

  y, g_lazy, g_dense = run(phi)
  np.testing.assert_allclose(y, np.asarray(x) @ dense_w, rtol=1e-4, atol=1e-5)
  # float32 sums taken in another order: the error scales with the largest gradient entry
  # (a wrong formula is off by O(1) of it), not with each entry (a tiny one may lose all digits)
  scale = max(1.0, max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_dense)))
  chex.assert_trees_all_close(g_lazy, g_dense, rtol=1e-5, atol=2e-6 * scale)


def test_lazy_backward_has_no_dense_weight_gradient():
  """The lazy path never forms an [in, out] array in the gradient computation."""
  d_in, d_out, r = 96, 80, 4
  theta0 = {"w": jnp.ones((d_in, d_out))}
  reparam = lj.lora("w", rank=r)
  phi = reparam.init(jax.random.key(0), theta0)
  x = jnp.ones((3, d_in))

  def loss(phi, lazy):
    theta = reparam.apply(theta0, phi)
    theta = theta if lazy else lj.materialize(theta)
    return jnp.sum(lj.dot(x, theta["w"]))

  def shapes(lazy):
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(p, lazy)))(phi)
    out = set()
    for eqn in jaxpr.jaxpr.eqns:
      for v in eqn.outvars:
        out.add(tuple(v.aval.shape))
    return out

  assert (d_in, d_out) not in shapes(True)
  assert (d_in, d_out) in shapes(False)  # the reference path does form it


def test_merged_matmul_equals_factored_with_every_gradient():
  """matmul="merged": same output and A/B gradients as the factored form on a 3-d input;
  the base gradient (when the base is differentiated too) is the dense one; dropout and
  quantized bases fall back to the factored form; a bad mode names the options."""
  k = jax.random.split(jax.random.key(0), 4)
  theta0 = {"w": jax.random.normal(k[0], (24, 20))}
  x = jax.random.normal(k[1], (2, 5, 24)) / np.sqrt(24)
  phi = {"w": {"a": jax.random.normal(k[2], (24, 4)) / np.sqrt(24), "b": jax.random.normal(k[3], (4, 20))}}

  def loss(phi, theta0, mode, rng=None, dropout=0.0):
    w = lj.lora("w", rank=4, alpha=8, matmul=mode, dropout=dropout).apply(theta0, phi, rng=rng)["w"]
    return jnp.sum(jnp.tanh(lj.dot(x, w)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=(2, 4))
  g_f, g_m = grad(phi, theta0, "factored"), grad(phi, theta0, "merged")
  chex.assert_trees_all_close(g_m, g_f, rtol=1e-5, atol=1e-5)
  w = np.asarray(theta0["w"]) + 2.0 * np.asarray(phi["w"]["a"]) @ np.asarray(phi["w"]["b"])
  gy = (1 - np.tanh(np.asarray(x) @ w) ** 2).reshape(-1, 20)
  np.testing.assert_allclose(g_m[1]["w"], np.asarray(x).reshape(-1, 24).T @ gy, rtol=1e-4, atol=1e-4)
  rng = jax.random.key(5)
  np.testing.assert_allclose(loss(phi, theta0, "merged", rng, 0.5), loss(phi, theta0, "factored", rng, 0.5),
                             rtol=1e-6)
  q = lj.quantize(theta0, "w", codec="nf4", block_size=16)
  np.testing.assert_allclose(loss(phi, q, "merged"), loss(phi, q, "factored"), rtol=1e-5)
  with pytest.raises(ValueError, match="lora: parameter 'matmul' must be one of 'factored', 'merged', got str 'fused'"):
    lj.lora("w", rank=4, matmul="fused")


def test_dropout_only_through_lazy_matmul():
  theta0 = {"w": jnp.zeros((64, 16))}
  reparam = lj.lora("w", rank=4, dropout=0.5)
  phi = {"w": {"a": jnp.ones((64, 4)), "b": jnp.ones((4, 16))}}
  x = jnp.ones((8, 64))
  y_eval = lj.dot(x, reparam.apply(theta0, phi)["w"])
  np.testing.assert_allclose(y_eval, 256 * jnp.ones((8, 16)))  # s = alpha/r = 1: (1·64 per rank) · 4
  y1 = lj.dot(x, reparam.apply(theta0, phi, rng=jax.random.key(0))["w"])
  y2 = lj.dot(x, reparam.apply(theta0, phi, rng=jax.random.key(1))["w"])
  assert not np.allclose(y1, y2)
  # inverted dropout keeps the expectation
  np.testing.assert_allclose(float(jnp.mean(y1)), float(jnp.mean(y_eval)), rtol=0.15)


def test_bias_modes():
  theta0 = _theta(jax.random.key(3))
  phi = lj.lora(r"l/kernel", rank=2, bias="lora_only").init(jax.random.key(0), theta0)
  assert phi[1]["l"]["bias"] is not None and phi[1]["m"]["kernel"] is None
  phi_all = lj.lora(r"kernel", rank=2, bias="all").init(jax.random.key(0), theta0)
  assert lj.count_params(phi_all[1]) == 24
  with pytest.raises(ValueError, match="lora: parameter 'bias' must be one of 'none', 'all', 'lora_only'"):
    lj.lora("kernel", rank=2, bias="some")


def test_errors_name_the_leaf():
  theta0 = {"w": jnp.zeros((8, 6)), "t": jnp.zeros((4, 3, 2)), "i": jnp.zeros((4, 4), jnp.int32)}
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"selects no leaf[\s\S]*w  \(8, 6\)"):
    lj.lora("nope", rank=2).init(key, theta0)
  with pytest.raises(ValueError, match=r"rank 7 exceeds .* 'w' of shape \(8, 6\)"):
    lj.lora("^w$", rank=7).init(key, theta0)
  with pytest.raises(ValueError, match=r"'t' has shape \(4, 3, 2\), not a matrix"):
    lj.lora("^t$", rank=2).init(key, theta0)
  with pytest.raises(TypeError, match=r"'i' has dtype int32"):
    lj.lora("^i$", rank=2).init(key, theta0)
  with pytest.raises(ValueError, match="positive int"):
    lj.lora("w", rank=0)


def test_nd_weight_with_in_ndim():
  # e.g. a DenseGeneral attention kernel [in, heads, head_dim]
  theta0 = {"t": jax.random.normal(jax.random.key(0), (12, 3, 4))}
  reparam = lj.lora("t", rank=2, in_ndim=1)
  phi = reparam.init(jax.random.key(1), theta0)
  phi = jax.tree.map(lambda p: p + 1.0, phi)
  merged = lj.merge(reparam, theta0, phi)["t"]
  dense = theta0["t"] + (phi["t"]["a"] @ phi["t"]["b"]).reshape(12, 3, 4)
  np.testing.assert_allclose(merged, dense, rtol=1e-6)


def test_bfloat16_base_keeps_dtype_and_fp32_adapters():
  theta0 = {"w": jax.random.normal(jax.random.key(0), (16, 8)).astype(jnp.bfloat16)}
  reparam = lj.lora("w", rank=2)
  phi = reparam.init(jax.random.key(1), theta0)
  assert phi["w"]["a"].dtype == jnp.float32
  theta = reparam.apply(theta0, phi)
  x = jnp.ones((2, 16), jnp.bfloat16)
  assert lj.dot(x, theta["w"]).dtype == jnp.bfloat16
  assert lj.merge(reparam, theta0, phi)["w"].dtype == jnp.bfloat16


def test_chain_of_two_loras_adds_updates():
  theta0 = {"w": jax.random.normal(jax.random.key(0), (10, 6))}
  r = lj.chain(lj.lora("w", rank=2, alpha=2), lj.lora("w", rank=3, alpha=6))
  phi = r.init(jax.random.key(1), theta0)
  phi = jax.tree.map(lambda p: p + 0.5, phi)
  merged = lj.merge(r, theta0, phi)["w"]
  dense = theta0["w"] + phi[0]["w"]["a"] @ phi[0]["w"]["b"] + 2 * phi[1]["w"]["a"] @ phi[1]["w"]["b"]
  np.testing.assert_allclose(merged, dense, rtol=1e-5)
  x = jnp.ones((4, 10))
  np.testing.assert_allclose(lj.dot(x, r.apply(theta0, phi)["w"]), x @ dense, rtol=1e-5)
  chex.assert_trees_all_close(lj.unmerge(r, {"w": merged}, phi), theta0, atol=1e-5)
