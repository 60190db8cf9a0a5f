"""Leaf-by-leaf (per-layer) application of an optax transformation.

``leafwise(tx)`` runs an independent copy of ``tx`` for every parameter leaf, the
way galore-torch's layer-wise mode keeps one optimizer per parameter and steps it
from a ``register_post_accumulate_grad_hook``. Its state is a dict
``{path: state_of_tx_on_that_leaf}``, and besides the usual ``init``/``update`` it
has :meth:`LeafwiseTransformation.update_leaf`, which updates a single leaf::

    opt = leafwise(galore_adamw(1e-3, rank=128))
    state = opt.init(params)
    for path in layer_paths:                  # e.g. inside a loop / scan over layers
      g = grad_of_layer(path)                 # only this layer's gradient is alive
      u, state = opt.update_leaf(path, g, state, params_at(path))

so a training loop that produces one layer's gradient at a time (gradient
checkpointing per block, a scan over layers, pipeline stages) never holds the full
gradient of the model. :func:`map_layers` is the JAX form for stacked
("scanned") layers: it applies the update to one slice of the leading layer axis
at a time with ``lax.map``, so temporaries (SVD workspaces, full-size back-projected
updates) exist for one layer at a time, and :func:`update_in_backward` applies each
layer's update inside a reverse scan over the layers, so the full gradient of the
stack is never formed.

Semantics: ``leafwise(tx)`` equals ``tx`` for every transformation that acts on
leaves independently (Adam, GaLore, 8-bit Adam, weight decay, schedules). It is
*not* equal for transformations that couple leaves (``clip_by_global_norm``): put
those outside, ``optax.chain(optax.clip_by_global_norm(1.0), leafwise(adam))``.

Each leaf is given to ``tx`` as the one-entry tree ``{path: leaf}``, so ``tx`` can
still select leaves by path (regexes and predicates of :func:`lowrank_jax.select`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import optax

from lowrank_jax import tree as tree_lib

PyTree = Any

__all__ = ["LeafwiseState", "LeafwiseTransformation", "leafwise", "map_layers", "update_in_backward"]


class LeafwiseState(NamedTuple):
  """``states``: ``{path: inner state for that leaf}`` in tree order."""
  states: dict


class LeafwiseTransformation(NamedTuple):
  """An optax transformation (``init``, ``update``) plus ``update_leaf``."""
  init: Callable[[PyTree], LeafwiseState]
  update: Callable[..., tuple[PyTree, LeafwiseState]]
  update_leaf: Callable[..., tuple[Any, LeafwiseState]]


def _items(tree: PyTree) -> list[tuple[str, Any]]:
  return [(p, x) for p, x in tree_lib.flatten_with_paths(tree) if x is not None]


def leafwise(tx: optax.GradientTransformation) -> LeafwiseTransformation:
  """Runs ``tx`` separately on every leaf; see the module docstring.

  Args:
    tx: a transformation that treats leaves independently.

  Returns:
    A :class:`LeafwiseTransformation` (usable wherever an optax transformation is).
  """

  def init(params):
    return LeafwiseState({p: tx.init({p: x}) for p, x in _items(params)})

  def update_leaf(path: str, grad, state: LeafwiseState, param=None):
    """``(update, new_state)`` for the single leaf ``path``; other leaves untouched."""
    if path not in state.states:
      raise KeyError(f"leafwise: no optimizer state for leaf '{path}'; "
                     f"known leaves: {list(state.states)[:20]}")
    u, s = tx.update({path: grad}, state.states[path],
                     None if param is None else {path: param})
    states = dict(state.states)
    states[path] = s
    return u[path], LeafwiseState(states)

  def update(updates, state: LeafwiseState, params=None, **extra):
    del extra
    treedef = jax.tree_util.tree_structure(updates, is_leaf=tree_lib.is_lazy_or_array)
    items = tree_lib.flatten_with_paths(updates)
    p_leaves = ([None] * len(items) if params is None
                else treedef.flatten_up_to(params))
    states, out = dict(state.states), []
    for (path, g), p in zip(items, p_leaves):
      if g is None:
        out.append(None)
        continue
      u, s = tx.update({path: g}, states[path], None if p is None else {path: p})
      states[path] = s
      out.append(u[path])
    return jax.tree_util.tree_unflatten(treedef, out), LeafwiseState(states)

  return LeafwiseTransformation(init, update, update_leaf)


def map_layers(tx: optax.GradientTransformation, axis_size: Optional[int] = None
               ) -> optax.GradientTransformation:
  """Applies ``tx`` to stacked layers one layer at a time (``lax.map`` over axis 0).

  For models that stack their layers on a leading axis (``nn.scan``), every leaf of
  the tree is ``[L, ...]``. ``init`` vmaps ``tx.init`` over the layers; ``update``
  runs ``tx.update`` under ``lax.map`` (a sequential loop), so each layer gets its
  own state (its own GaLore projector, its own count) and only one layer's
  temporaries are live at a time.

  Args:
    tx: the per-layer transformation.
    axis_size: optional check of the leading axis size.
  """

  def _check(tree):
    sizes = {x.shape[0] for x in jax.tree.leaves(tree)}
    if len(sizes) != 1 or (axis_size is not None and sizes != {axis_size}):
      raise ValueError(f"map_layers: all leaves need the same leading layer axis "
                       f"(got sizes {sorted(sizes)}, expected {axis_size})")

  def init(params):
    _check(params)
    return jax.vmap(tx.init)(params)

  def update(updates, state, params=None, **extra):
    del extra
    _check(updates)
    if params is None:
      return jax.lax.map(lambda a: tx.update(a[0], a[1], None), (updates, state))
    return jax.lax.map(lambda a: tx.update(*a), (updates, state, params))

  return optax.GradientTransformation(init, update)


def update_in_backward(layer_fn: Callable[[PyTree, jax.Array], jax.Array],
                       tx: optax.GradientTransformation):
  """Train step for a stack of identical layers that updates each layer inside the
  backward pass, so only one layer's gradient exists at a time (galore-torch's
  ``register_post_accumulate_grad_hook`` layer-wise mode, in JAX form).

  The forward is a ``lax.scan`` over the stacked parameters (leaves ``[L, ...]``) that
  keeps each layer's input; the backward is a reverse ``lax.scan`` that, for layer
  ``i``, recomputes its VJP, gets ``(dL/dparams_i, dL/dh_i)``, applies
  ``tx.update`` with layer ``i``'s own state and moves on - the gradient of layer ``i``
  dies inside that iteration. The optimizer state is the one of
  ``map_layers(tx).init(stacked)``.

  Args:
    layer_fn: ``(params_i, h) -> h`` for one layer.
    tx: a per-layer transformation (GaLore, Adam, 8-bit Adam, ...).

  Returns:
    ``step(stacked, opt_state, h0, head_loss) -> (stacked', opt_state', loss, dL/dh0)``
    where ``head_loss(hL) -> scalar`` closes over everything after the stack (its own
    parameters are differentiated separately by the caller, e.g. from ``dL/dh0`` and
    ``jax.grad`` of the head).
  """

  def step(stacked, opt_state, h0, head_loss):
    def fwd(h, p):
      return layer_fn(p, h), h
    h_last, inputs = jax.lax.scan(fwd, h0, stacked)
    loss, g = jax.value_and_grad(head_loss)(h_last)

    def bwd(g, xs):
      p, h_in, s = xs
      _, vjp = jax.vjp(layer_fn, p, h_in)
      g_p, g_in = vjp(g)
      u, s = tx.update(g_p, s, p)
      return g_in, (optax.apply_updates(p, u), s)

    g0, (new_params, new_state) = jax.lax.scan(bwd, g, (stacked, inputs, opt_state), reverse=True)
    return new_params, new_state, loss, g0

  return step
