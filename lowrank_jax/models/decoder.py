"""Decoder-only transformers as one pure function: Llama 1-3, Mistral, Qwen2/2.5, Qwen3,
Gemma 1-3 and the mixture-of-experts Qwen3-MoE and Mixtral.

Touvron et al. (Llama, arXiv 2302.13971, 2307.09288, 2407.21783), Jiang et al.
(Mistral 2310.06825, Mixtral 2401.04088), Qwen team (2407.10671, 2505.09388), Gemma team
(2403.08295, 2408.00118, 2503.19786). One block computes, for every family::

    h = n_in(x);  q, k, v = split(h Wq + bq), split(h Wk + bk), split(h Wv + bv)
    q, k = n_q(q), n_k(k)                                        # Qwen3, Gemma 3
    q, k = rope(q), rope(k)                                      # rotate-half layout
    a = softmax(cap(s * q k^T) + masking) v Wo  (+ bo)            # GQA: K <= H heads
    x = x + post(a)                                              # post = n_post (Gemma 2/3)
    x = x + post_ff(mlp(n_ff(x)))                                # SwiGLU / GeGLU / MoE

with the family switches of :class:`DecoderConfig`: RMSNorm ``x rsqrt(mean x^2 + eps) w``
(Gemma: ``(1 + w)``, computed in float32), embeddings scaled by ``sqrt(D)`` (Gemma),
``s = query_pre_attn_scalar^-1/2`` (Gemma 2/3, else ``hd^-1/2``), soft-capping
``cap(z) = c tanh(z / c)`` of the attention scores and of the final logits (Gemma 2),
sliding-window layers (a key at index ``j`` is visible from query ``i`` iff
``i - W < j <= i``; Mistral, Qwen2, Gemma 2/3 alternating via ``layer_types``), Gemma 3's
local RoPE base on sliding layers, and RoPE scaling (``linear``, ``llama3``, ``dynamic``).

Mixture of experts (Shazeer et al., arXiv 1701.06538): ``p = softmax(h Wr)``, the top-k
experts per token (weights renormalised when ``norm_topk_prob``), each a SwiGLU MLP
with 3-d kernels ``[E, D, F]`` / ``[E, F, D]``; tokens are sorted by expert and
multiplied with :func:`jax.lax.ragged_dot` (grouped GEMM).

Parameters (Flax ``[in, out]`` kernels; bracketed leaves per family)::

    embed_tokens/embedding                                   [V, D]
    layers/layer_{i}/input_norm/scale                        [D]
    layers/layer_{i}/attention/{q,k,v,o}_proj/kernel[, bias]  [D, H hd], [D, K hd], [H hd, D]
    layers/layer_{i}/attention/{q_norm,k_norm}/scale         [hd]   (Qwen3, Gemma 3)
    layers/layer_{i}/post_attention_norm/scale               [D]
    layers/layer_{i}/{pre,post}_feedforward_norm/scale       [D]    (Gemma 2/3)
    layers/layer_{i}/mlp/{gate,up}_proj/kernel               [D, F]
    layers/layer_{i}/mlp/down_proj/kernel                    [F, D]
    layers/layer_{i}/mlp/router/kernel                       [D, E] (MoE layers, instead)
    layers/layer_{i}/mlp/experts/{gate,up}_proj/kernel       [E, D, F]
    layers/layer_{i}/mlp/experts/down_proj/kernel            [E, F, D]
    norm/scale                                               [D]
    lm_head/kernel                                           [D, V] (untied only)

``post_attention_norm`` keeps the Hugging Face meaning of its family: the pre-MLP norm
in Llama-style blocks, the norm of the attention output in Gemma 2/3 (whose pre-MLP
norm is ``pre_feedforward_norm``).

Model-owned slots (methods put them in the tree, the forward honours them): a layer may
hold ``attention_adapter`` / ``output_adapter`` ``{down: {kernel, bias}, up: {kernel,
bias}}`` (Houlsby et al., arXiv 1902.00751), applied with
:func:`lowrank_jax.models.layers.bottleneck_adapter` to the attention / MLP output just
before its residual add, and ``prefix = {"key", "value"}`` of shape ``[P, K, hd]`` (or
``[B, P, K, hd]``): keys/values prepended to that layer's own, always attended, stored
after RoPE (as peft's ``past_key_values``), so positions are not shifted.

Every projection multiplies through :func:`lowrank_jax.dot`, so lazy weights (LoRA,
NF4, ...) stay factored. Hugging Face folders are read and written by
:mod:`lowrank_jax.models.hf_decoder`, with one table per family in
:mod:`lowrank_jax.models.families`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import lazy, ops, validate
from lowrank_jax.models import families, layers
from lowrank_jax.models import slots as slots_lib
from lowrank_jax.models.attention import AttentionImpl

__all__ = [
  "FAMILIES",
  "RopeScaling",
  "DecoderConfig",
  "init_decoder",
  "decoder_forward",
  "decoder_hidden",
  "decoder_logits",
  "decoder_param_count",
  "param_shapes",
  "default_positions",
  "rope",
  "rope_angles",
  "rope_inv_freq",
  "slots",
]

PyTree = Any
FAMILIES = families.FAMILY_NAMES
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("linear", "dynamic", "llama3")
_ACT = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": layers.gelu,
        "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_new": functools.partial(jax.nn.gelu, approximate=True), "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (Hugging Face ``rope_parameters`` / ``rope_scaling``).

  * ``linear`` (Chen et al., arXiv 2306.15595): every frequency divided by ``factor``.
  * ``llama3``: wavelengths above ``original_max_position_embeddings / low_freq_factor``
    divided by ``factor``, below ``.../high_freq_factor`` kept, smoothly interpolated between.
  * ``dynamic`` (NTK-aware): the base becomes ``theta (f L / L0 - (f - 1))^(hd/(hd-2))``
    with ``L = max(max position + 1, L0)``, ``L0 = max_position_embeddings``. Computed
    from the positions inside the traced forward (no shape depends on it); equal to
    Hugging Face's on any single call of a fresh model (theirs also remembers the longest
    length seen so far across calls).
  """
  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: Optional[int] = None

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"unsupported RoPE scaling type {self.rope_type!r}; supported: {ROPE_TYPES} "
                       f"(yarn and longrope are not implemented)")
    if not self.factor > 0:
      raise ValueError(f"RoPE scaling factor must be positive, got {self.factor}")
    if self.rope_type == "llama3" and self.original_max_position_embeddings is None:
      raise ValueError("llama3 RoPE scaling needs original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a decoder (frozen, hashable: a static ``jit`` argument).

  ``num_kv_heads`` / ``head_dim`` given as ``None`` become ``num_heads`` /
  ``hidden_size // num_heads``. ``layer_types=None`` means every layer is
  ``"sliding_attention"`` when ``sliding_window`` is set, else ``"full_attention"``.
  MoE: ``num_experts > 0`` makes the layers in ``moe_layers`` (``None``: all) sparse,
  with ``moe_intermediate_size`` (default ``intermediate_size``) per expert.
  Use :meth:`from_hf` for a Hugging Face ``config.json``.
  """
  family: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 2048
  intermediate_size: int = 5632
  num_layers: int = 22
  num_heads: int = 32
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  max_seq_len: int = 2048
  init_std: float = 0.02
  hidden_act: str = "silu"
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  norm_plus_one: bool = False
  scale_embeddings: bool = False
  sandwich_norms: bool = False
  sliding_window: Optional[int] = None
  layer_types: Optional[tuple[str, ...]] = None
  query_pre_attn_scalar: Optional[float] = None
  attn_logit_softcapping: Optional[float] = None
  final_logit_softcapping: Optional[float] = None
  rope_local_theta: Optional[float] = None
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: Optional[int] = None
  norm_topk_prob: bool = True
  moe_layers: Optional[tuple[int, ...]] = None
  attention_dropout: float = 0.0
  adapter_activation: str = "relu"
  bos_token_id: Any = None
  eos_token_id: Any = None
  pad_token_id: Any = None

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    if self.family not in FAMILIES:
      raise ValueError(f"unknown decoder family {self.family!r}; supported: {FAMILIES}")
    if self.num_kv_heads is None:
      set_("num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
      set_("head_dim", self.hidden_size // self.num_heads)
    for name in ("layer_types", "moe_layers", "eos_token_id"):
      v = getattr(self, name)
      if isinstance(v, list):
        set_(name, tuple(v))
    if isinstance(self.rope_scaling, Mapping):
      set_("rope_scaling", RopeScaling(**self.rope_scaling))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
    if self.hidden_act not in _ACT:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {sorted(_ACT)}")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
      bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
      if bad:
        raise ValueError(f"unsupported layer types {bad}; supported: {LAYER_TYPES}")
    if any(self.layer_type(i) == "sliding_attention" for i in range(self.num_layers)) and (
        self.sliding_window is None or self.sliding_window < 1):
      raise ValueError(f"sliding_attention layers need a positive sliding_window, got {self.sliding_window}")
    if self.num_experts:
      if not 0 < self.num_experts_per_tok <= self.num_experts:
        raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, num_experts="
                         f"{self.num_experts}]")
      if self.moe_layers is not None and any(not 0 <= i < self.num_layers for i in self.moe_layers):
        raise ValueError(f"moe_layers {self.moe_layers} out of range for {self.num_layers} layers")
    elif self.moe_layers:
      raise ValueError("moe_layers given but num_experts is 0")

  # ------------------------------------------------------------------ derived
  @property
  def kv_heads(self) -> int:
    """Alias of ``num_kv_heads`` (the old ``LlamaConfig`` property)."""
    return self.num_kv_heads

  @property
  def dim_head(self) -> int:
    """Alias of ``head_dim`` (the old ``LlamaConfig`` property)."""
    return self.head_dim

  @property
  def expert_size(self) -> int:
    return self.intermediate_size if self.moe_intermediate_size is None else self.moe_intermediate_size

  @property
  def attention_scale(self) -> float:
    """``query_pre_attn_scalar^-1/2`` (Gemma 2/3) or ``head_dim^-1/2``."""
    return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def layer_type(self, i: int) -> str:
    if self.layer_types is not None:
      return self.layer_types[i]
    return "full_attention" if self.sliding_window is None else "sliding_attention"

  def is_moe_layer(self, i: int) -> bool:
    return self.num_experts > 0 and (self.moe_layers is None or i in self.moe_layers)

  # ------------------------------------------------------------------ Hugging Face
  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any]) -> "DecoderConfig":
    """The config of a Hugging Face ``config.json`` dict (its ``model_type`` picks the family)."""
    return cls(**families.config_kwargs(hf_config))

  def to_hf(self) -> dict:
    """A ``config.json`` dict that ``transformers`` loads as this architecture."""
    return families.hf_config(self)

  # ------------------------------------------------------------------ presets
  @classmethod
  def tiny(cls, **kw) -> "DecoderConfig":
    """A test-sized Llama (vocab 256, D=64, 2 layers, 4 heads, 2 KV heads)."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2,
                num_heads=4, num_kv_heads=2, max_seq_len=128)
    return cls(**{**base, **kw})

  @classmethod
  def llama_1b(cls, **kw) -> "DecoderConfig":
    """TinyLlama-1.1B's shape: V=32000, D=2048, F=5632, 22 layers, 32 heads, 4 KV heads."""
    base = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                num_heads=32, num_kv_heads=4, max_seq_len=2048)
    return cls(**{**base, **kw})


