"""The lazy-weight protocol: LazyWeight is abstract, the matrix checks and the
materialising fallback are written once (in LazyWeight.matmul), every lazy weight of
the library refuses a non-matrix or a mismatched input with the same clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import lazy, tree as tree_lib


@lazy.pytree_dataclass
class _Scaled(lazy.LazyWeight):
  """``c * w``: the minimal lazy weight (shape, dtype, materialize; no matrix_matmul)."""
  w: jax.Array
  c: jax.Array

  @property
  def shape(self):
    return self.w.shape

  @property
  def dtype(self):
    return self.w.dtype

  def materialize(self):
    return self.c * self.w


def test_lazy_weight_is_abstract():
  with pytest.raises(TypeError, match="abstract"):
    lazy.LazyWeight()

  class NoMaterialize(lazy.LazyWeight):
    shape = (2, 2)
    dtype = jnp.float32

  with pytest.raises(TypeError, match="materialize"):
    NoMaterialize()

  class NoShape(lazy.LazyWeight):
    dtype = jnp.float32

    def materialize(self):
      return jnp.zeros((2, 2))

  with pytest.raises(TypeError, match="shape"):
    NoShape()


def test_base_lazy_weight_needs_delta_or_materialize():
  with pytest.raises(TypeError, match="delta\\(\\) .*or materialize\\(\\)"):
    class Neither(lazy.BaseLazyWeight):  # noqa: F841
      pass


def test_minimal_subclass_multiplies_through_the_default():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  w = _Scaled(w=jax.random.normal(k1, (6, 5)), c=jnp.float32(3.0))
  x = jax.random.normal(k2, (2, 4, 6))
  np.testing.assert_allclose(lj.dot(x, w), x @ (3.0 * w.w), rtol=1e-5, atol=1e-5)
  assert lazy.is_lazy(w) and tree_lib.is_lazy_or_array(w) and w.ndim == 2
  np.testing.assert_array_equal(jnp.asarray(w), 3.0 * w.w)       # __jax_array__
  assert lj.materialize({"k": w})["k"].shape == (6, 5)
  g = jax.grad(lambda c: jnp.sum(lj.dot(x, _Scaled(w=w.w, c=c))))(jnp.float32(3.0))
  np.testing.assert_allclose(g, jnp.sum(x @ w.w), rtol=1e-4)


def _lazy_weights(shape):
  """One lazy weight of each kind the library makes, over a weight of ``shape``."""
  key = jax.random.PRNGKey(1)
  w0 = {"w": jax.random.normal(key, shape) * 0.1}
  in_ndim = len(shape) - 1
  out = {}
  for name, reparam in {
      "lora": lj.lora("w", rank=2, in_ndim=in_ndim),
      "dora": lj.dora("w", rank=2, in_ndim=in_ndim),
      "ia3": lj.ia3("w") if in_ndim == 1 else None,
      "loha": lj.loha("w", rank=2) if in_ndim == 1 else None,
      "lokr": lj.lokr("w", rank=2) if in_ndim == 1 else None}.items():
    if reparam is not None:
      theta, phi = lj.initialize(reparam, key, w0)
      leaves, treedef = jax.tree_util.tree_flatten(phi)   # move off the (often zero) init
      keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
      phi = treedef.unflatten([l + 0.1 * jax.random.normal(k, l.shape, l.dtype)
                               for l, k in zip(leaves, keys)])
      out[name] = reparam.apply(theta, phi)["w"]
  out["scaled"] = _Scaled(w=w0["w"], c=jnp.float32(2.0))
  if len(shape) == 2:
    out["nf4"] = lj.quantize(w0, "w", block_size=64)["w"]
  return out


@pytest.mark.parametrize("name", ["lora", "dora", "scaled"])
def test_non_matrix_weight_is_refused_the_same_way(name):
  w = _lazy_weights((4, 8, 6))[name]
  assert lazy.is_lazy(w) and w.shape == (4, 8, 6)
  with pytest.raises(ValueError, match=r"dot expects a matrix weight \[in, out\], got shape \(4, 8, 6\)"):
    lj.dot(jnp.ones((3, 4)), w)
  with pytest.raises(ValueError, match="dot expects a matrix weight"):
    w.matmul(jnp.ones((3, 4)))


@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "loha", "lokr", "scaled", "nf4"])
def test_mismatched_input_is_refused_and_matched_input_agrees_with_dense(name):
  w = _lazy_weights((64, 48))[name]
  with pytest.raises(ValueError, match=r"input feature size 63 \(input shape \(2, 63\)\) does not "
                                       r"match weight \(64, 48\)"):
    lj.dot(jnp.ones((2, 63)), w)
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 64))
  np.testing.assert_allclose(lj.dot(x, w), x @ w.materialize(), rtol=2e-5, atol=2e-5)
