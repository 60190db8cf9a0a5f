"""A small Llama-style decoder (Touvron et al., arXiv 2302.13971) as a pure function.

Pre-norm blocks with RMSNorm, rotary position embeddings (RoPE, Su et al., arXiv
2104.09864, Hugging Face "rotate half" layout), a SwiGLU MLP (Shazeer, arXiv
2002.05202), optional grouped-query attention (Ainslie et al., arXiv 2305.13245),
causal self-attention and a tied or untied LM head. No bias terms. Parameters::

    embed_tokens/embedding                               [V, D]
    layers/layer_{i}/input_norm/scale                    [D]
    layers/layer_{i}/attention/{q_proj,o_proj}/kernel    [D, H*hd], [H*hd, D]
    layers/layer_{i}/attention/{k_proj,v_proj}/kernel    [D, K*hd]
    layers/layer_{i}/post_attention_norm/scale           [D]
    layers/layer_{i}/mlp/{gate_proj,up_proj}/kernel      [D, F]
    layers/layer_{i}/mlp/down_proj/kernel                [F, D]
    norm/scale                                           [D]
    lm_head/kernel                                       [D, V]   (untied only)

Block ``i``::

    x = x + o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))
    x = x + down(silu(gate(n2(x))) * up(n2(x)))

All projections go through :func:`lowrank_jax.dot`, so QLoRA-style trees (NF4 base +
LoRA factors) run without materialising the frozen weights. There are no real Llama
weights here: :func:`init_llama` draws random ones (``N(0, 0.02^2)``, norms at one).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import lazy
from lowrank_jax.models import layers
from lowrank_jax.models.attention import AttentionImpl

__all__ = ["LlamaConfig", "init_llama", "llama_forward", "llama_hidden", "llama_param_count",
           "rope", "rope_angles"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama architecture hyper-parameters (hashable: usable as a static jit argument)."""
  vocab_size: int = 32000
  hidden_size: int = 2048
  intermediate_size: int = 5632
  num_layers: int = 22
  num_heads: int = 32
  num_kv_heads: Optional[int] = None  # None -> num_heads (no GQA)
  head_dim: Optional[int] = None      # None -> hidden_size // num_heads
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  max_seq_len: int = 2048
  init_std: float = 0.02

  def __post_init__(self):
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.kv_heads}")
    if self.dim_head % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.dim_head}")

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def dim_head(self) -> int:
    return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

  @classmethod
  def tiny(cls, **kw) -> "LlamaConfig":
    """A test-sized model (vocab 256, D=64, 2 layers, 4 heads, 2 KV heads)."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2,
                num_heads=4, num_kv_heads=2, max_seq_len=128)
    return cls(**{**base, **kw})

  @classmethod
  def llama_1b(cls, **kw) -> "LlamaConfig":
    """TinyLlama-1.1B's shape: V=32000, D=2048, F=5632, 22 layers, 32 heads, 4 KV heads."""
    base = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                num_heads=32, num_kv_heads=4, max_seq_len=2048)
    return cls(**{**base, **kw})


def llama_param_count(config: LlamaConfig) -> int:
  """``V D + L (D H hd + 2 D K hd + H hd D + 3 D F + 2 D) + D (+ D V if untied)``."""
  c = config
  d, f, hd = c.hidden_size, c.intermediate_size, c.dim_head
  per_layer = d * c.num_heads * hd + 2 * d * c.kv_heads * hd + c.num_heads * hd * d + 3 * d * f + 2 * d
  head = 0 if c.tie_word_embeddings else d * c.vocab_size
  return c.vocab_size * d + c.num_layers * per_layer + d + head


def _layer_spec(config: LlamaConfig) -> dict:
  c = config
  d, f, hd = c.hidden_size, c.intermediate_size, c.dim_head
  return {
    "input_norm": {"scale": ("ones", (d,))},
    "attention": {"q_proj": {"kernel": ("normal", (d, c.num_heads * hd))},
                  "k_proj": {"kernel": ("normal", (d, c.kv_heads * hd))},
                  "v_proj": {"kernel": ("normal", (d, c.kv_heads * hd))},
                  "o_proj": {"kernel": ("normal", (c.num_heads * hd, d))}},
    "post_attention_norm": {"scale": ("ones", (d,))},
    "mlp": {"gate_proj": {"kernel": ("normal", (d, f))}, "up_proj": {"kernel": ("normal", (d, f))},
            "down_proj": {"kernel": ("normal", (f, d))}},
  }


def _outer_spec(config: LlamaConfig) -> dict:
  c = config
  spec = {"embed_tokens": {"embedding": ("normal", (c.vocab_size, c.hidden_size))},
          "norm": {"scale": ("ones", (c.hidden_size,))}}
  if not c.tie_word_embeddings:
    spec["lm_head"] = {"kernel": ("normal", (c.hidden_size, c.vocab_size))}
  return spec


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_part(key, config: LlamaConfig, dtype, part: str) -> PyTree:
  spec = _layer_spec(config) if part == "layer" else _outer_spec(config)
  return layers.init_from_spec(key, spec, dtype, std=config.init_std)