# --------------------------------------------------------------------------- parameters


def _layer_spec(c: DecoderConfig, i: int) -> dict:
  d, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
  norm = ("zeros" if c.norm_plus_one else "ones", (d,))

  def proj(d_in, d_out, bias):
    p = {"kernel": ("normal", (d_in, d_out))}
    if bias:
      p["bias"] = ("zeros", (d_out,))
    return p

  att = {"q_proj": proj(d, c.num_heads * hd, c.qkv_bias), "k_proj": proj(d, c.num_kv_heads * hd, c.qkv_bias),
         "v_proj": proj(d, c.num_kv_heads * hd, c.qkv_bias), "o_proj": proj(c.num_heads * hd, d, c.o_bias)}
  if c.qk_norm:
    att["q_norm"] = {"scale": ("zeros" if c.norm_plus_one else "ones", (hd,))}
    att["k_norm"] = {"scale": ("zeros" if c.norm_plus_one else "ones", (hd,))}
  if c.is_moe_layer(i):
    e, fe = c.num_experts, c.expert_size
    mlp = {"router": {"kernel": ("normal", (d, e))},
           "experts": {"gate_proj": {"kernel": ("normal", (e, d, fe))},
                       "up_proj": {"kernel": ("normal", (e, d, fe))},
                       "down_proj": {"kernel": ("normal", (e, fe, d))}}}
  else:
    mlp = {"gate_proj": proj(d, f, c.mlp_bias), "up_proj": proj(d, f, c.mlp_bias),
           "down_proj": proj(f, d, c.mlp_bias)}
  spec = {"input_norm": {"scale": norm}, "attention": att, "post_attention_norm": {"scale": norm},
          "mlp": mlp}
  if c.sandwich_norms:
    spec["pre_feedforward_norm"] = {"scale": norm}
    spec["post_feedforward_norm"] = {"scale": norm}
  return spec


