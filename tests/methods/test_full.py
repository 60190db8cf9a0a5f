"""Full fine-tuning of selected leaves (``lj.full``): ``phi`` starts as a copy of the selected
leaves (a quantized one decoded), ``apply`` puts ``phi`` in their place and nothing else, and
the gradient with respect to ``phi`` is the dense gradient with respect to those leaves."""

import jax
import jax.numpy as jnp
import numpy as np

import lowrank_jax as lj


def _theta0():
  k = jax.random.split(jax.random.key(0), 4)
  return {"enc": {"kernel": jax.random.normal(k[0], (8, 6)), "bias": jax.random.normal(k[1], (6,))},
          "head": {"kernel": jax.random.normal(k[2], (6, 3)), "bias": jnp.zeros((3,))}}


def _loss(theta, x):
  h = jnp.tanh(x @ lj.materialize(theta["enc"]["kernel"]) + theta["enc"]["bias"])
  return jnp.sum((h @ theta["head"]["kernel"] + theta["head"]["bias"]) ** 2)


def test_init_copies_the_selected_leaves_and_apply_puts_phi_in_their_place():
  theta0 = _theta0()
  reparam = lj.full(r"^head/")
  phi = reparam.init(jax.random.key(1), theta0)
  assert lj.leaf_paths(phi) == ["head/bias/w", "head/kernel/w"]
  np.testing.assert_array_equal(phi["head"]["kernel"]["w"], theta0["head"]["kernel"])
  # a copy, not the same buffer: donating phi to a jitted step must not free theta0
  assert (phi["head"]["kernel"]["w"].unsafe_buffer_pointer()
          != theta0["head"]["kernel"].unsafe_buffer_pointer())
  moved = jax.tree.map(lambda w: w + 1.0, phi)
  theta = reparam.apply(theta0, moved)
  np.testing.assert_array_equal(theta["head"]["kernel"], theta0["head"]["kernel"] + 1.0)
  np.testing.assert_array_equal(theta["head"]["bias"], theta0["head"]["bias"] + 1.0)
  assert theta["enc"]["kernel"] is theta0["enc"]["kernel"] and theta["enc"]["bias"] is theta0["enc"]["bias"]


def test_gradient_is_the_dense_gradient_of_the_selected_leaves():
  theta0 = _theta0()
  x = jax.random.normal(jax.random.key(2), (5, 8))
  reparam = lj.full(["enc/kernel", "head/bias"])
  phi = reparam.init(jax.random.key(1), theta0)
  g_phi = jax.grad(lambda p: _loss(reparam.apply(theta0, p), x))(phi)
  g_dense = jax.grad(_loss)(theta0, x)
  np.testing.assert_allclose(g_phi["enc"]["kernel"]["w"], g_dense["enc"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(g_phi["head"]["bias"]["w"], g_dense["head"]["bias"], rtol=1e-6)
  assert lj.leaf_paths(g_phi) == ["enc/kernel/w", "head/bias/w"]


def test_a_quantized_leaf_starts_at_its_decoded_value():
  theta0 = lj.quantize(_theta0(), r"^enc/kernel$", codec="nf4", block_size=16, double_quant=False)
  phi = lj.full(r"^enc/kernel$").init(jax.random.key(1), theta0)
  w = phi["enc"]["kernel"]["w"]
  np.testing.assert_array_equal(w, lj.materialize(theta0["enc"]["kernel"]))
  assert w.shape == (8, 6) and not np.array_equal(w, _theta0()["enc"]["kernel"])  # NF4 rounding