def init_llama(key: jax.Array, config: LlamaConfig, dtype=jnp.float32) -> PyTree:
  """Random parameters: matrices ``~ N(0, init_std^2)`` (drawn in float32), norm scales 1.

  One compiled program initialises a layer (compiled once, called per layer with
  ``fold_in(key, i)``), another the embeddings and head, so even a 1B model compiles
  quickly; ``jax.eval_shape(init_llama, ...)`` gives the abstract tree without allocating.
  """
  dtype = jnp.dtype(dtype)
  params = dict(_init_part(jax.random.fold_in(key, config.num_layers), config, dtype, "outer"))
  params["layers"] = {f"layer_{i}": _init_part(jax.random.fold_in(key, i), config, dtype, "layer")
                      for i in range(config.num_layers)}
  return params


def rope_angles(positions: jax.Array, head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
  """``(cos, sin)`` of ``pos * theta^(-2j/hd)``, ``j < hd/2``, each ``[..., T, hd/2]`` in float32."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  ang = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
  return jnp.cos(ang), jnp.sin(ang)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotary embedding in the "rotate half" layout: pairs ``(x_j, x_{j + hd/2})`` are rotated
  by the angle ``a_j``: ``(x_j cos a_j - x_{j+hd/2} sin a_j, x_j sin a_j + x_{j+hd/2} cos a_j)``.

  Args:
    x: ``[B, T, H, hd]``.
    cos, sin: ``[T, hd/2]`` or ``[B, T, hd/2]`` from :func:`rope_angles`.
  """
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  c, s = cos[..., None, :], sin[..., None, :]  # broadcast over heads
  if c.ndim == 3:  # [T, 1, hd/2] -> [1, T, 1, hd/2]
    c, s = c[None], s[None]
  return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).astype(x.dtype)


def _block(p: PyTree, c: LlamaConfig, x, cos, sin, key_mask, impl):
  h = layers.rms_norm(p["input_norm"], x, c.rms_norm_eps)
  att = p["attention"]
  q = layers.split_heads(layers.dense(att["q_proj"], h), c.num_heads)
  k = layers.split_heads(layers.dense(att["k_proj"], h), c.kv_heads)
  v = layers.split_heads(layers.dense(att["v_proj"], h), c.kv_heads)
  q, k = rope(q, cos, sin), rope(k, cos, sin)
  mask = None if key_mask is None else key_mask[:, None, None, :]
  ctx = layers.attention(q, k, v, mask=mask, causal=True, impl=impl)
  x = x + layers.dense(att["o_proj"], layers.merge_heads(ctx))
  h = layers.rms_norm(p["post_attention_norm"], x, c.rms_norm_eps)
  mlp = p["mlp"]
  g = jax.nn.silu(layers.dense(mlp["gate_proj"], h)) * layers.dense(mlp["up_proj"], h)
  return x + layers.dense(mlp["down_proj"], g)


def llama_hidden(params: PyTree, config: LlamaConfig, tokens: jax.Array, *,
                 positions: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None, remat: bool = False,
                 attention_impl: AttentionImpl = "auto") -> jax.Array:
  """Final-norm hidden states ``[B, T, D]`` (see :func:`llama_forward` for the arguments)."""
  tokens = jnp.asarray(tokens)
  b, t = tokens.shape
  if positions is None:
    positions = jnp.arange(t)
  cos, sin = rope_angles(positions, config.dim_head, config.rope_theta)
  key_mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  x = layers.embed(params["embed_tokens"]["embedding"], tokens)
  block = _block
  if remat:
    block = jax.checkpoint(_block, static_argnums=(1, 6))
  for i in range(config.num_layers):
    x = block(params["layers"][f"layer_{i}"], config, x, cos, sin, key_mask, attention_impl)
  return layers.rms_norm(params["norm"], x, config.rms_norm_eps)


def llama_forward(params: PyTree, config: LlamaConfig, tokens: jax.Array, *,
                  positions: Optional[jax.Array] = None,
                  attention_mask: Optional[jax.Array] = None, remat: bool = False,
                  attention_impl: AttentionImpl = "auto") -> jax.Array:
  """Next-token logits ``[B, T, V]`` of a causal decoder.

  Args:
    params: parameter tree (may contain lazy weights, e.g. NF4 + LoRA).
    config: the :class:`LlamaConfig`.
    tokens: ``[B, T]`` int ids.
    positions: RoPE positions ``[T]`` or ``[B, T]`` (default ``0..T-1``).
    attention_mask: optional ``[B, T]`` key padding mask (1 = real token).
    remat: recompute each block in the backward pass (``jax.checkpoint``) to save memory.
    attention_impl: see :func:`lowrank_jax.models.layers.attention`.
  """
  h = llama_hidden(params, config, tokens, positions=positions, attention_mask=attention_mask,
                   remat=remat, attention_impl=attention_impl)
  if config.tie_word_embeddings:
    emb = lazy.materialize(params["embed_tokens"]["embedding"])
    return jnp.einsum("btd,vd->btv", h, emb.astype(h.dtype))
  return layers.dense(params["lm_head"], h)