def _outer_spec(c: DecoderConfig) -> dict:
  spec = {"embed_tokens": {"embedding": ("normal", (c.vocab_size, c.hidden_size))},
          "norm": {"scale": ("zeros" if c.norm_plus_one else "ones", (c.hidden_size,))}}
  if not c.tie_word_embeddings:
    spec["lm_head"] = {"kernel": ("normal", (c.hidden_size, c.vocab_size))}
  return spec


def _spec(c: DecoderConfig) -> dict:
  spec = _outer_spec(c)
  spec["layers"] = {f"layer_{i}": _layer_spec(c, i) for i in range(c.num_layers)}
  return spec


def _is_spec(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)


def param_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of every parameter of ``config`` (the layout in the module docstring)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(_spec(config), is_leaf=_is_spec)
  return {"/".join(str(k.key) for k in path): tuple(leaf[1]) for path, leaf in leaves}


def decoder_param_count(config: DecoderConfig) -> int:
  """Number of parameters (sum of :func:`param_shapes`)."""
  return sum(math.prod(s) for s in param_shapes(config).values())


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_part(key, config: DecoderConfig, dtype, part: int) -> PyTree:
  spec = _outer_spec(config) if part < 0 else _layer_spec(config, part)
  return layers.init_from_spec(key, spec, dtype, std=config.init_std)


