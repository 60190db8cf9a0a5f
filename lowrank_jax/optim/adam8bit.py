"""Adam with 8-bit blockwise-quantized moments.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861
(bitsandbytes ``Adam8bit`` / ``AdamW8bit``). Both moments are stored with the 8-bit
dynamic blockwise codec (:mod:`lowrank_jax.quant.blockwise`, bit-compatible with
bitsandbytes' ``quantize_blockwise``): ``uint8`` codes plus one float32 absmax per
block of 256. Each step decodes them to float32, runs the usual Adam recursion

    m_t = b1 m_{t-1} + (1 - b1) g,   v_t = b2 v_{t-1} + (1 - b2) g^2,
    u_t = m_hat / (sqrt(v_hat + eps_root) + eps)     (optax placement), or
    u_t = m_t / (sqrt(v_t) + eps) * sqrt(1 - b2^t) / (1 - b1^t)   ("hf", galore-torch),

and re-encodes ``m_t``, ``v_t`` with fresh block maxima. As in bitsandbytes,
tensors with fewer than ``min_8bit_size`` elements (4096) keep float32 moments.

Memory per parameter: ``2 * (1 + 4 / 256) = 2.03`` bytes against 8 for float32
moments, i.e. 3.94x smaller.

Differences from bitsandbytes: both moments use the signed dynamic map (bitsandbytes
codes ``v`` with the unsigned map, which has one more bit of mantissa for ``v >= 0``);
rounding is to the nearest code.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import tree as tree_lib
from lowrank_jax.quant.blockwise import Blockwise8

PyTree = Any

__all__ = ["ScaleByAdam8bitState", "scale_by_adam_8bit", "adamw_8bit", "moment_bytes"]


class ScaleByAdam8bitState(NamedTuple):
  """``mu``/``nu``: per leaf a :class:`Blockwise8` (or a float32 array for small leaves)."""
  count: jax.Array
  mu: PyTree
  nu: PyTree


def _is_q(x) -> bool:
  return isinstance(x, Blockwise8)


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                       eps_root: float = 0.0, *, block_size: int = 256,
                       min_8bit_size: int = 4096,
                       eps_placement: Literal["optax", "hf"] = "optax",
                       rounding: str = "nearest") -> optax.GradientTransformation:
  """Adam's scaling (like ``optax.scale_by_adam``) with 8-bit blockwise moments.

  Args:
    b1, b2, eps, eps_root: Adam constants (``eps_root`` only for ``"optax"``).
    block_size: codec block size (bitsandbytes' optimizers use 256).
    min_8bit_size: leaves with fewer elements keep float32 moments.
    eps_placement: ``"optax"`` (``m_hat / (sqrt(v_hat) + eps)``) or ``"hf"``
      (``m / (sqrt(v) + eps)`` times the bias correction; HF/galore-torch AdamW).
    rounding: codec rounding, ``"nearest"`` or ``"bnb_cpu"``.

  Returns:
    An ``optax.GradientTransformation`` with :class:`ScaleByAdam8bitState`.
  """
  if eps_placement not in ("optax", "hf"):
    raise ValueError(f"unknown eps_placement {eps_placement!r}; expected optax or hf")

  def enc(x32, like):
    if like is None or not _is_q(like):
      return x32
    q = Blockwise8.encode(x32, block_size, rounding)
    return q.rows() if like.row_layout else q  # keep the layout the state was placed in

  def dec(q):
    return q.decode(jnp.float32) if _is_q(q) else q

  def init_leaf(p):
    if not jnp.issubdtype(p.dtype, jnp.floating):
      raise TypeError(f"adam8bit: cannot keep moments of a {p.dtype} leaf of shape {p.shape}")
    z = jnp.zeros(p.shape, jnp.float32)
    return Blockwise8.encode(z, block_size, rounding) if p.size >= min_8bit_size else z

  def init(params):
    mu = jax.tree.map(init_leaf, params)
    nu = jax.tree.map(init_leaf, params)
    return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), mu, nu)

  def update(updates, state, params=None):
    del params
    t = optax.safe_int32_increment(state.count)
    tf = t.astype(jnp.float32)
    bc1, bc2 = 1 - b1 ** tf, 1 - b2 ** tf

    def leaf(g, mq, vq):
      g32 = g.astype(jnp.float32)
      m = b1 * dec(mq) + (1 - b1) * g32
      v = b2 * dec(vq) + (1 - b2) * g32 * g32
      if eps_placement == "optax":
        u = (m / bc1) / (jnp.sqrt(v / bc2 + eps_root) + eps)
      else:
        u = m / (jnp.sqrt(v) + eps) * (jnp.sqrt(bc2) / bc1)
      return u.astype(g.dtype), enc(m, mq), enc(v, vq)

    out = jax.tree.map(leaf, updates, state.mu, state.nu, is_leaf=_is_q)
    treedef = jax.tree.structure(updates)
    u, mu, nu = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(out))) \
        if treedef.num_leaves else (updates, state.mu, state.nu)
    return u, ScaleByAdam8bitState(t, mu, nu)

  return optax.GradientTransformation(init, update)


def adamw_8bit(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, weight_decay: float = 1e-4, *, mask: Any = None,
               block_size: int = 256, min_8bit_size: int = 4096) -> optax.GradientTransformation:
  """``optax.adamw`` with 8-bit moments (bitsandbytes ``AdamW8bit``); see :func:`scale_by_adam_8bit`."""
  return optax.chain(
      scale_by_adam_8bit(b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def moment_bytes(state: PyTree) -> int:
  """Bytes held by the moments of every :class:`ScaleByAdam8bitState` (or optax
  ``ScaleByAdamState``) found in an optimizer state."""
  states = tree_lib.find_nodes(state, (ScaleByAdam8bitState, optax.ScaleByAdamState))
  return sum(tree_lib.count_bytes((s.mu, s.nu)) for s in states)
