"""LoRA+: B factors get ratio * lr, A factors (and the rest) lr; checked against separate
optimizers run on the two groups by hand."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from lowrank_jax.methods.lora import lora
from lowrank_jax.optim.loraplus import loraplus, loraplus_labels


def _phi():
  theta0 = {"layer": {"query": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)},
                      "value": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)}}}
  r = lora(r"(query|value)/kernel", rank=2, bias="lora_only")
  return r.init(jax.random.PRNGKey(0), theta0)


def test_labels_follow_paths():
  phi = _phi()
  labels = loraplus_labels(phi)
  lora_phi = labels[0]["layer"]["query"]["kernel"]
  assert lora_phi == {"a": "A", "b": "B"}
  assert labels[1]["layer"]["query"]["bias"]["w"] == "A"


@pytest.mark.parametrize("sched", [False, True])
def test_equals_two_optimizers_by_hand(sched):
  phi = _phi()
  lr = optax.linear_schedule(1e-2, 1e-3, 5) if sched else 1e-2
  ratio = 16.0
  tx = loraplus(optax.adamw, lr, ratio, weight_decay=0.1)
  state = tx.init(phi)
  is_b = lambda path, x: path.endswith("/b")
  from lowrank_jax.tree import partition, combine
  b_part, a_part = partition(phi, is_b)
  lr_b = (lambda c: ratio * lr(c)) if sched else ratio * lr
  txa, txb = optax.adamw(lr, weight_decay=0.1), optax.adamw(lr_b, weight_decay=0.1)
  sa, sb = txa.init(a_part), txb.init(b_part)
  p, pa, pb = phi, a_part, b_part
  for t in range(3):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(t), x.shape), phi)
    u, state = jax.jit(tx.update)(g, state, p)
    p = optax.apply_updates(p, u)
    gb, ga = partition(g, is_b)
    ua, sa = txa.update(ga, sa, pa)
    ub, sb = txb.update(gb, sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  chex.assert_trees_all_close(p, combine(pa, pb), atol=1e-7)


def test_first_step_sizes_have_the_ratio():
  phi = _phi()
  tx = loraplus(optax.adam, 1e-3, ratio=4.0)
  g = jax.tree.map(jnp.ones_like, phi)
  u, _ = tx.update(g, tx.init(phi), phi)
  k = u[0]["layer"]["value"]["kernel"]
  chex.assert_trees_all_close(k["a"], jnp.full_like(k["a"], -1e-3), rtol=1e-5)
  chex.assert_trees_all_close(k["b"], jnp.full_like(k["b"], -4e-3), rtol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match="selects no leaf"):
    loraplus(optax.adam, 1e-3, where_b="nothing_here").init({"w": jnp.ones(3), "v": jnp.ones(2)})
  with pytest.raises(ValueError, match="ratio"):
    loraplus(optax.adam, 1e-3, ratio=0.0)