def init_decoder(key: jax.Array, config: DecoderConfig, dtype=jnp.float32) -> PyTree:
  """Random parameters: matrices ``~ N(0, init_std^2)`` (drawn in float32), biases 0, norm
  scales 1 (0 for Gemma's ``(1 + w)`` norms).

  Layers of one kind (dense or MoE) share one compiled initialiser, called with
  ``fold_in(key, i)``; ``jax.eval_shape(init_decoder, ...)`` gives the abstract tree.
  """
  dtype = jnp.dtype(dtype)
  params = dict(_init_part(jax.random.fold_in(key, config.num_layers), config, dtype, -1))
  kinds: dict[bool, int] = {}
  out = {}
  for i in range(config.num_layers):
    first = kinds.setdefault(config.is_moe_layer(i), i)  # same spec -> same compiled program
    out[f"layer_{i}"] = _init_part(jax.random.fold_in(key, i), config, dtype, first)
  params["layers"] = out
  return params


# --------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None) -> np.ndarray:
  """Static inverse frequencies ``theta^(-2j/hd)``, ``j < hd/2`` (float32), with
  ``linear`` / ``llama3`` scaling applied (``dynamic`` is applied in the forward)."""
  inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
  inv = inv.astype(np.float32)
  if scaling is None or scaling.rope_type == "dynamic":
    return inv
  if scaling.rope_type == "linear":
    return (inv / np.float32(scaling.factor)).astype(np.float32)
  old = scaling.original_max_position_embeddings
  low_wl, high_wl = old / scaling.low_freq_factor, old / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv
  out = np.where(wavelen > low_wl, inv / scaling.factor, inv)
  smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * out / scaling.factor + smooth * out
  medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
  return np.where(medium, smoothed, out).astype(np.float32)


