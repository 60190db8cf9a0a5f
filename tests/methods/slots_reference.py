"""A float64 numpy Llama forward written from the equations, with the model-owned slots
(per-layer prefix keys/values concatenated explicitly, bottleneck adapters): the independent
reference of the prefix-tuning and adapter tests on the decoder layout."""

from __future__ import annotations

import jax
import numpy as np

from lowrank_jax.models import llama


def _rms(p, x, eps):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * p["scale"]


def _rope(x, pos, theta):
  """Rotate-half RoPE of ``x [B, T, H, hd]`` at positions ``pos [B, T]``."""
  hd = x.shape[-1]
  ang = pos[..., None] * theta ** (-np.arange(0, hd, 2) / hd)  # [B, T, hd/2]
  c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
  return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], -1)


def _adapter(p, h):
  """``h + relu(h W_down + b_down) W_up + b_up``."""
  return h + np.maximum(h @ p["down"]["kernel"] + p["down"]["bias"], 0.0) @ p["up"]["kernel"] + p["up"]["bias"]


def np_llama(params, cfg: llama.LlamaConfig, tokens, mask=None, positions=None) -> np.ndarray:
  """Float64 logits ``[B, T, V]``. Each ``layers/layer_i`` may hold ``prefix = {key, value}``
  (``[P, K, hd]``, used as given: concatenated in front of the post-RoPE keys/values and
  visible to every query) and ``attention_adapter`` / ``output_adapter`` (applied to the
  attention / MLP output before the residual add). ``mask [B, T]``: 1 = token;
  ``positions [B, T]`` (default ``0..T-1``) of RoPE."""
  P = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  b, t = tokens.shape
  h, kh, hd = cfg.num_heads, cfg.kv_heads, cfg.dim_head
  pos = np.broadcast_to(np.arange(t, dtype=np.float64) if positions is None
                        else np.asarray(positions, np.float64), (b, t))
  keep = np.ones((b, t), bool) if mask is None else np.asarray(mask).astype(bool)
  x = P["embed_tokens"]["embedding"][tokens]
  for i in range(cfg.num_layers):
    L = P["layers"][f"layer_{i}"]
    A = L["attention"]
    n = _rms(L["input_norm"], x, cfg.rms_norm_eps)
    q = _rope((n @ A["q_proj"]["kernel"]).reshape(b, t, h, hd), pos, cfg.rope_theta)
    k = _rope((n @ A["k_proj"]["kernel"]).reshape(b, t, kh, hd), pos, cfg.rope_theta)
    v = (n @ A["v_proj"]["kernel"]).reshape(b, t, kh, hd)
    allowed = np.tril(np.ones((t, t), bool))[None] & keep[:, None, :]  # [B, T, S]
    if "prefix" in L:  # explicit concatenation [P_K; K], [P_V; V], prefix always visible
      pk, pv = (np.broadcast_to(L["prefix"][n_], (b,) + L["prefix"][n_].shape) for n_ in ("key", "value"))
      k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
      allowed = np.concatenate([np.ones((b, t, pk.shape[1]), bool), allowed], -1)
    k, v = np.repeat(k, h // kh, axis=2), np.repeat(v, h // kh, axis=2)  # GQA: head j uses kv j // g
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
    ok = allowed[:, None]  # [B, 1, T, S]; a fully masked (padding) row attends to nothing
    top = np.where(ok, s, -np.inf).max(-1, keepdims=True)
    pr = np.where(ok, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
    pr /= np.maximum(pr.sum(-1, keepdims=True), 1e-300)
    a = np.einsum("bhts,bshd->bthd", pr, v).reshape(b, t, h * hd) @ A["o_proj"]["kernel"]
    if "attention_adapter" in L:
      a = _adapter(L["attention_adapter"], a)
    x = x + a
    n = _rms(L["post_attention_norm"], x, cfg.rms_norm_eps)
    M = L["mlp"]
    g = n @ M["gate_proj"]["kernel"]
    m = (g / (1 + np.exp(-g)) * (n @ M["up_proj"]["kernel"])) @ M["down_proj"]["kernel"]
    if "output_adapter" in L:
      m = _adapter(L["output_adapter"], m)
    x = x + m
  x = _rms(P["norm"], x, cfg.rms_norm_eps)
  if cfg.tie_word_embeddings:
    return x @ P["embed_tokens"]["embedding"].T
  return x @ P["lm_head"]["kernel"]
