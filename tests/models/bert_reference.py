"""Shared by the BERT, adapter and prefix tests: a tiny random BERT problem and one float64
numpy BERT written from the equations (the independent reference)."""

from __future__ import annotations

import math

import jax
import numpy as np

from lowrank_jax.models import bert

_erf = np.vectorize(math.erf)
NP_ACT = {"relu": lambda x: np.maximum(x, 0.0), "tanh": np.tanh}


def tiny_problem(cfg: bert.BertConfig, key: int, shape: tuple[int, int], pads: dict[int, int],
                 pooler: bool = True):
  """``(params, ids, mask)``: random BERT weights with non-trivial LayerNorm and bias values
  (so that the reference exercises every term), random ids, and ``mask[row, start:] = 0`` for
  each ``row: start`` of ``pads``."""
  params = bert.init_bert(jax.random.PRNGKey(key), cfg, pooler=pooler)
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape)
                        if x.ndim == 1 else 10.0 * x, params)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, shape)
  mask = np.ones(shape, np.int32)
  for row, start in pads.items():
    mask[row, start:] = 0
  return params, ids, mask


def valid(x, mask) -> np.ndarray:
  """The rows of ``x [B, T, ...]`` at unmasked tokens (padding rows are unspecified)."""
  return np.asarray(x)[np.asarray(mask).astype(bool)]


def _ln(p, x, eps):
  m = x.mean(-1, keepdims=True)
  v = ((x - m) ** 2).mean(-1, keepdims=True)
  return (x - m) / np.sqrt(v + eps) * p["scale"] + p["bias"]


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


def _adapter(p, h, act):
  """``h + act(h W_down + b_down) W_up + b_up``."""
  return h + _dense(p["up"], act(_dense(p["down"], h)))


def np_bert(params, cfg: bert.BertConfig, ids, mask, *, prefix=None, offset=None,
            adapters_by_slot=None, act: str = "relu") -> np.ndarray:
  """Float64 BERT forward (``last_hidden_state``).

  Args:
    prefix: per layer ``(P_K, P_V)`` of ``P * D`` values each (``[P, D]`` or
      ``[P, H, Dh]``), concatenated in front of that layer's keys and values and always
      attended to.
    offset: first position id (default ``P`` with a prefix, as Hugging Face, else 0).
    adapters_by_slot: ``{(i, "attention" | "output"): adapter params}`` applied after that
      sub-layer's projection; without it, ``attention_adapter`` / ``output_adapter``
      subtrees of ``params`` are used.
    act: the adapters' activation (a key of :data:`NP_ACT`).
  """
  P = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  slots = {k: jax.tree.map(lambda x: np.asarray(x, np.float64), v)
           for k, v in (adapters_by_slot or {}).items()}
  f = NP_ACT[act]
  b, t = ids.shape
  h, dh = cfg.num_attention_heads, cfg.head_dim
  if offset is None:
    offset = 0 if prefix is None else np.size(prefix[0][0]) // (h * dh)
  e = P["embeddings"]
  x = (e["word_embeddings"]["embedding"][ids] + e["position_embeddings"]["embedding"][offset:offset + t]
       + e["token_type_embeddings"]["embedding"][0])
  x = _ln(e["LayerNorm"], x, cfg.layer_norm_eps)
  for i in range(cfg.num_hidden_layers):
    L = P["encoder"][f"layer_{i}"]
    A = L["attention"]
    q, k, v = (_dense(A[n], x) for n in ("query", "key", "value"))
    m = np.asarray(mask).astype(bool)
    if prefix is not None:  # explicit concatenation [P_K; K], [P_V; V], mask [1..1; m]
      pk, pv = (np.broadcast_to(np.asarray(z, np.float64).reshape(-1, h * dh), (b, np.size(z) // (h * dh), h * dh))
                for z in prefix[i])
      k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
      m = np.concatenate([np.ones((b, pk.shape[1]), bool), m], 1)
    q, k, v = (z.reshape(b, z.shape[1], h, dh) for z in (q, k, v))
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(dh)
    s = np.where(m[:, None, None, :], s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    a = _dense(A["output"], np.einsum("bhts,bshd->bthd", pr, v).reshape(b, t, h * dh))
    ad = slots.get((i, "attention"), None if adapters_by_slot else L.get("attention_adapter"))
    if ad is not None:
      a = _adapter(ad, a, f)
    x = _ln(A["output"]["LayerNorm"], x + a, cfg.layer_norm_eps)
    u = _dense(L["intermediate"], x)
    u = 0.5 * u * (1 + _erf(u / np.sqrt(2)))
    o = _dense(L["output"], u)
    ad = slots.get((i, "output"), None if adapters_by_slot else L.get("output_adapter"))
    if ad is not None:
      o = _adapter(ad, o, f)
    x = _ln(L["output"]["LayerNorm"], x + o, cfg.layer_norm_eps)
  return x