def rope_angles(positions: jax.Array, head_dim: int, theta: float = 10000.0,
                scaling: Optional[RopeScaling] = None, max_seq_len: Optional[int] = None
                ) -> tuple[jax.Array, jax.Array]:
  """``(cos, sin)`` of ``pos * inv_freq_j``, each ``[..., T, hd/2]`` in float32.

  ``dynamic`` scaling needs ``max_seq_len`` (``max_position_embeddings``) and uses the
  largest position in ``positions`` (see :class:`RopeScaling`).
  """
  pos = jnp.asarray(positions, jnp.float32)
  if scaling is not None and scaling.rope_type == "dynamic":
    if max_seq_len is None:
      raise ValueError("dynamic RoPE scaling needs max_seq_len (max_position_embeddings)")
    f, l0 = scaling.factor, float(max_seq_len)
    seq = jnp.maximum(jnp.max(pos) + 1.0, l0)
    base = theta * (f * seq / l0 - (f - 1.0)) ** (head_dim / (head_dim - 2))
    inv = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  else:
    inv = jnp.asarray(rope_inv_freq(head_dim, theta, scaling))
  ang = pos[..., None] * inv
  return jnp.cos(ang), jnp.sin(ang)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotary embedding (Su et al., arXiv 2104.09864), "rotate half" layout: pairs
  ``(x_j, x_{j + hd/2})`` rotated by ``a_j``: ``(x_j cos - x_{j+hd/2} sin, x_j sin + x_{j+hd/2} cos)``.

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


# --------------------------------------------------------------------------- forward pieces


