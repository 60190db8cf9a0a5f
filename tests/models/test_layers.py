"""Building blocks against float64 numpy formulas (and torch's GELU where installed)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.models import layers

RNG = np.random.default_rng(0)


def test_layer_norm_and_rms_norm():
  x = RNG.normal(size=(3, 5, 16)) * 4 + 2
  p = {"scale": RNG.normal(size=16), "bias": RNG.normal(size=16)}
  m, v = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  ref = (x - m) / np.sqrt(v + 1e-12) * p["scale"] + p["bias"]
  out = layers.layer_norm(jax.tree.map(jnp.float32, p), jnp.float32(x), 1e-12)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5)
  ref_rms = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * p["scale"]
  out = layers.rms_norm({"scale": jnp.float32(p["scale"])}, jnp.float32(x), 1e-6)
  np.testing.assert_allclose(np.asarray(out), ref_rms, atol=2e-5, rtol=2e-5)
  # bfloat16 input: statistics in float32, output in bfloat16.
  out16 = layers.layer_norm(jax.tree.map(jnp.float32, p), jnp.bfloat16(x), 1e-12)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), ref, atol=0.1, rtol=0.05)


def test_exact_gelu():
  x = np.linspace(-6, 6, 301)
  ref = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  np.testing.assert_allclose(np.asarray(layers.gelu(jnp.float32(x))), ref, atol=1e-6)
  torch = pytest.importorskip("torch")
  t = torch.nn.functional.gelu(torch.tensor(x, dtype=torch.float32)).numpy()
  np.testing.assert_allclose(np.asarray(layers.gelu(jnp.float32(x))), t, atol=1e-6)


def test_dense_with_lazy_kernel():
  x = jnp.float32(RNG.normal(size=(4, 6)))
  w0 = jnp.float32(RNG.normal(size=(6, 5)))
  lw = lj.LoRAWeight(base=w0, a=jnp.float32(RNG.normal(size=(6, 2))), b=jnp.float32(RNG.normal(size=(2, 5))),
                     rng=None, scale=0.5, shape_=(6, 5))
  bias = jnp.float32(RNG.normal(size=5))
  out = layers.dense({"kernel": lw, "bias": bias}, x)
  ref = np.asarray(x) @ (np.asarray(w0) + 0.5 * np.asarray(lw.a) @ np.asarray(lw.b)) + np.asarray(bias)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(layers.dense({"kernel": w0}, x)), np.asarray(x) @ np.asarray(w0), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(layers.embed(lw, jnp.array([2, 0]))),
                                np.asarray(lw.materialize())[[2, 0]])


def test_dropout():
  x = jnp.ones((200, 500))
  assert layers.dropout(x, 0.3, None) is x and layers.dropout(x, 0.0, jax.random.PRNGKey(0)) is x
  y = np.asarray(layers.dropout(x, 0.3, jax.random.PRNGKey(0)))
  kept = y != 0
  assert abs(kept.mean() - 0.7) < 0.01
  np.testing.assert_allclose(y[kept], 1 / lj.ops.keep_probability(0.3), rtol=1e-6)
  with pytest.raises(ValueError, match="rate"):
    layers.dropout(x, 1.0, jax.random.PRNGKey(0))


def test_bottleneck_adapter_and_init_from_spec():
  p = layers.init_from_spec(jax.random.PRNGKey(0), {
      "down": {"kernel": ("normal", (6, 3)), "bias": ("zeros", (3,))},
      "up": {"kernel": ("normal", (3, 6)), "bias": ("ones", (6,))}}, std=0.5)
  assert p["down"]["kernel"].shape == (6, 3) and float(p["up"]["bias"].sum()) == 6.0
  assert 0.3 < float(jnp.std(jnp.concatenate([p["down"]["kernel"].ravel(), p["up"]["kernel"].ravel()]))) < 0.7
  h = jnp.float32(RNG.normal(size=(2, 6)))
  P = jax.tree.map(np.asarray, p)
  hn = np.asarray(h)
  ref = hn + np.maximum(hn @ P["down"]["kernel"] + P["down"]["bias"], 0) @ P["up"]["kernel"] + P["up"]["bias"]
  np.testing.assert_allclose(np.asarray(layers.bottleneck_adapter(p, h)), ref, atol=1e-5)
  with pytest.raises(ValueError, match="kind"):
    layers.init_from_spec(jax.random.PRNGKey(0), {"w": ("uniform", (2,))})
