"""Per-layer updates inside the backward pass equal the whole-gradient update."""

import chex
import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim.galore import galore_adamw
from lowrank_jax.optim.leafwise import map_layers, update_in_backward


def test_update_in_backward_equals_full_gradient_then_update():
  L, d, B = 3, 12, 5
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  stacked = {"w": jax.random.normal(k[0], (L, d, d)) / 4, "b": jnp.zeros((L, d))}
  h0 = jax.random.normal(k[1], (B, d))
  y = jax.random.normal(k[2], (B, d))
  layer = lambda p, h: jnp.tanh(h @ p["w"] + p["b"])
  head_loss = lambda h: jnp.mean((h - y) ** 2)
  tx = galore_adamw(1e-2, rank=3, update_proj_gap=2, where="w")
  stacked_tx = map_layers(tx)

  def full_loss(p):
    return head_loss(jax.lax.scan(lambda h, pi: (layer(pi, h), None), h0, p)[0])

  @jax.jit
  def ref_step(p, s):
    loss, g = jax.value_and_grad(full_loss)(p)  # the whole gradient at once
    u, s = stacked_tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  fused = jax.jit(lambda p, s: update_in_backward(layer, tx)(p, s, h0, head_loss)[:3])
  p1 = p2 = stacked
  s1 = s2 = stacked_tx.init(stacked)
  for _ in range(3):
    p1, s1, l1 = ref_step(p1, s1)
    p2, s2, l2 = fused(p2, s2)
    chex.assert_trees_all_close(l1, l2, atol=1e-6)
  chex.assert_trees_all_close(p1, p2, atol=1e-5)