def _rms_norm(p: Mapping, x: jax.Array, c: DecoderConfig) -> jax.Array:
  """RMSNorm as Hugging Face computes it: statistics in float32; Llama-style
  ``w * x_hat.astype(dtype)``, Gemma-style ``(x_hat * (1 + w)).astype(dtype)`` in float32."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + c.rms_norm_eps)
  w = lazy.materialize(p["scale"])
  if c.norm_plus_one:
    return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
  return w.astype(x.dtype) * y.astype(x.dtype)


def default_positions(input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                      segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """Per-sequence positions ``[B, T]``: restarting at 0 at every change of segment id,
  else counting real tokens (``cumsum(mask) - 1``, so left padding does not shift them),
  else ``0..T-1``."""
  b, t = input_ids.shape
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    change = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(change, idx, 0), axis=1)
    return idx - start
  if attention_mask is not None:
    return jnp.maximum(jnp.cumsum(jnp.asarray(attention_mask, jnp.int32), axis=1) - 1, 0)
  return idx


def _masks(c: DecoderConfig, b: int, t: int, attention_mask, segment_ids) -> dict[str, jax.Array]:
  """``{layer type: [B, 1, T, T] bool}``: causal by index, padding, segments, windows."""
  q = jnp.arange(t)[:, None]
  k = jnp.arange(t)[None, :]
  mask = jnp.broadcast_to(k <= q, (b, t, t))
  valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    mask = mask & (seg[:, :, None] == seg[:, None, :])
    valid = (seg != 0) if valid is None else valid & (seg != 0)
  if valid is not None:
    mask = mask & valid[:, None, :]
  out = {}
  for kind in {c.layer_type(i) for i in range(c.num_layers)}:
    m = mask if kind == "full_attention" else mask & (k > q - c.sliding_window)
    out[kind] = m[:, None]
  return out


def _softcap_attention(q, k, v, mask, scale: float, cap: float, rate: float, rng) -> jax.Array:
  """``softmax(cap tanh(s q k^T / cap) + masking) v`` with GQA (Gemma 2's attention)."""
  b, t, h, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, h // kh, d)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(ops.stat_dtype(q.dtype)) * scale
  s = cap * jnp.tanh(s / cap)
  m = jnp.broadcast_to(mask, (b, h, t, k.shape[1])).reshape(b, kh, h // kh, t, -1)
  s = jnp.where(m, s, jnp.finfo(s.dtype).min)
  p = ops.dropout(jax.nn.softmax(s, axis=-1).astype(q.dtype), rate, rng)
  return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, h, d)


def _prefix(p: Mapping, name: str, b: int, c: DecoderConfig, dtype) -> jax.Array:
  x = jnp.asarray(lazy.materialize(p[name]))
  if x.ndim == 3:
    x = jnp.broadcast_to(x[None], (b,) + x.shape)
  if x.ndim != 4 or x.shape[0] != b or x.shape[2:] != (c.num_kv_heads, c.head_dim):
    raise ValueError(f"prefix {name} of shape {x.shape} does not fit [P, {c.num_kv_heads}, {c.head_dim}] "
                     f"or [{b}, P, {c.num_kv_heads}, {c.head_dim}]")
  return x.astype(dtype)


def _attention(p: Mapping, c: DecoderConfig, i: int, h, rope_tables, masks, rng, impl) -> jax.Array:
  att = p["attention"]
  q = layers.split_heads(layers.dense(att["q_proj"], h), c.num_heads)
  k = layers.split_heads(layers.dense(att["k_proj"], h), c.num_kv_heads)
  v = layers.split_heads(layers.dense(att["v_proj"], h), c.num_kv_heads)
  if c.qk_norm:
    q, k = _rms_norm(att["q_norm"], q, c), _rms_norm(att["k_norm"], k, c)
  kind = c.layer_type(i)
  cos, sin = rope_tables[kind]
  q, k = rope(q, cos, sin), rope(k, cos, sin)
  mask = masks[kind]
  if "prefix" in p:
    b, t = h.shape[:2]
    pk, pv = _prefix(p["prefix"], "key", b, c, k.dtype), _prefix(p["prefix"], "value", b, c, v.dtype)
    if pk.shape != pv.shape:
      raise ValueError(f"prefix keys {pk.shape} and values {pv.shape} differ")
    k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
    mask = jnp.concatenate([jnp.ones((b, 1, t, pk.shape[1]), bool), jnp.broadcast_to(mask, (b, 1, t, t))],
                           axis=-1)
  rate = c.attention_dropout
  if c.attn_logit_softcapping:
    ctx = _softcap_attention(q, k, v, mask, c.attention_scale, float(c.attn_logit_softcapping), rate, rng)
  else:
    mult = c.attention_scale * math.sqrt(c.head_dim)  # attention() divides by sqrt(hd)
    if mult != 1.0:
      q = q * jnp.asarray(mult, q.dtype)
    ctx = layers.attention(q, k, v, mask=mask, dropout_rate=rate, rng=rng, impl=impl)
  return layers.dense(att["o_proj"], layers.merge_heads(ctx))


def _expert_matmul(x: jax.Array, w, group_sizes: jax.Array, what: str) -> jax.Array:
  """``x_n @ w[e(n)]`` for rows sorted by expert (``group_sizes[e]`` rows each).

  ``w`` is ``[E, in, out]``: an array (:func:`jax.lax.ragged_dot`), a lazy weight with a
  ``ragged_matmul(x, group_sizes)`` method (kept factored), or any other lazy weight
  (materialised, e.g. LoRA on the flattened expert stack).
  """
  if lazy.is_lazy(w):
    ragged = getattr(w, "ragged_matmul", None)
    if ragged is not None:
      return ragged(x, group_sizes)
    w = w.materialize()
  if w.ndim != 3 or w.shape[1] != x.shape[-1]:
    raise ValueError(f"{what}: expert kernel of shape {w.shape} does not fit [E, {x.shape[-1]}, out]")
  return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)


