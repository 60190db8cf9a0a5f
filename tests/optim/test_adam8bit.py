"""8-bit Adam: recursion against a reference that quantizes fp32 moments with the codec,
training follows fp32 Adam, moment bytes ~4x smaller, composition with GaLore."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax.optim import adam8bit as a8
from lowrank_jax.optim.galore import galore_adamw
from lowrank_jax.quant.blockwise import Blockwise8
from lowrank_jax.tree import count_bytes


def _q(x):
  return np.asarray(Blockwise8.encode(jnp.asarray(x, jnp.float32), 256, "nearest").decode(jnp.float32))


def test_recursion_matches_numpy_reference():
  """Reference: Adam in numpy whose moments are replaced by their 8-bit round trip."""
  b1, b2, eps = 0.9, 0.999, 1e-8
  key = jax.random.PRNGKey(0)
  params = {"w": jnp.zeros((64, 80)), "small": jnp.zeros((7,))}
  tx = a8.scale_by_adam_8bit(b1, b2, eps)
  state = tx.init(params)
  assert isinstance(state.mu["w"], Blockwise8) and not isinstance(state.mu["small"], Blockwise8)
  m = {k: np.zeros(v.shape, np.float32) for k, v in params.items()}
  v = {k: np.zeros(v.shape, np.float32) for k, v in params.items()}
  step = jax.jit(tx.update)
  for t in range(1, 5):
    g = {k: np.asarray(jax.random.normal(jax.random.fold_in(key, t * 7 + i), p.shape))
         for i, (k, p) in enumerate(params.items())}
    u, state = step(g, state)
    for k in params:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      want = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      np.testing.assert_allclose(u[k], want, rtol=2e-5, atol=2e-5)
      if k == "w":  # stored moments are the codec round trip of the fp32 recursion
        m[k], v[k] = _q(m[k]), _q(v[k])
        np.testing.assert_allclose(state.mu[k].decode(jnp.float32), m[k], rtol=1e-5, atol=0)
        np.testing.assert_allclose(state.nu[k].decode(jnp.float32), v[k], rtol=1e-5, atol=0)
        m[k] = np.asarray(state.mu[k].decode(jnp.float32))  # follow the stored state exactly
        v[k] = np.asarray(state.nu[k].decode(jnp.float32))


def test_small_leaves_equal_optax_adam_exactly():
  params = {"b": jnp.ones((10,))}
  ours, ref = a8.adamw_8bit(1e-2, weight_decay=0.1), optax.adamw(1e-2, weight_decay=0.1)
  s1, s2 = ours.init(params), ref.init(params)
  for t in range(3):
    g = {"b": jax.random.normal(jax.random.PRNGKey(t), (10,))}
    u1, s1 = ours.update(g, s1, params)
    u2, s2 = ref.update(g, s2, params)
    chex.assert_trees_all_close(u1, u2, atol=1e-7)


def _regression(n_steps, tx, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(k1, (256, 64))
  w_true = jax.random.normal(k2, (64, 96)) / 8
  y = jnp.tanh(x @ w_true)
  params = {"w1": jax.random.normal(k3, (64, 96)) * 0.05, "b1": jnp.zeros(96)}
  loss = lambda p: jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) - y) ** 2)

  @jax.jit
  def step(p, s):
    l, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  s, p, losses = tx.init(params), params, []
  for _ in range(n_steps):
    p, s, l = step(p, s)
    losses.append(float(l))
  return np.array(losses), p, s


def test_training_follows_fp32_adam():
  l8, p8, s8 = _regression(150, a8.adamw_8bit(3e-3, weight_decay=0.0))
  l32, p32, s32 = _regression(150, optax.adamw(3e-3, weight_decay=0.0))
  assert l32[-1] < 0.2 * l32[0]  # the problem is learnt
  np.testing.assert_allclose(l8, l32, rtol=0.05)  # the curves agree within 5% at every step
  rel = float(jnp.linalg.norm(p8["w1"] - p32["w1"]) / jnp.linalg.norm(p32["w1"] - 0))
  assert rel < 0.05, rel
  # state figure: moments of the 64x96 kernel are 8-bit (bias 96 < 4096 stays fp32)
  w8 = count_bytes((s8[0].mu["w1"], s8[0].nu["w1"]))
  w32 = count_bytes((s32[0].mu["w1"], s32[0].nu["w1"]))
  assert w8 == 2 * (64 * 96 + 4 * 24)  # uint8 codes + fp32 absmax per 256
  assert w32 / w8 > 3.9


def test_moment_bytes_ratio_on_a_large_tree():
  params = {"a": jnp.zeros((1024, 1024)), "b": jnp.zeros((512, 256))}
  r = a8.moment_bytes(optax.adam(1e-3).init(params)) / a8.moment_bytes(a8.adamw_8bit(1e-3).init(params))
  assert 3.9 < r <= 4.0, r


def test_composes_with_galore():
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (128, 96))}
  tx8 = galore_adamw(1e-2, rank=48, update_proj_gap=5, moments="8bit")
  tx32 = galore_adamw(1e-2, rank=48, update_proj_gap=5)
  s8, s32 = tx8.init(params), tx32.init(params)
  assert isinstance(s8[0].inner_state.mu["w"], Blockwise8)  # moments 48 x 96 = 4608 >= 4096
  p8 = p32 = params
  for t in range(4):
    g = {"w": jax.random.normal(jax.random.PRNGKey(t + 1), (128, 96))}
    u8, s8 = jax.jit(tx8.update)(g, s8, p8)
    u32, s32 = jax.jit(tx32.update)(g, s32, p32)
    p8, p32 = optax.apply_updates(p8, u8), optax.apply_updates(p32, u32)
  rel = float(jnp.linalg.norm(p8["w"] - p32["w"]) / jnp.linalg.norm(p32["w"] - params["w"]))
  assert rel < 0.05, rel
  assert count_bytes(s8) < 0.5 * count_bytes(s32)


def test_rejects_integer_leaves():
  with pytest.raises(TypeError, match="int32"):
    a8.scale_by_adam_8bit().init({"step": jnp.zeros((3,), jnp.int32)})
