"""Prefix tuning: trained key/value vectors prepended to every attention layer.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv 2101.00190.

Layer ``l`` attends over ``P`` trained prefix slots before the real tokens; per head::

    K = [P_K^l ; X W_K + b_K],   V = [P_V^l ; X W_V + b_V],   P_K^l, P_V^l in R^{P x D}
    Attn_l(X) = softmax(Q K^T / sqrt(d_h) + mask) V          (the prefix slots are never masked)

The model's weights stay frozen; only the prefixes train. Two parametrisations of ``phi``:

* **direct** (peft ``prefix_projection=False``): ``{"key": [L, P, D], "value": [L, P, D]}``;
* **MLP** (the paper's reparametrisation, Sec. 4.3, ``P = MLP(E)``; peft
  ``prefix_projection=True``)::

      {"embedding": E [P, d_e],
       "hidden": {"kernel": [d_e, h], "bias": [h]},
       "out":    {"kernel": [h, L, 2, D], "bias": [L, 2, D]}}
      [P_K^l, P_V^l] = (tanh(E W_1 + b_1) W_2 + b_2)[:, l, 0], [...][:, l, 1]

  The MLP only eases optimisation: after training, :func:`materialize_prefix` evaluates it
  once and returns the direct form, and the MLP is dropped.

All shapes are read from ``phi``, so :func:`prefixes` needs nothing else. Initialisation
follows peft (``torch.nn.Embedding``: ``N(0, 1)`` for the direct prefix and for ``E``;
``torch.nn.Linear``: ``U(±1/sqrt(fan_in))`` for the MLP's kernels and biases).

**Using it with a model.** :func:`prefix_tuning` is a :class:`~lowrank_jax.Reparam`
over the tree holding the model: ``apply(theta0, phi)`` puts layer ``l``'s prefix into the
model-owned slot ``<layer l>/prefix = {"key": [P, K, hd], "value": [P, K, hd]}``
(:mod:`lowrank_jax.models.slots`; ``[P, D]`` when the model description does not give the
heads), which the forward pass reads: BERT and the decoders prepend it after their key/value
projections and extend the mask with ones; BERT, as Hugging Face with ``past_key_values``,
starts its position ids at ``P``; the decoders store keys post-RoPE and keep the positions.
``model=`` (``bert.slots(config)``, ``slots.decoder_slots(config)``) says where the layers
are and sizes them (default: BERT's layout). Internally it is an :func:`~lowrank_jax.adapt`
of a method with shared parameters only: it anchors at every layer's key projection (whose
width is ``D``), ``phi`` is the prefix tree above, ``prepare`` evaluates the MLP once and
``insert`` fills the slots. Without a tree, ``prefixes(phi)`` gives the model's explicit
``prefix=`` argument: ``bert_forward(params, config, ids, mask, prefix=prefixes(phi))``;
:func:`split_prefix` takes the slots back out of a tree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.models import slots as slots_lib
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt

__all__ = [
  "PREFIX_KEY",
  "PrefixTuning",
  "prefix_tuning",
  "prefix_method",
  "init_prefix",
  "prefixes",
  "materialize_prefix",
  "prefix_param_count",
  "prefix_reparam",
  "split_prefix",
  "from_peft",
  "to_peft",
]

PyTree = Any
Prefixes = list[tuple[jax.Array, jax.Array]]

PREFIX_KEY = "prefix"


def _uniform_linear(key, fan_in: int, shape, dtype):
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _check_sizes(num_layers: int, num_prefix: int, hidden: int, mlp_hidden: Optional[int],
                 embed_dim: Optional[int]) -> None:
  for name, v in (("num_layers", num_layers), ("num_prefix", num_prefix), ("hidden", hidden),
                  ("reparam_mlp", mlp_hidden), ("embed_dim", embed_dim)):
    if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
      raise ValueError(f"prefix tuning: {name} must be a positive int, got {v!r}")
  if embed_dim is not None and mlp_hidden is None:
    raise ValueError("prefix tuning: embed_dim is the MLP input size; it needs reparam_mlp=")


def init_prefix(key: jax.Array, num_layers: int, num_prefix: int, hidden: int, *,
                mlp_hidden: Optional[int] = None, embed_dim: Optional[int] = None,
                init_std: float = 1.0, dtype=jnp.float32) -> PyTree:
  """Initial ``phi`` (direct form, or MLP form when ``mlp_hidden`` is given).

  Args:
    key: PRNG key.
    num_layers: ``L``, the number of attention layers.
    num_prefix: ``P``, prefix slots per layer.
    hidden: ``D``, the key/value width (all heads).
    mlp_hidden: width ``h`` of the reparametrisation MLP (``None``: direct prefixes).
    embed_dim: ``d_e``, the MLP input width (default ``D``, as the paper and peft).
    init_std: std of the normal init of the direct prefix / of ``E``.
    dtype: parameter dtype.
  """
  _check_sizes(num_layers, num_prefix, hidden, mlp_hidden, embed_dim)
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  if mlp_hidden is None:
    return {"key": (init_std * jax.random.normal(k1, (num_layers, num_prefix, hidden))).astype(dtype),
            "value": (init_std * jax.random.normal(k2, (num_layers, num_prefix, hidden))).astype(dtype)}
  d_e = hidden if embed_dim is None else embed_dim
  return {
    "embedding": (init_std * jax.random.normal(k1, (num_prefix, d_e))).astype(dtype),
    "hidden": {"kernel": _uniform_linear(k2, d_e, (d_e, mlp_hidden), dtype),
               "bias": _uniform_linear(k3, d_e, (mlp_hidden,), dtype)},
    "out": {"kernel": _uniform_linear(k4, mlp_hidden, (mlp_hidden, num_layers, 2, hidden), dtype),
            "bias": _uniform_linear(k5, mlp_hidden, (num_layers, 2, hidden), dtype)},
  }


def _is_mlp(phi: PyTree) -> bool:
  if isinstance(phi, Mapping) and set(phi) == {"key", "value"}:
    k, v = phi["key"], phi["value"]
    if jnp.ndim(k) != 3 or jnp.shape(k) != jnp.shape(v):
      raise ValueError(f"prefix phi: 'key' and 'value' must both be [L, P, D], got "
                       f"{jnp.shape(k)} and {jnp.shape(v)}")
    return False
  if isinstance(phi, Mapping) and set(phi) == {"embedding", "hidden", "out"}:
    e, w1, w2 = phi["embedding"], phi["hidden"]["kernel"], phi["out"]["kernel"]
    if (jnp.ndim(e) != 2 or jnp.ndim(w2) != 4 or jnp.shape(w2)[2] != 2
        or jnp.shape(w1) != (jnp.shape(e)[1], jnp.shape(w2)[0])):
      raise ValueError(f"prefix phi (MLP form): expected embedding [P, d_e], hidden/kernel "
                       f"[d_e, h], out/kernel [h, L, 2, D]; got {jax.tree.map(jnp.shape, phi)}")
    return True
  shapes = jax.tree.map(jnp.shape, phi) if isinstance(phi, Mapping) else type(phi).__name__
  raise ValueError(f"prefix phi must be {{'key', 'value'}} (direct) or {{'embedding', 'hidden', "
                   f"'out'}} (MLP form); got {shapes}")


def materialize_prefix(phi: PyTree) -> PyTree:
  """The direct form ``{"key": [L, P, D], "value": [L, P, D]}`` of either form.

  For the MLP form this evaluates ``tanh(E W_1 + b_1) W_2 + b_2`` once (the MLP can then
  be dropped); the direct form is returned unchanged.
  """
  if not _is_mlp(phi):
    return phi
  h = jnp.tanh(phi["embedding"] @ phi["hidden"]["kernel"] + phi["hidden"]["bias"])
  out = jnp.einsum("ph,hlkd->lkpd", h, phi["out"]["kernel"]) + phi["out"]["bias"][:, :, None, :]
  return {"key": out[:, 0], "value": out[:, 1]}


def prefixes(phi: PyTree) -> Prefixes:
  """Per-layer ``[(P_K, P_V), ...]``, each ``[P, D]``: the ``prefix=`` argument of the model."""
  direct = materialize_prefix(phi)
  return [(direct["key"][i], direct["value"][i]) for i in range(direct["key"].shape[0])]


def prefix_param_count(num_layers: int, num_prefix: int, hidden: int,
                       mlp_hidden: Optional[int] = None, embed_dim: Optional[int] = None) -> int:
  """Trainable parameters: ``2 L P D`` (direct) or ``P d_e + d_e h + h + 2 L D (h + 1)`` (MLP)."""
  if mlp_hidden is None:
    return 2 * num_layers * num_prefix * hidden
  d_e = hidden if embed_dim is None else embed_dim
  return num_prefix * d_e + d_e * mlp_hidden + mlp_hidden + 2 * num_layers * hidden * (mlp_hidden + 1)


def _model(model: Optional[slots_lib.ModelSlots]) -> slots_lib.ModelSlots:
  return slots_lib.bert_slots() if model is None else model


def _layer_order(model: slots_lib.ModelSlots, views: Mapping[str, MatrixView]) -> tuple[list[str], int]:
  """The anchors (key projections) in layer order, and their common width ``D``."""
  by_index = {}
  for path in views:
    by_index[model.match(path, slots_lib.PREFIX)[1]] = path
  idx = sorted(by_index)
  if idx != list(range(len(idx))):
    raise ValueError(f"prefix tuning: the layers of {model.family} found in the tree are {idx}, "
                     f"not 0..L-1 (prefixes are stored per layer index)")
  if model.num_layers is not None and len(idx) != model.num_layers:
    raise ValueError(f"prefix tuning: found {len(idx)} layers of {model.family}, the model "
                     f"description has {model.num_layers}")
  paths = [by_index[i] for i in idx]
  widths = {views[p].d_out for p in paths}
  if len(widths) != 1:
    raise ValueError(f"prefix tuning: the key projections of {model.family} differ in width {sorted(widths)}")
  return paths, widths.pop()


def prefix_method(num_prefix: int, *, model: Optional[slots_lib.ModelSlots] = None,
                  reparam_mlp: Optional[int] = None, embed_dim: Optional[int] = None,
                  init_std: float = 1.0, dtype=jnp.float32) -> LeafMethod:
  """Prefix tuning as a :class:`~lowrank_jax.LeafMethod` with shared parameters only.

  It anchors at each layer's key projection kernel (``model``'s ``prefix`` anchor, whose
  output width is ``D = K * hd``); ``init_shared`` draws the prefix parameters (direct or
  MLP form) for the ``L`` layers found, ``prepare`` materialises them into per-layer
  ``{"key", "value"}`` of shape ``[P, K, hd]`` (``[P, D]`` without the heads), ``insert``
  puts each into its layer's ``prefix`` slot.
  """
  _check_sizes(1, num_prefix, 1, reparam_mlp, embed_dim)
  m = _model(model)

  def validate(path: str, view: MatrixView):
    if m.match(path, slots_lib.PREFIX) is None:
      raise ValueError(f"prefix tuning: leaf '{path}' is not a key projection of {m.family} "
                       f"({m.anchor_regex(slots_lib.PREFIX)})")

  def init_shared(key, views):
    paths, width = _layer_order(m, views)
    m.prefix_shape(num_prefix, width)  # checks the width against the heads
    return init_prefix(key, len(paths), num_prefix, width, mlp_hidden=reparam_mlp,
                       embed_dim=embed_dim, init_std=init_std, dtype=dtype)

  def prepare(shared, views):
    paths, width = _layer_order(m, views)
    direct = materialize_prefix(shared)
    n_layers, p_len, d = direct["key"].shape
    if n_layers != len(paths) or d != width:
      raise ValueError(f"prefix tuning: prefixes of shape {direct['key'].shape} do not fit "
                       f"{m.family} with {len(paths)} layers of key width {width}")
    shape = m.prefix_shape(p_len, width)
    return {path: {"key": direct["key"][i].reshape(shape), "value": direct["value"][i].reshape(shape)}
            for i, path in enumerate(paths)}

  def insert(path, phi_leaf, layer_prefix):
    layer, _ = m.match(path, slots_lib.PREFIX)
    return {m.slot_path(layer, slots_lib.PREFIX): layer_prefix}

  return LeafMethod(name="prefix tuning", init_leaf=None, apply_leaf=None, validate=validate,
                    init_shared=init_shared, prepare=prepare, insert=insert)


class PrefixTuning(Reparam):
  """Prefix tuning: a :class:`~lowrank_jax.Reparam` (``init``, ``apply``,
  ``init_with_base``, ``unmerge``) with the helpers of its ``phi``.

  ``init(key, theta0=None)``: without ``theta0`` the sizes given to
  :func:`prefix_tuning` (``num_layers`` and ``hidden``, or a sized ``model``) are used.
  """
  __slots__ = ()

  @staticmethod
  def prefixes(phi: PyTree) -> Prefixes:
    """Per-layer ``[(P_K, P_V), ...]``, each ``[P, D]`` (the model's ``prefix=`` argument)."""
    return prefixes(phi)

  @staticmethod
  def materialize(phi: PyTree) -> PyTree:
    """``phi`` in the direct form (drops the MLP)."""
    return materialize_prefix(phi)


def prefix_tuning(num_layers: Optional[int] = None, num_prefix: Optional[int] = None,
                  hidden: Optional[int] = None, *, model: Optional[slots_lib.ModelSlots] = None,
                  num_virtual_tokens: Optional[int] = None, reparam_mlp: Optional[int] = None,
                  embed_dim: Optional[int] = None, init_std: float = 1.0,
                  dtype=jnp.float32) -> PrefixTuning:
  """Prefix tuning with ``P`` prefix slots per layer, as a :class:`~lowrank_jax.Reparam`.

  ``prefix_tuning(model=bert.slots(config), num_virtual_tokens=P)`` (or
  ``slots.decoder_slots(config)``); the older ``prefix_tuning(L, P, D)`` describes a
  BERT-layout model by its sizes and keeps working (``init(key)`` needs no tree then).

  Args:
    num_layers: ``L`` (old form; else read from the tree or ``model``).
    num_prefix: ``P`` (old name of ``num_virtual_tokens``).
    hidden: ``D``, the key/value width, all heads (old form).
    model: where the model's layers are (:class:`~lowrank_jax.models.slots.ModelSlots`;
      default: BERT's layout anywhere in the tree).
    num_virtual_tokens: ``P`` (peft's name).
    reparam_mlp: hidden width of the reparametrisation MLP ``P = MLP(E)`` (``None``:
      train the prefixes directly).
    embed_dim: ``d_e``, the width of ``E`` (default ``D``).
    init_std: std of the normal init of the prefixes / ``E``.
    dtype: parameter dtype.

  Returns:
    A :class:`PrefixTuning` (a ``Reparam``): ``phi`` is the prefix tree (direct
    ``{"key", "value"}: [L, P, D]`` or the MLP form), ``apply`` fills the layers'
    ``prefix`` slots, ``unmerge`` removes them; ``.prefixes(phi)`` and ``.materialize(phi)``.
  """
  if num_prefix is not None and num_virtual_tokens is not None and num_prefix != num_virtual_tokens:
    raise ValueError(f"prefix tuning: num_prefix={num_prefix} and num_virtual_tokens="
                     f"{num_virtual_tokens} disagree (they are the same P)")
  p_len = num_virtual_tokens if num_virtual_tokens is not None else num_prefix
  if p_len is None:
    raise ValueError("prefix tuning: pass num_virtual_tokens= (P, the prefix length)")
  if model is not None and (num_layers is not None or hidden is not None):
    raise ValueError("prefix tuning: pass the model's sizes through model= (ModelSlots) or as "
                     "num_layers/hidden (BERT layout), not both")
  _check_sizes(1 if num_layers is None else num_layers, p_len, 1 if hidden is None else hidden,
               reparam_mlp, embed_dim)
  if model is None:
    model = slots_lib.bert_slots(num_layers=num_layers)
  width = hidden if hidden is not None else model.kv_width
  inner = adapt(prefix_method(p_len, model=model, reparam_mlp=reparam_mlp, embed_dim=embed_dim,
                              init_std=init_std, dtype=dtype), model.where(slots_lib.PREFIX))

  def init(key: jax.Array, theta0: PyTree = None) -> PyTree:
    if theta0 is not None:
      return inner.init(key, theta0)
    if model.num_layers is None or width is None:
      raise ValueError(f"prefix tuning: init(key) without a tree needs the number of layers and the "
                       f"key width; {model.family}'s description has num_layers={model.num_layers}, "
                       f"kv width={width}; call init(key, theta0)")
    return init_prefix(jax.random.split(key)[1], model.num_layers, p_len, width, mlp_hidden=reparam_mlp,
                       embed_dim=embed_dim, init_std=init_std, dtype=dtype)

  return PrefixTuning(init=init, apply=inner.apply, init_with_base=inner.init_with_base,
                      unmerge=inner.unmerge)


@configured("prefix_tuning")
def prefix_reparam(num_prefix: int, *, reparam_mlp: Optional[int] = None,
                   embed_dim: Optional[int] = None, at: Optional[str] = "bert", init_std: float = 1.0,
                   dtype=jnp.float32, model: Optional[slots_lib.ModelSlots] = None) -> PrefixTuning:
  """Prefix tuning of the model at ``at`` inside the tree (BERT layout by default).

  ``prefix_tuning(model=(model or bert_slots()).at(at), num_virtual_tokens=num_prefix, ...)``:
  ``L`` and ``D`` are read from ``theta0``; ``apply`` fills each layer's ``prefix`` slot
  (read it back with :func:`split_prefix`); ``unmerge`` removes them.

  Args:
    num_prefix: ``P``.
    reparam_mlp, embed_dim, init_std, dtype: as in :func:`prefix_tuning`.
    at: '/'-path of the model parameters inside ``theta`` (``""`` for the root, ``None``:
      anywhere).
    model: the model's slots (default: BERT's layout).
  """
  return prefix_tuning(model=_model(model).at(at), num_virtual_tokens=num_prefix,
                       reparam_mlp=reparam_mlp, embed_dim=embed_dim, init_std=init_std, dtype=dtype)


def split_prefix(params: PyTree, model: Optional[slots_lib.ModelSlots] = None
                 ) -> tuple[PyTree, Optional[Prefixes]]:
  """``(params without the prefixes, [(P_K, P_V) or None per layer] or None)``.

  Reads the per-layer ``prefix`` slots that :func:`prefix_tuning` fills (each pair in the
  stored shape, ``[P, K, hd]`` or ``[P, D]``), or the older top-level ``params["prefix"]``
  list. ``model``: where the layers are in ``params`` (default: BERT's layout).
  """
  if isinstance(params, Mapping) and PREFIX_KEY in params:
    return {k: v for k, v in params.items() if k != PREFIX_KEY}, list(params[PREFIX_KEY])
  m = _model(model)
  layer_rx = re.compile(f"^{m.layer_regex()}/")
  slot_rx = re.compile(f"^{m.layer_regex()}/{PREFIX_KEY}/(?:key|value)$")
  paths = tree_lib.leaf_paths(params)
  layers = {int(h.group(2)): h["layer"] for h in map(layer_rx.match, paths) if h}
  found = {int(h.group(2)): h["layer"] for h in map(slot_rx.match, paths) if h}
  if not found:
    return params, None
  out: list = [None] * (max(layers) + 1)
  for i, layer in found.items():
    node = params
    for part in f"{layer}/{PREFIX_KEY}".split("/"):
      node = node[part]
    out[i] = (node["key"], node["value"])
    params = tree_lib.without_subtree(params, f"{layer}/{PREFIX_KEY}")
  return params, out


def from_peft(state: Mapping[str, Any], num_layers: int) -> PyTree:
  """``phi`` from the tensors of peft's ``PrefixEncoder`` (as numpy/JAX arrays).

  Args:
    state: ``{"embedding.weight": ...}`` (``prefix_projection=False``: ``[P, L*2*D]``) or
      additionally ``transform.0.weight/bias`` and ``transform.2.weight/bias`` (the MLP,
      torch layout ``[out, in]``).
    num_layers: ``L`` (peft's flat layout interleaves ``(layer, key/value)``).
  """
  emb = jnp.asarray(state["embedding.weight"])
  if "transform.0.weight" not in state:
    p, flat = emb.shape
    d = flat // (2 * num_layers)
    kv = emb.reshape(p, num_layers, 2, d)
    return {"key": jnp.transpose(kv[:, :, 0], (1, 0, 2)), "value": jnp.transpose(kv[:, :, 1], (1, 0, 2))}
  w1, b1 = jnp.asarray(state["transform.0.weight"]), jnp.asarray(state["transform.0.bias"])
  w2, b2 = jnp.asarray(state["transform.2.weight"]), jnp.asarray(state["transform.2.bias"])
  h = w1.shape[0]
  d = w2.shape[0] // (2 * num_layers)
  return {"embedding": emb, "hidden": {"kernel": w1.T, "bias": b1},
          "out": {"kernel": w2.T.reshape(h, num_layers, 2, d), "bias": b2.reshape(num_layers, 2, d)}}


def to_peft(phi: PyTree) -> dict[str, jax.Array]:
  """Inverse of :func:`from_peft`: peft ``PrefixEncoder`` tensors (torch layout)."""
  if not _is_mlp(phi):
    kv = jnp.stack([phi["key"], phi["value"]], axis=2)  # [L, P, 2, D]
    l, p, _, d = kv.shape
    return {"embedding.weight": jnp.transpose(kv, (1, 0, 2, 3)).reshape(p, l * 2 * d)}
  w2 = phi["out"]["kernel"]
  h = w2.shape[0]
  return {"embedding.weight": phi["embedding"],
          "transform.0.weight": phi["hidden"]["kernel"].T, "transform.0.bias": phi["hidden"]["bias"],
          "transform.2.weight": w2.reshape(h, -1).T, "transform.2.bias": phi["out"]["bias"].reshape(-1)}