def _moe(p: Mapping, c: DecoderConfig, h: jax.Array, act) -> jax.Array:
  b, t, d = h.shape
  x = h.reshape(b * t, d)
  logits = layers.dense(p["router"], x)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top_w, top_i = jax.lax.top_k(probs, c.num_experts_per_tok)
  if c.norm_topk_prob:
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
  flat = top_i.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  token = order // c.num_experts_per_tok
  sizes = jnp.bincount(flat, length=c.num_experts).astype(jnp.int32)
  xs = x[token]
  ex = p["experts"]
  g = _expert_matmul(xs, ex["gate_proj"]["kernel"], sizes, "experts/gate_proj")
  u = _expert_matmul(xs, ex["up_proj"]["kernel"], sizes, "experts/up_proj")
  y = _expert_matmul(act(g) * u, ex["down_proj"]["kernel"], sizes, "experts/down_proj")
  y = (y.astype(jnp.float32) * top_w.reshape(-1)[order][:, None]).astype(x.dtype)
  return jnp.zeros_like(x).at[token].add(y).reshape(b, t, d)


def _mlp(p: Mapping, c: DecoderConfig, i: int, h: jax.Array) -> jax.Array:
  act = _ACT[c.hidden_act]
  if c.is_moe_layer(i):
    return _moe(p, c, h, act)
  return layers.dense(p["down_proj"], act(layers.dense(p["gate_proj"], h)) * layers.dense(p["up_proj"], h))


def _block(p: Mapping, c: DecoderConfig, i: int, x, rope_tables, masks, rng, impl):
  a = _attention(p, c, i, _rms_norm(p["input_norm"], x, c), rope_tables, masks, rng, impl)
  if c.sandwich_norms:
    a = _rms_norm(p["post_attention_norm"], a, c)
  if "attention_adapter" in p:
    a = layers.bottleneck_adapter(p["attention_adapter"], a, c.adapter_activation)
  x = x + a
  h = _rms_norm(p["pre_feedforward_norm"] if c.sandwich_norms else p["post_attention_norm"], x, c)
  m = _mlp(p["mlp"], c, i, h)
  if c.sandwich_norms:
    m = _rms_norm(p["post_feedforward_norm"], m, c)
  if "output_adapter" in p:
    m = layers.bottleneck_adapter(p["output_adapter"], m, c.adapter_activation)
  return x + m


