"""QLoRA: quantized frozen leaves, LoRA on top, gradients vs the dequantized dense weight,
no dense weight among the backward residuals."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.quant.qlora import QuantizedWeight, dequantize, quantize, quantized_bytes


def _theta(key=0, d=128, h=256):
  k = jax.random.split(jax.random.PRNGKey(key), 4)
  return {"l0": {"kernel": jax.random.normal(k[0], (d, h)) * 0.05, "bias": jnp.zeros((h,))},
          "l1": {"kernel": jax.random.normal(k[1], (h, d)) * 0.05, "bias": jnp.zeros((d,))},
          "step": jnp.array(3, jnp.int32)}


def _model(theta, x):
  h = jax.nn.gelu(lj.dot(x, theta["l0"]["kernel"]) + theta["l0"]["bias"])
  return lj.dot(h, theta["l1"]["kernel"]) + theta["l1"]["bias"]


@pytest.mark.parametrize("codec", ["nf4", "fp4", "int8"])
def test_quantize_selects_and_keeps_rest(codec):
  theta = _theta()
  tq = quantize(theta, r"kernel$", codec=codec, block_size=64 if codec != "int8" else 256)
  assert isinstance(tq["l0"]["kernel"], QuantizedWeight)
  assert tq["l0"]["kernel"].shape == (128, 256) and tq["l0"]["kernel"].dtype == jnp.float32
  assert tq["l0"]["bias"] is theta["l0"]["bias"] and tq["step"] is theta["step"]
  dense = dequantize(tq)
  err = float(jnp.max(jnp.abs(dense["l0"]["kernel"] - theta["l0"]["kernel"])))
  assert 0 < err < 0.2 * float(jnp.max(jnp.abs(theta["l0"]["kernel"])))
  stats = quantized_bytes(tq)
  assert stats["params"] == 2 * 128 * 256
  if codec == "nf4":
    assert abs(stats["bits_per_param"] - 4.127) < 0.01


def test_matmul_equals_dense_dequantized():
  theta = _theta()
  tq = quantize(theta, r"kernel$")
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 7, 128))
  y = jax.jit(_model)(tq, x)
  chex.assert_trees_all_close(y, _model(dequantize(tq), x), atol=1e-5, rtol=1e-5)
  # bf16 compute dtype: decoded block and matmul in bf16, output in x's dtype
  tb = quantize(theta, r"kernel$", compute_dtype=jnp.bfloat16)
  yb = _model(tb, x)
  assert yb.dtype == jnp.float32
  chex.assert_trees_all_close(yb, y, atol=5e-2, rtol=5e-2)


def test_qlora_grads_equal_lora_on_dequantized_weight():
  theta = _theta()
  tq = quantize(theta, r"kernel$")
  td = dequantize(tq)
  reparam = lj.lora(r"kernel$", rank=4, alpha=8)
  phi = reparam.init(jax.random.PRNGKey(1), tq)
  phi = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.PRNGKey(2), p.shape), phi)
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 128))
  tgt = jax.random.normal(jax.random.PRNGKey(4), (8, 128))

  def loss(phi, base):
    return jnp.mean((_model(reparam.apply(base, phi), x) - tgt) ** 2)

  lq, gq = jax.jit(jax.value_and_grad(loss))(phi, tq)
  ld, gd = jax.value_and_grad(loss)(phi, td)
  np.testing.assert_allclose(lq, ld, rtol=1e-5)
  chex.assert_trees_all_close(gq, gd, atol=1e-5, rtol=1e-5)


def test_backward_keeps_no_dense_weight():
  theta = _theta(d=128, h=256)
  tq = quantize(theta, r"kernel$")
  reparam = lj.lora(r"kernel$", rank=4)
  phi = reparam.init(jax.random.PRNGKey(1), tq)
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 128))

  def f(phi):
    return _model(reparam.apply(tq, phi), x)

  _, vjp_fn = jax.vjp(f, phi)
  residuals = jax.tree_util.tree_leaves(vjp_fn)
  shapes = {tuple(r.shape) for r in residuals if jnp.issubdtype(r.dtype, jnp.floating)}
  assert (128, 256) not in shapes and (256, 128) not in shapes, shapes
  # the same check on the dense base finds the weight among the residuals
  _, vjp_dense = jax.vjp(lambda phi: _model(reparam.apply(dequantize(tq), phi), x), phi)
  dense_shapes = {tuple(r.shape) for r in jax.tree_util.tree_leaves(vjp_dense)}
  assert (256, 128) in dense_shapes or (128, 256) in dense_shapes
  # the 4-bit codes are what the backward keeps
  assert any(r.dtype == jnp.uint8 and r.shape == (128 * 256 // 2,) for r in residuals)


def test_lora_pissa_on_quantized_base_uses_materialize():
  theta = _theta()
  tq = quantize(theta, r"kernel$")
  reparam = lj.lora(r"l0/kernel$", rank=4, init="pissa")
  base, phi = lj.initialize(reparam, jax.random.PRNGKey(0), tq)
  w = lj.materialize(reparam.apply(base, phi))["l0"]["kernel"]
  chex.assert_trees_all_close(w, dequantize(tq)["l0"]["kernel"], atol=1e-5)


def test_quantize_errors_name_the_leaf():
  theta = _theta()
  with pytest.raises(TypeError, match="step"):
    quantize(theta, r"step|kernel$")
  with pytest.raises(ValueError, match="power of two"):
    quantize(theta, r"kernel$", block_size=96)
  with pytest.raises(ValueError, match="selects no leaf"):
    quantize(theta, r"nothing")
  tq = quantize(theta, r"kernel$")
  with pytest.raises(ValueError, match="already quantized"):
    quantize(tq, r"kernel$")
