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

**Using it with a model.** A prefix is an input of the forward pass, not a weight:
``bert_forward(params, config, ids, mask, prefix=prefixes(phi))`` (the model prepends the
prefixes after its key/value projections, extends the mask with ones and, as Hugging
Face BERT with ``past_key_values``, starts the position ids at ``P``).
For code that only sees ``theta = reparam.apply(theta0, phi)``, :func:`prefix_reparam`
is a :class:`~lowrank_jax.Reparam` that stores the list of ``(P_K, P_V)`` pairs under the
reserved key ``theta[at]["prefix"]`` (:data:`PREFIX_KEY`); :func:`split_prefix` takes it
back out: ``params, prefix = split_prefix(theta["bert"])``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import tree as tree_lib
from lowrank_jax.reparam import Reparam

__all__ = [
  "PREFIX_KEY",
  "PrefixTuning",
  "prefix_tuning",
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


class PrefixTuning(NamedTuple):
  """Prefix tuning for a model of known size.

  Attributes:
    init: ``key -> phi``.
    prefixes: ``phi -> [(P_K, P_V), ...]`` per layer (each ``[P, D]``).
    materialize: ``phi -> phi`` in the direct form (drops the MLP).
  """
  init: Callable[[jax.Array], PyTree]
  prefixes: Callable[[PyTree], Prefixes]
  materialize: Callable[[PyTree], PyTree]


def prefix_tuning(num_layers: int, num_prefix: int, hidden: int, *,
                  reparam_mlp: Optional[int] = None, embed_dim: Optional[int] = None,
                  init_std: float = 1.0, dtype=jnp.float32) -> PrefixTuning:
  """Prefix tuning of an ``L``-layer model of width ``D`` with ``P`` prefix slots per layer.

  Args:
    num_layers: ``L``.
    num_prefix: ``P``.
    hidden: ``D`` (the key/value width, all heads).
    reparam_mlp: hidden width of the reparametrisation MLP ``P = MLP(E)`` (``None``:
      train the prefixes directly).
    embed_dim: ``d_e``, the width of ``E`` (default ``D``).
    init_std: std of the normal init of the prefixes / ``E``.
    dtype: parameter dtype.

  Returns:
    A :class:`PrefixTuning`; pass ``prefixes(phi)`` as the model's ``prefix=``.
  """
  _check_sizes(num_layers, num_prefix, hidden, reparam_mlp, embed_dim)
  return PrefixTuning(
      init=lambda key: init_prefix(key, num_layers, num_prefix, hidden, mlp_hidden=reparam_mlp,
                                   embed_dim=embed_dim, init_std=init_std, dtype=dtype),
      prefixes=prefixes, materialize=materialize_prefix)


def _model_node(theta: PyTree, at: str) -> Mapping:
  node = theta
  for part in [p for p in at.split("/") if p]:
    if not isinstance(node, Mapping) or part not in node:
      keys = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise ValueError(f"prefix_reparam: no model subtree '{at}' in theta (keys: {keys})")
    node = node[part]
  return node


def _model_sizes(theta0: PyTree, at: str) -> tuple[int, int]:
  """``(L, D)`` of the BERT-layout model at ``at``: ``encoder/layer_i/attention/key/kernel``."""
  model = _model_node(theta0, at)
  enc = model.get("encoder") if isinstance(model, Mapping) else None
  idx = sorted(int(m[1]) for k in (enc or {}) if (m := re.fullmatch(r"layer_(\d+)", str(k))))
  if not idx or idx != list(range(len(idx))):
    raise ValueError(f"prefix_reparam: '{at}' has no encoder/layer_0..layer_(L-1) "
                     f"(found {sorted(enc) if enc else None})")
  w = enc["layer_0"]["attention"]["key"]["kernel"]
  return len(idx), int(w.shape[-1])


def prefix_reparam(num_prefix: int, *, reparam_mlp: Optional[int] = None,
                   embed_dim: Optional[int] = None, at: str = "bert", init_std: float = 1.0,
                   dtype=jnp.float32) -> Reparam:
  """Prefix tuning as a :class:`~lowrank_jax.Reparam` over the tree holding the model.

  ``L`` and ``D`` are read from ``theta0`` at ``at`` (BERT layout). ``phi`` is the
  prefix parameter tree (direct or MLP form, see the module docstring; a materialised
  ``phi`` works too); it does not mirror ``theta0``. ``apply(theta0, phi)`` returns
  ``theta0`` with ``theta[at]["prefix"] = prefixes(phi)`` added (the other nodes
  shared); read it back with :func:`split_prefix`. ``unmerge`` removes it.

  Args:
    num_prefix: ``P``.
    reparam_mlp, embed_dim, init_std, dtype: as in :func:`prefix_tuning`.
    at: '/'-path of the model parameters inside ``theta`` (``""`` for the root).
  """
  _check_sizes(1, num_prefix, 1, reparam_mlp, embed_dim)
  key_path = f"{at}/{PREFIX_KEY}" if at else PREFIX_KEY

  def init(key, theta0):
    n_layers, hidden = _model_sizes(theta0, at)
    return init_prefix(key, n_layers, num_prefix, hidden, mlp_hidden=reparam_mlp,
                       embed_dim=embed_dim, init_std=init_std, dtype=dtype)

  def apply(theta0, phi, rng=None):
    n_layers, hidden = _model_sizes(theta0, at)
    direct = materialize_prefix(phi)
    if direct["key"].shape[0] != n_layers or direct["key"].shape[-1] != hidden:
      raise ValueError(f"prefix_reparam: prefixes of shape {direct['key'].shape} do not fit a model "
                       f"with {n_layers} layers of width {hidden} at '{at}'")
    return tree_lib.with_subtree(theta0, key_path, prefixes(direct))

  def unmerge(theta, phi):
    return tree_lib.without_subtree(theta, key_path)

  return Reparam(init=init, apply=apply, init_with_base=lambda key, theta0: (theta0, init(key, theta0)),
                 unmerge=unmerge)


def split_prefix(params: PyTree) -> tuple[PyTree, Optional[Prefixes]]:
  """``(params without the prefix, prefix or None)`` of a model tree from :func:`prefix_reparam`."""
  if isinstance(params, Mapping) and PREFIX_KEY in params:
    return {k: v for k, v in params.items() if k != PREFIX_KEY}, list(params[PREFIX_KEY])
  return params, None


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
