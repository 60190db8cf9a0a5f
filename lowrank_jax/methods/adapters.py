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
model must cooperate through its slots (:mod:`lowrank_jax.models.slots`): a layer node
may hold ``attention_adapter`` (run on the attention block's output) and
``output_adapter`` (on the feed-forward block's output), each after the sub-layer's
output projection and dropout, before its residual add / LayerNorm. ``model=`` (a
:class:`~lowrank_jax.models.slots.ModelSlots`, e.g. ``bert.slots(config)`` or
``slots.decoder_slots(...)``) says where the layers are; the default is BERT's layout.
``f`` is the model's (``BertConfig.adapter_activation``, default ``"relu"``).

**Representation of ``phi``.** As for every per-leaf method, ``phi`` mirrors ``theta0``
(``None`` at unselected leaves): the adapter that follows a dense layer is stored at that
layer's *kernel* leaf (the slot's anchor), ``{"down": {"kernel", "bias"}, "up": {"kernel",
"bias"}}``. For BERT:

* ``.../layer_i/attention/output/kernel`` holds the adapter inserted as
  ``.../layer_i/attention_adapter``;
* ``.../layer_i/output/kernel`` holds the adapter inserted as ``.../layer_i/output_adapter``

(for the Llama-layout decoders ``attention/o_proj/kernel`` and ``mlp/down_proj/kernel``).
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

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, Optional, Sequence

import jax
import jax.numpy as jnp

from lowrank_jax import tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.models import slots as slots_lib
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

# Placement -> the slots that get an adapter.
PLACEMENTS: dict[str, tuple[str, ...]] = {
  "houlsby": (slots_lib.ATTENTION_ADAPTER, slots_lib.OUTPUT_ADAPTER),
  "pfeiffer": (slots_lib.OUTPUT_ADAPTER,),
}
_ADAPTER_SLOTS = (slots_lib.ATTENTION_ADAPTER, slots_lib.OUTPUT_ADAPTER)


def _model(model: Optional[slots_lib.ModelSlots]) -> slots_lib.ModelSlots:
  return slots_lib.bert_slots() if model is None else model


def adapter_slot(path: str, model: Optional[slots_lib.ModelSlots] = None) -> tuple[str, str]:
  """``(layer path, slot name)`` of the adapter that follows the dense layer at ``path``.

  ``"bert/encoder/layer_3/attention/output/kernel"`` -> ``("bert/encoder/layer_3",
  "attention_adapter")``; ``".../layer_3/output/kernel"`` -> ``(..., "output_adapter")``.

  Args:
    path: a leaf path.
    model: where the model's layers are (default: BERT's layout).

  Raises:
    ValueError if ``path`` is not a slot's anchor kernel.
  """
  m = _model(model)
  for slot in _ADAPTER_SLOTS:
    hit = m.match(path, slot)
    if hit is not None:
      return hit[0], slot
  raise ValueError(
      f"adapters: leaf '{path}' is not a sub-layer output kernel of {m.family}; adapters follow "
      + " or ".join(f"'.../{m.layer}/{m.anchor(s)}' ({s})" for s in _ADAPTER_SLOTS))


def adapter_where(placement: Placement = "houlsby", layers: Optional[Sequence[int]] = None,
                  model: Optional[slots_lib.ModelSlots] = None):
  """Selection predicate of the kernels whose outputs get an adapter.

  Args:
    placement: ``"houlsby"`` (after attention and feed-forward) or ``"pfeiffer"``
      (after feed-forward only).
    layers: layer indices to adapt (default: all).
    model: where the model's layers are (default: BERT's layout).

  Returns:
    A predicate ``(path, leaf) -> bool`` for :func:`lowrank_jax.select`.
  """
  if placement not in PLACEMENTS:
    raise ValueError(f"unknown adapter placement {placement!r}; expected one of {sorted(PLACEMENTS)}")
  m = _model(model)
  wanted = [m.where(slot, layers) for slot in PLACEMENTS[placement]]
  return wanted[0] if len(wanted) == 1 else _AnyOf(tuple(wanted))


@dataclasses.dataclass(frozen=True)
class _AnyOf:
  """``where=`` predicate: any of several (readable repr for selection errors)."""
  wheres: tuple[slots_lib.SlotAnchors, ...]

  def __call__(self, path: str, leaf=None) -> bool:
    return any(w(path, leaf) for w in self.wheres)

  def __repr__(self):
    return " | ".join(repr(w) for w in self.wheres)


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


def _check_adapter(path: str, p: Any) -> None:
  ok = (isinstance(p, Mapping) and set(p) == {"down", "up"}
        and all(isinstance(p[k], Mapping) and "kernel" in p[k] for k in ("down", "up")))
  if not ok:
    raise ValueError(f"adapters: phi at '{path}' must be {{'down': {{kernel, bias}}, "
                     f"'up': {{kernel, bias}}}}, got {jax.tree.map(jnp.shape, p)}")


def adapter_method(reduction_factor: Optional[float] = 16, bottleneck: Optional[int] = None, *,
                   init_std: float = 1e-2, dtype=jnp.float32,
                   model: Optional[slots_lib.ModelSlots] = None) -> LeafMethod:
  """The per-leaf method: initialises the adapter that follows a selected kernel (its
  anchor) and inserts it into the model's slot; the kernel itself is unchanged.

  The adapter's width ``D`` is the anchor's last dimension (its output features);
  ``model.hidden_size``, when given, must equal it.
  """
  bottleneck_size(1 << 20, reduction_factor, bottleneck)  # argument checks
  m = _model(model)

  def validate(path: str, view: MatrixView):
    adapter_slot(path, m)
    if m.hidden_size is not None and view.shape[-1] != m.hidden_size:
      raise ValueError(f"adapters: anchor '{path}' of shape {view.shape} does not output "
                       f"{m.family}'s hidden size {m.hidden_size}")

  def init_leaf(key, path, w, view: MatrixView):
    d = view.shape[-1]
    k = bottleneck_size(d, reduction_factor, bottleneck)
    down = init_std * jax.random.truncated_normal(key, -2.0, 2.0, (d, k), jnp.float32)
    return {"down": {"kernel": down.astype(dtype), "bias": jnp.zeros((k,), dtype)},
            "up": {"kernel": jnp.zeros((k, d), dtype), "bias": jnp.zeros((d,), dtype)}}

  def insert(path: str, p: PyTree, shared_leaf: Any) -> dict[str, PyTree]:
    _check_adapter(path, p)
    layer, slot = adapter_slot(path, m)
    return {m.slot_path(layer, slot): p}

  return LeafMethod(name="adapters", init_leaf=init_leaf, apply_leaf=None, validate=validate,
                    needs_matrix=False, insert=insert)


@configured("bottleneck_adapters")
def bottleneck_adapters(placement: Placement = "houlsby", *,
                        model: Optional[slots_lib.ModelSlots] = None,
                        reduction_factor: Optional[float] = 16,
                        bottleneck: Optional[int] = None,
                        layers: Optional[Sequence[int]] = None,
                        where: tree_lib.Where = None, init_std: float = 1e-2,
                        dtype=jnp.float32) -> Reparam:
  """Bottleneck adapters (Houlsby / Pfeiffer placement) as a :class:`Reparam`.

  Args:
    placement: ``"houlsby"`` (after the attention and the feed-forward block of each
      layer) or ``"pfeiffer"`` (after the feed-forward block only).
    model: where the model's layers are, a :class:`~lowrank_jax.models.slots.ModelSlots`
      (``bert.slots(config)``, ``slots.decoder_slots(...)``; default: BERT's layout
      anywhere in the tree).
    reduction_factor: ``m = D // reduction_factor`` (adapter-transformers' default 16).
    bottleneck: the bottleneck size ``m`` (overrides ``reduction_factor``).
    layers: indices of the layers to adapt (default: all).
    where: explicit selection of anchor kernels (overrides ``placement`` and ``layers``);
      each selected leaf must be a slot's anchor (for BERT
      ``.../layer_<i>/attention/output/kernel`` or ``.../layer_<i>/output/kernel``).
    init_std: std of the (2-sigma truncated) normal init of ``W_down``.
    dtype: dtype of the adapter parameters.

  Returns:
    A :class:`Reparam`: ``phi`` mirrors ``theta0`` with the adapters at the selected
    kernels (see the module docstring); ``apply`` inserts them as
    ``layer_i/{attention,output}_adapter``; ``unmerge`` removes them. The nonlinearity
    is the model's (``BertConfig.adapter_activation``).
  """
  if where is None:
    where = adapter_where(placement, layers, model)
  elif layers is not None:
    raise ValueError("adapters: pass either where= or placement/layers, not both")
  return adapt(adapter_method(reduction_factor, bottleneck, init_std=init_std, dtype=dtype,
                              model=model), where)