def decoder_hidden(params: PyTree, config: DecoderConfig, input_ids: jax.Array, *,
                   attention_mask: Optional[jax.Array] = None,
                   segment_ids: Optional[jax.Array] = None,
                   positions: Optional[jax.Array] = None, rng: Optional[jax.Array] = None,
                   remat: bool = False, attention_impl: AttentionImpl = "auto") -> jax.Array:
  """Final-norm hidden states ``[B, T, D]`` (arguments as :func:`decoder_forward`)."""
  c = config
  ids = jnp.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
  validate.check_token_ids(input_ids, c.vocab_size)  # concrete: now; traced: under checkify
  b, t = ids.shape
  for name, arr in (("attention_mask", attention_mask), ("segment_ids", segment_ids)):
    if arr is not None and tuple(jnp.shape(arr)) != (b, t):
      raise ValueError(f"{name} of shape {tuple(jnp.shape(arr))} does not match input_ids {(b, t)}")
  if positions is None:
    positions = default_positions(ids, attention_mask, segment_ids)
  positions = jnp.broadcast_to(jnp.asarray(positions), (b, t))
  kinds = {c.layer_type(i) for i in range(c.num_layers)}
  tables = {}
  for kind in kinds:
    local = kind == "sliding_attention" and c.rope_local_theta is not None
    tables[kind] = rope_angles(positions, c.head_dim, c.rope_local_theta if local else c.rope_theta,
                               None if local else c.rope_scaling, c.max_seq_len)
  masks = _masks(c, b, t, attention_mask, segment_ids)
  x = layers.embed(params["embed_tokens"]["embedding"], ids)
  if c.scale_embeddings:
    x = x * jnp.asarray(math.sqrt(c.hidden_size), x.dtype)
  block = jax.checkpoint(_block, static_argnums=(1, 2, 7)) if remat else _block
  for i in range(c.num_layers):
    key = None if rng is None else jax.random.fold_in(rng, i)
    x = block(params["layers"][f"layer_{i}"], c, i, x, tables, masks, key, attention_impl)
  return _rms_norm(params["norm"], x, c)


def decoder_logits(params: PyTree, config: DecoderConfig, hidden: jax.Array) -> jax.Array:
  """LM-head logits of hidden states, in float32, with Gemma 2's final soft-capping."""
  if config.tie_word_embeddings:
    emb = lazy.materialize(params["embed_tokens"]["embedding"])
    logits = jnp.einsum("...d,vd->...v", hidden, emb.astype(hidden.dtype))
  else:
    logits = layers.dense(params["lm_head"], hidden)
  logits = logits.astype(jnp.float32)
  cap = config.final_logit_softcapping
  if cap:
    logits = cap * jnp.tanh(logits / cap)
  return logits


def decoder_forward(params: PyTree, config: DecoderConfig, input_ids: jax.Array, *,
                    attention_mask: Optional[jax.Array] = None,
                    segment_ids: Optional[jax.Array] = None,
                    positions: Optional[jax.Array] = None, rng: Optional[jax.Array] = None,
                    remat: bool = False, attention_impl: AttentionImpl = "auto") -> jax.Array:
  """Next-token logits ``[B, T, V]`` (float32) of a causal decoder.

  Args:
    params: parameter tree (may hold lazy weights and the model-owned slots).
    config: the :class:`DecoderConfig`.
    input_ids: ``[B, T]`` int token ids.
    attention_mask: ``[B, T]``, 1 = token, 0 = padding (left or right).
    segment_ids: ``[B, T]`` ints for packed sequences: a token attends to earlier tokens
      of its own segment only; 0 marks padding.
    positions: RoPE positions ``[T]`` or ``[B, T]``; default :func:`default_positions`
      (per sequence, restarting in each packed segment).
    rng: dropout key (attention dropout, when ``config.attention_dropout > 0``).
    remat: recompute each block in the backward pass (``jax.checkpoint``).
    attention_impl: see :func:`lowrank_jax.models.layers.attention` (not used by the
      soft-capped attention of Gemma 2, which is an einsum with autodiff).
  """
  h = decoder_hidden(params, config, input_ids, attention_mask=attention_mask,
                     segment_ids=segment_ids, positions=positions, rng=rng, remat=remat,
                     attention_impl=attention_impl)
  return decoder_logits(params, config, h)


# --------------------------------------------------------------------------- slots


def slots(config: DecoderConfig, *, root: Optional[str] = None) -> slots_lib.ModelSlots:
  """Where this decoder's slots are (:func:`lowrank_jax.models.slots.decoder_slots`: layers
  ``layers/layer_{i}``, adapters after ``attention/o_proj`` and ``mlp/(experts/)down_proj``,
  prefixes of ``[P, num_kv_heads, head_dim]``), for the adapter and prefix methods."""
  return slots_lib.decoder_slots(config, root=root)
