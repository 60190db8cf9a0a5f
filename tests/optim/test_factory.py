"""make_optimizer: config dicts build the same transformations as the direct calls."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from lowrank_jax.optim.factory import make_optimizer
from lowrank_jax.optim.adam8bit import adamw_8bit
from lowrank_jax.optim.galore import galore_adamw

PARAMS = {"enc": {"kernel": {"a": jnp.ones((8, 2)), "b": jnp.ones((2, 8))}},
          "w": jnp.ones((70, 64)) * 0.1}


def _one_step(tx):
  g = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape), PARAMS)
  u, _ = tx.update(g, tx.init(PARAMS), PARAMS)
  return u


@pytest.mark.parametrize("spec,direct", [
  ({"kind": "adamw", "lr": 1e-3, "weight_decay": 0.01}, lambda: optax.adamw(1e-3, weight_decay=0.01)),
  ({"kind": "adamw_8bit", "lr": 1e-3}, lambda: adamw_8bit(1e-3, weight_decay=0.0)),
  ({"kind": "galore_adamw", "lr": 1e-3, "rank": 4, "where": "^w$", "projector_dtype": "float32"},
   lambda: galore_adamw(1e-3, 4, where="^w$", projector_dtype=jnp.float32)),
  ({"kind": "loraplus", "lr": 1e-3, "ratio": 4, "clip": 1.0, "offload": "force"},
   lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
       {"A": optax.adamw(1e-3, weight_decay=0.0), "B": optax.adamw(4e-3, weight_decay=0.0)},
       {"enc": {"kernel": {"a": "A", "b": "B"}}, "w": "A"}))),
])
def test_specs_match_direct_construction(spec, direct):
  chex.assert_trees_all_close(_one_step(make_optimizer(spec)), _one_step(direct()), atol=1e-7)


def test_unknown_kind_and_key():
  with pytest.raises(ValueError, match="unknown optimizer kind"):
    make_optimizer({"kind": "sgdx"})
  with pytest.raises(ValueError, match=r"unknown keys \['rnak'\]"):
    make_optimizer({"kind": "galore_adamw", "rnak": 3})
