"""(IA)^3: infused adapter by inhibiting and amplifying inner activations.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", arXiv 2205.05638.

A learned vector rescales a layer's activations. For an attention projection (key,
value) it rescales the **output**, bias included, as peft does::

    y = (x @ W0 + b0) ⊙ l_out,     i.e.  W = W0 ⊙ l_outᵀ (columns),  b = b0 ⊙ l_out

For the feed-forward layers named by ``feedforward`` it rescales the **input**::

    y = (x ⊙ l_in) @ W0 + b0,      i.e.  W = l_in ⊙ W0 (rows),       b = b0

Both vectors start at 1 (the identity). The lazy weight (:class:`IA3Weight`) applies
the vector to ``x`` or to ``x @ W0``: ``O(in)`` or ``O(out)`` extra per row.

peft names: ``ia3_l`` is ``[out, 1]`` (our ``l_out [out]``) or ``[1, in]`` for
feed-forward modules (our ``l_in [in]``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt_with_bias

__all__ = ["IA3Weight", "ia3", "ia3_method"]


@lazy.pytree_dataclass(static=("shape_", "on_input"))
class IA3Weight(lazy.BaseLazyWeight):
  """Lazy ``W0`` rescaled along its input rows (``on_input``) or its output columns."""
  base: Any
  l: jax.Array
  shape_: tuple[int, ...]
  on_input: bool

  def materialize(self) -> jax.Array:
    w0 = lazy.materialize(self.base)
    if self.on_input:
      m = w0.reshape(self.l.shape[0], -1) * self.l[:, None].astype(w0.dtype)
    else:
      m = w0.reshape(-1, self.l.shape[0]) * self.l[None, :].astype(w0.dtype)
    return m.reshape(self.shape_)

  def matrix_matmul(self, x: jax.Array) -> jax.Array:
    if self.on_input:
      return lazy.dot(x * self.l.astype(x.dtype), self.base)
    y = lazy.dot(x, self.base)
    return y * self.l.astype(y.dtype)


def _key(on_input: bool) -> str:
  return "l_in" if on_input else "l_out"


def ia3_method(feedforward: tree_lib.Where = None, dtype=jnp.float32) -> LeafMethod:
  """The per-leaf IA3 method; ``feedforward`` selects (by path) the input-scaled leaves."""

  def is_ff(path: str, w) -> bool:
    if feedforward is None:
      return False
    flags = tree_lib.select(_single(path, w), feedforward, allow_empty=True)
    return bool(jax.tree_util.tree_leaves(flags)[0])

  def init_leaf(key, path, w, view: MatrixView):
    on_input = is_ff(path, w)
    return {_key(on_input): jnp.ones(view.d_in if on_input else view.d_out, dtype)}

  def apply_leaf(w, phi, view, rng):
    on_input = "l_in" in phi
    return IA3Weight(base=w, l=phi[_key(on_input)], shape_=view.shape, on_input=on_input)

  def unmerge_leaf(w, phi, view):
    on_input = "l_in" in phi
    l = phi[_key(on_input)].astype(jnp.float32)
    m = view.to_matrix(w).astype(jnp.float32)
    m = m / l[:, None] if on_input else m / l[None, :]
    return view.from_matrix(m).astype(w.dtype)

  return LeafMethod(name="IA3", init_leaf=init_leaf, apply_leaf=apply_leaf,
                    unmerge_leaf=unmerge_leaf)


def _single(path: str, w):
  """A one-leaf tree whose only path is ``path`` (to evaluate a ``where`` on one leaf)."""
  tree = w
  for k in reversed(path.split("/")):
    tree = {k: tree}
  return tree


def _bias_apply(w0, b0, phi, view):
  if "l_in" in phi:
    return b0
  return (b0 * phi["l_out"].reshape(b0.shape).astype(b0.dtype)).astype(b0.dtype)


def _bias_unmerge(w0, b, phi, view):
  if "l_in" in phi:
    return b
  return (b.astype(jnp.float32) / phi["l_out"].reshape(b.shape)).astype(b.dtype)


@configured("ia3")
def ia3(where: tree_lib.Where, feedforward: tree_lib.Where = None, *,
        dtype=jnp.float32) -> Reparam:
  """IA3 on the kernels ``where`` selects.

  Args:
    where: selection of the kernels to rescale (e.g. ``r"(key|value|output/dense)/kernel"``).
    feedforward: a regex, list of regexes or predicate, evaluated on each adapted kernel's
      path, selecting the kernels
      whose *input* is rescaled (peft's ``feedforward_modules``); the others rescale
      their output and their sibling ``bias``.
    dtype: dtype of the vectors.

  Returns:
    A :class:`Reparam` producing :class:`IA3Weight` leaves (and rescaled biases);
    ``unmerge`` divides by the vectors.
  """
  return adapt_with_bias(ia3_method(feedforward, dtype), where, _bias_apply,
                         bias_unmerge=_bias_unmerge)
