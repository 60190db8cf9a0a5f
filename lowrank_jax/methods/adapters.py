"""Bottleneck adapters: small residual MLPs inserted after transformer sub-layers.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", arXiv 1902.00751 (two
adapters per layer); Pfeiffer et al., "AdapterFusion", arXiv 2005.00247 (one adapter per
layer, after the feed-forward block).

An adapter maps a sub-layer output ``h [..., D]`` to::

    h + f(h W_down + b_down) W_up + b_up,      W_down [D, m], W_up [m, D]

with the bottleneck ``m = D // reduction_factor`` (or given directly) and ``f`` a
nonlinearity. Parameters per adapter: ``2 D m + m + D``. ``W_down`` starts
``N(0, init_std²)`` truncated at two standard deviations (Houlsby's near-identity
initialisation, ``init_std = 1e-2``); ``W_up`` and both biases start at zero, so the
adapted model equals the base model at initialisation.

Unlike the other methods, adapters *add* weights rather than change existing ones. The
model must cooperate: :func:`lowrank_jax.models.bert.bert_forward` runs the subtree
``encoder/layer_i/attention_adapter`` on the attention block's output and
``encoder/layer_i/output_adapter`` on the feed-forward block's output (each after the
sub-layer's output projection and dropout, before its residual LayerNorm), with
``f = config.adapter_activation`` (set the activation there, default ``"relu"``).

**Representation of ``phi``.** As for every per-leaf method, ``phi`` mirrors ``theta0``
(``None`` at unselected leaves): the adapter that follows a dense layer is stored at that
layer's *kernel* leaf, ``{"down": {"kernel", "bias"}, "up": {"kernel", "bias"}}``:

* ``.../layer_i/attention/output/kernel`` holds the adapter inserted as
  ``.../layer_i/attention_adapter``;
* ``.../layer_i/output/kernel`` holds the adapter inserted as ``.../layer_i/output_adapter``.

``apply(theta0, phi)`` returns ``theta0`` with these subtrees added (the existing leaves
are the same objects; no other leaf changes), so a later reparam in a
:func:`~lowrank_jax.chain` (e.g. ``lj.full(r"^head/")``) sees and may select the
inserted paths. ``unmerge`` removes them again.

Placements: ``"houlsby"`` adapts both slots, ``"pfeiffer"`` only ``output_adapter``.
Both use the model's slot, i.e. Houlsby's position (before the residual LayerNorm);
adapter-transformers' ``PfeifferConfig`` instead feeds the adapter the post-LayerNorm
output and applies the LayerNorm again afterwards, which this placement does not model.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt

__all__ = [
  "bottleneck_adapters",
  "adapter_method",
  "adapter_where",
  "adapter_slot",
  "adapter_param_count",
  "bottleneck_size",
  "PLACEMENTS",
]

PyTree = Any
Placement = Literal["houlsby", "pfeiffer"]

# Placement -> the sub-layer modules whose output is adapted.
PLACEMENTS: dict[str, tuple[str, ...]] = {
  "houlsby": ("attention/output", "output"),
  "pfeiffer": ("output",),
}
_SLOT_NAMES = {"attention/output": "attention_adapter", "output": "output_adapter"}
_KERNEL_RX = re.compile(
    r"^(?P<layer>(?:.*/)?layer_(?P<index>\d+))/(?P<module>attention/output|output)/kernel$")


def adapter_slot(path: str) -> tuple[str, str]:
  """``(layer path, slot name)`` of the adapter that follows the dense layer at ``path``.

  ``"bert/encoder/layer_3/attention/output/kernel"`` -> ``("bert/encoder/layer_3",
  "attention_adapter")``; ``".../layer_3/output/kernel"`` -> ``(..., "output_adapter")``.

  Raises:
    ValueError if ``path`` is not the kernel of a sub-layer output projection.
  """
  m = _KERNEL_RX.match(path)
  if m is None:
    raise ValueError(
        f"adapters: leaf '{path}' is not a sub-layer output kernel; adapters follow "
        f"'.../layer_<i>/attention/output/kernel' (attention_adapter) or "
        f"'.../layer_<i>/output/kernel' (output_adapter)")
  return m["layer"], _SLOT_NAMES[m["module"]]


def adapter_where(placement: Placement = "houlsby",
                  layers: Optional[Sequence[int]] = None):
  """Selection predicate of the kernels whose outputs get an adapter.

  Args:
    placement: ``"houlsby"`` (after attention and feed-forward) or ``"pfeiffer"``
      (after feed-forward only).
    layers: layer indices to adapt (default: all).

  Returns:
    A predicate ``(path, leaf) -> bool`` for :func:`lowrank_jax.select`.
  """
  if placement not in PLACEMENTS:
    raise ValueError(f"unknown adapter placement {placement!r}; expected one of {sorted(PLACEMENTS)}")
  modules = PLACEMENTS[placement]
  wanted = None if layers is None else {int(i) for i in layers}

  def where(path: str, leaf) -> bool:
    m = _KERNEL_RX.match(path)
    return (m is not None and m["module"] in modules
            and (wanted is None or int(m["index"]) in wanted))

  return where


def bottleneck_size(hidden: int, reduction_factor: Optional[float] = 16,
                    bottleneck: Optional[int] = None) -> int:
  """``m = bottleneck`` if given, else ``max(1, int(hidden // reduction_factor))``."""
  if bottleneck is not None:
    if not isinstance(bottleneck, int) or bottleneck < 1:
      raise ValueError(f"adapter bottleneck must be a positive int, got {bottleneck!r}")
    return bottleneck
  if reduction_factor is None or reduction_factor <= 0:
    raise ValueError(f"adapter reduction_factor must be > 0, got {reduction_factor!r}")
  return max(1, int(hidden // reduction_factor))


def adapter_param_count(hidden: int, bottleneck: int) -> int:
  """Parameters of one adapter: ``2 D m + m + D`` (two kernels, two biases)."""
  return 2 * hidden * bottleneck + bottleneck + hidden


def adapter_method(reduction_factor: Optional[float] = 16, bottleneck: Optional[int] = None, *,
                   init_std: float = 1e-2, dtype=jnp.float32) -> LeafMethod:
  """The per-leaf part: initialises the adapter that follows a selected kernel.

  ``apply_leaf`` leaves the kernel unchanged; :func:`bottleneck_adapters` inserts the
  adapter subtrees.
  """
  bottleneck_size(1 << 20, reduction_factor, bottleneck)  # argument checks

  def validate(path: str, view: MatrixView):
    adapter_slot(path)

  def init_leaf(key, path, w, view: MatrixView):
    d = view.d_out
    m = bottleneck_size(d, reduction_factor, bottleneck)
    down = init_std * jax.random.truncated_normal(key, -2.0, 2.0, (d, m), jnp.float32)
    return {"down": {"kernel": down.astype(dtype), "bias": jnp.zeros((m,), dtype)},
            "up": {"kernel": jnp.zeros((m, d), dtype), "bias": jnp.zeros((d,), dtype)}}

  return LeafMethod(name="adapters", init_leaf=init_leaf, apply_leaf=lambda w, p, view, rng: w,
                    validate=validate)


def _check_adapter(path: str, p: Any) -> None:
  ok = (isinstance(p, Mapping) and set(p) == {"down", "up"}
        and all(isinstance(p[k], Mapping) and "kernel" in p[k] for k in ("down", "up")))
  if not ok:
    raise ValueError(f"adapters: phi at '{path}' must be {{'down': {{kernel, bias}}, "
                     f"'up': {{kernel, bias}}}}, got {jax.tree.map(jnp.shape, p)}")


def _slots(theta0: PyTree, phi: PyTree) -> dict[tuple[str, str], Any]:
  """``{(layer path, slot): adapter params}`` from a ``phi`` that mirrors ``theta0``."""
  items = tree_lib.flatten_with_paths(theta0)
  treedef = jax.tree_util.tree_structure(theta0, is_leaf=lazy.is_lazy)
  try:
    phis = treedef.flatten_up_to(phi)
  except (ValueError, TypeError) as e:
    raise ValueError(f"adapters: phi does not mirror the structure of theta0 ({e})") from e
  out: dict[tuple[str, str], Any] = {}
  for (path, _), p in zip(items, phis):
    if p is None:
      continue
    _check_adapter(path, p)
    out[adapter_slot(path)] = p
  return out


def bottleneck_adapters(placement: Placement = "houlsby", *, reduction_factor: Optional[float] = 16,
                        bottleneck: Optional[int] = None,
                        layers: Optional[Sequence[int]] = None,
                        where: tree_lib.Where = None, init_std: float = 1e-2,
                        dtype=jnp.float32) -> Reparam:
  """Bottleneck adapters (Houlsby / Pfeiffer placement) as a :class:`Reparam`.

  Args:
    placement: ``"houlsby"`` (after the attention and the feed-forward block of each
      layer) or ``"pfeiffer"`` (after the feed-forward block only).
    reduction_factor: ``m = D // reduction_factor`` (adapter-transformers' default 16).
    bottleneck: the bottleneck size ``m`` (overrides ``reduction_factor``).
    layers: indices of the layers to adapt (default: all).
    where: explicit selection of sub-layer output kernels (overrides ``placement`` and
      ``layers``); each selected leaf must be a ``.../layer_<i>/attention/output/kernel``
      or ``.../layer_<i>/output/kernel``.
    init_std: std of the (2-sigma truncated) normal init of ``W_down``.
    dtype: dtype of the adapter parameters.

  Returns:
    A :class:`Reparam`: ``phi`` mirrors ``theta0`` with the adapters at the selected
    kernels (see the module docstring); ``apply`` inserts them as
    ``layer_i/{attention,output}_adapter``; ``unmerge`` removes them. The nonlinearity
    is the model's ``BertConfig.adapter_activation``.
  """
  if where is None:
    where = adapter_where(placement, layers)
  elif layers is not None:
    raise ValueError("adapters: pass either where= or placement/layers, not both")
  inner = adapt(adapter_method(reduction_factor, bottleneck, init_std=init_std, dtype=dtype), where)

  def apply(theta0: PyTree, phi: PyTree, rng: Optional[jax.Array] = None) -> PyTree:
    theta = theta0
    for (layer, slot), p in _slots(theta0, phi).items():
      theta = tree_lib.with_subtree(theta, f"{layer}/{slot}", p)
    return theta

  def unmerge(theta: PyTree, phi: PyTree) -> PyTree:
    slots = {}
    for path, p in _iter_phi(phi):
      _check_adapter(path, p)
      slots[adapter_slot(path)] = p
    for layer, slot in slots:
      theta = tree_lib.without_subtree(theta, f"{layer}/{slot}")
    return theta

  return Reparam(init=inner.init, apply=apply, init_with_base=inner.init_with_base,
                 unmerge=unmerge)


def _is_adapter(x) -> bool:
  return isinstance(x, Mapping) and set(x) == {"down", "up"}


def _iter_phi(phi: PyTree) -> list[tuple[str, Any]]:
  """``[(kernel path, adapter params)]`` of an adapters ``phi`` (without ``theta0``)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      phi, is_leaf=lambda x: x is None or _is_adapter(x))
  return [(tree_lib.path_str(p), x) for p, x in leaves if x is not None]
