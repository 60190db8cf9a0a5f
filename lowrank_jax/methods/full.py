"""Full fine-tuning of selected leaves, as a reparametrization ``W = phi``.

The trainable copy starts at ``W0``; used for full fine-tuning baselines, for the
bias modes of LoRA (``bias="all"`` / ``"lora_only"``) and for classifier heads.
"""

from __future__ import annotations

import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.reparam import LeafMethod, Reparam, adapt

__all__ = ["full"]


def _init_leaf(key, path, w, view):
  return {"w": jnp.array(lazy.materialize(w), copy=True)}


def _apply_leaf(w, phi, view, rng):
  return phi["w"]


@configured("full")
def full(where: tree_lib.Where) -> Reparam:
  """Trains the selected leaves directly (``theta = phi``, ``phi`` initialised to ``theta0``)."""
  return adapt(LeafMethod(name="full", init_leaf=_init_leaf, apply_leaf=_apply_leaf,
                          needs_matrix=False), where)
