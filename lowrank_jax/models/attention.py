"""Scaled dot-product attention with an explicit backward pass.

``softmax(q k^T / sqrt(D) + masking) v`` (Vaswani et al., arXiv 1706.03762), for
``q [B, T, H, D]`` and ``k, v [B, S, K, D]`` with ``K`` dividing ``H`` (grouped-query
attention, Ainslie et al., arXiv 2305.13245). Three implementations, one semantics:

- ``"dpa"``: :func:`jax.nn.dot_product_attention` (no dropout).
- ``"einsum"``: the formula as einsums, differentiated by JAX.
- ``"vjp"``: the einsum forward under a :func:`jax.custom_vjp` whose backward is the
  closed form (with ``P = softmax(S)``, ``P~`` its dropped-out copy, ``dO`` the output
  cotangent)::

      dV = P~^T dO     dP = (dO V^T) * keep / p     dS = P * (dP - rowsum(dP * P))
      dQ = dS K / sqrt(D)     dK = dS^T Q / sqrt(D)

  It stores ``P`` (as autodiff does) but redraws the dropout mask from its key instead
  of storing it, and without differentiation it runs the ``dpa`` forward. On XLA:CPU
  this is what ``"auto"`` picks: the autodiff backward of the einsum or ``dpa`` forms
  lets XLA build large fused dot+softmax kernels that are slower than these separate
  GEMMs (``bench.lora_step`` figures in bench/README.md).

Fully masked rows attend uniformly to every key in all three (the logits are set to
the dtype's minimum, not ``-inf``), and pass no gradient to ``q`` or ``k``.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, Optional

import jax
import jax.numpy as jnp

from lowrank_jax.ops import apply_dropout_mask, dropout, dropout_mask, stat_dtype

__all__ = ["attention", "AttentionImpl"]

AttentionImpl = Literal["auto", "vjp", "einsum", "dpa"]


def _probs(qg: jax.Array, k: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """``softmax(q k^T / sqrt(D))`` over keys, ``[B, K, G, T, S]`` in the statistics dtype;
  ``mask`` is ``[B, K, G, T, S]`` or ``None``."""
  d = qg.shape[-1]
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k) * jnp.asarray(d ** -0.5, qg.dtype)
  logits = logits.astype(stat_dtype(qg.dtype))
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  return jax.nn.softmax(logits, axis=-1)


def _einsum(qg, k, v, mask, rate, rng):
  probs = _probs(qg, k, mask).astype(qg.dtype)
  probs = dropout(probs, rate, rng)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _vjp_attention(qg, k, v, mask, rate, rng):
  if rng is None or rate == 0.0:
    b, t, kh, g, d = qg.shape
    m = None if mask is None else mask.reshape(b, kh * g, t, -1)
    return jax.nn.dot_product_attention(qg.reshape(b, t, kh * g, d), k, v, mask=m).reshape(qg.shape)
  return _einsum(qg, k, v, mask, rate, rng)


def _dropped(probs, dtype, rate, rng):
  """``(P~, keep, scale)``: the probabilities after dropout (redrawn from ``rng``)."""
  keep, scale = (None, 1.0) if rng is None else dropout_mask(rng, probs.shape, rate)
  return apply_dropout_mask(probs.astype(dtype), keep, scale), keep, scale


def _vjp_fwd(qg, k, v, mask, rate, rng):
  probs = _probs(qg, k, mask)
  p, _, _ = _dropped(probs, qg.dtype, rate, rng)
  return jnp.einsum("bkgts,bskd->btkgd", p, v), (qg, k, v, mask, rng, probs)


def _vjp_bwd(rate, res, d_out):
  qg, k, v, mask, rng, probs = res
  p, keep, scale = _dropped(probs, qg.dtype, rate, rng)
  dv = jnp.einsum("bkgts,btkgd->bskd", p, d_out)
  dp = apply_dropout_mask(jnp.einsum("btkgd,bskd->bkgts", d_out, v).astype(probs.dtype), keep, scale)
  ds = probs * (dp - jnp.sum(dp * probs, axis=-1, keepdims=True))
  if mask is not None:
    ds = jnp.where(mask, ds, jnp.zeros((), ds.dtype))
  ds = (ds * qg.shape[-1] ** -0.5).astype(qg.dtype)
  dq = jnp.einsum("bkgts,bskd->btkgd", ds, k)
  dk = jnp.einsum("bkgts,btkgd->bskd", ds, qg)
  return dq, dk, dv, None, None


_vjp_attention.defvjp(_vjp_fwd, _vjp_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              mask: Optional[jax.Array] = None, causal: bool = False,
              dropout_rate: float = 0.0, rng: Optional[jax.Array] = None,
              impl: AttentionImpl = "auto") -> jax.Array:
  """Scaled dot-product attention ``softmax(q k^T / sqrt(D) + masking) v``.

  Args:
    q: ``[B, T, H, D]`` queries.
    k, v: ``[B, S, K, D]`` keys and values; ``K`` must divide ``H`` (GQA).
    mask: boolean, broadcastable to ``[B, H, T, S]``; ``True`` = may attend.
    causal: additionally mask keys after the query position. With ``S > T`` (e.g. a
      prefix or cache) query ``t`` sees keys ``<= t + S - T``.
    dropout_rate, rng: dropout on the attention probabilities (not with ``"dpa"``).
    impl: ``"vjp"`` (explicit backward, see the module docstring), ``"einsum"``,
      ``"dpa"`` (``jax.nn.dot_product_attention``), or ``"auto"`` (= ``"vjp"``).

  Returns:
    ``[B, T, H, D]`` in ``q.dtype``.
  """
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"attention: q {q.shape}, k {k.shape} and v {v.shape} do not fit "
                     f"[B, T, H, D] / [B, S, K, D]")
  if h % kh:
    raise ValueError(f"attention: {h} query heads not divisible by {kh} key/value heads")
  if impl not in ("auto", "vjp", "einsum", "dpa"):
    raise ValueError(f"unknown attention impl {impl!r}; expected auto, vjp, einsum or dpa")
  training = rng is not None and dropout_rate > 0.0
  if not training:
    rng = None
  if causal:
    cmask = jnp.arange(s)[None, :] <= (jnp.arange(t)[:, None] + (s - t))
    mask = cmask[None, None] if mask is None else jnp.logical_and(mask, cmask[None, None])
  if impl == "dpa":
    if training:
      raise ValueError("attention impl 'dpa' has no dropout; use impl='vjp', 'einsum' or 'auto'")
    if mask is not None:
      mask = jnp.broadcast_to(mask, (b, h, t, s))
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  g = h // kh
  qg = q.reshape(b, t, kh, g, d)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, h, t, s)).reshape(b, kh, g, t, s)
  fn = _einsum if impl == "einsum" else _vjp_attention
  return fn(qg, k, v, mask, float(dropout_rate), rng).reshape(b, t, h, d)
