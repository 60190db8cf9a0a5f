"""The machinery of the decoder family tables (:mod:`lowrank_jax.models.families`): the
:class:`Family` record, the shared key and module tables, the registry and the functions
that apply a family's table both ways.

The layout of a family is described in :mod:`lowrank_jax.models.families`.
Nothing here imports the model: the functions take and return keyword dicts and any
object with the ``DecoderConfig`` attributes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = [
  "REQUIRED",
  "Family",
  "TensorEntry",
  "register",
  "registered",
  "get",
  "family_for",
  "config_kwargs",
  "hf_config",
  "tensor_table",
  "rope_from_hf",
  "rope_to_hf",
  "rope_kwargs",
  "rope_keys",
]

REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """One parameter leaf and the Hugging Face tensor(s) it is stored as.

  ``hf`` holds one name, or one per expert for a 3-d ``[E, ...]`` leaf (stacked on axis
  0); ``transpose`` swaps the last two axes (``kernel`` leaves).
  """
  path: str
  shape: tuple[int, ...]
  hf: tuple[str, ...]
  transpose: bool

  @property
  def stacked(self) -> bool:
    return len(self.shape) == 3

  def hf_shape(self) -> tuple[int, ...]:
    """Shape of each stored tensor."""
    s = self.shape[1:] if self.stacked else self.shape
    return tuple(reversed(s)) if self.transpose else tuple(s)


@dataclasses.dataclass(frozen=True)
class Family:
  """The Hugging Face mapping of one decoder family (see the module docstring)."""
  name: str
  model_types: tuple[str, ...]
  architecture: str
  keys: tuple[tuple[str, str, Any], ...]
  fixed: Mapping[str, Any]
  modules: Mapping[str, str]
  read: Callable[[Mapping[str, Any]], dict]
  write: Callable[[Any], dict]
  ignore: tuple[str, ...] = (r"\.rotary_emb\.inv_freq$",)

  @property
  def model_type(self) -> str:
    return self.model_types[0]


# --------------------------------------------------------------------------- shared pieces

COMMON_KEYS: tuple[tuple[str, str, Any], ...] = (
  ("vocab_size", "vocab_size", REQUIRED),
  ("hidden_size", "hidden_size", REQUIRED),
  ("intermediate_size", "intermediate_size", REQUIRED),
  ("num_hidden_layers", "num_layers", REQUIRED),
  ("num_attention_heads", "num_heads", REQUIRED),
  ("num_key_value_heads", "num_kv_heads", None),
  ("head_dim", "head_dim", None),
  ("rms_norm_eps", "rms_norm_eps", 1e-6),
  ("max_position_embeddings", "max_seq_len", 2048),
  ("initializer_range", "init_std", 0.02),
  ("attention_dropout", "attention_dropout", 0.0),
  ("bos_token_id", "bos_token_id", None),
  ("eos_token_id", "eos_token_id", None),
  ("pad_token_id", "pad_token_id", None),
)

# Llama-style module names; families override or add entries.
LLAMA_MODULES: dict[str, str] = {
  "embed_tokens": "model.embed_tokens",
  "norm": "model.norm",
  "lm_head": "lm_head",
  "layers/layer_{i}/input_norm": "model.layers.{i}.input_layernorm",
  "layers/layer_{i}/post_attention_norm": "model.layers.{i}.post_attention_layernorm",
  "layers/layer_{i}/attention/q_proj": "model.layers.{i}.self_attn.q_proj",
  "layers/layer_{i}/attention/k_proj": "model.layers.{i}.self_attn.k_proj",
  "layers/layer_{i}/attention/v_proj": "model.layers.{i}.self_attn.v_proj",
  "layers/layer_{i}/attention/o_proj": "model.layers.{i}.self_attn.o_proj",
  "layers/layer_{i}/mlp/gate_proj": "model.layers.{i}.mlp.gate_proj",
  "layers/layer_{i}/mlp/up_proj": "model.layers.{i}.mlp.up_proj",
  "layers/layer_{i}/mlp/down_proj": "model.layers.{i}.mlp.down_proj",
}
QK_NORM_MODULES = {
  "layers/layer_{i}/attention/q_norm": "model.layers.{i}.self_attn.q_norm",
  "layers/layer_{i}/attention/k_norm": "model.layers.{i}.self_attn.k_norm",
}


def rope_from_hf(hf: Mapping[str, Any], default_theta: float, layer_type: Optional[str] = None
                 ) -> tuple[float, Optional[dict]]:
  """``(theta, scaling kwargs or None)`` from ``rope_parameters`` (transformers 5, possibly
  nested by layer type) or the older ``rope_theta`` + ``rope_scaling`` keys."""
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping) and layer_type is not None and isinstance(params.get(layer_type), Mapping):
    params = params[layer_type]
  elif isinstance(params, Mapping) and any(isinstance(v, Mapping) for v in params.values()):
    raise ValueError(f"config.json: rope_parameters is nested by layer type ({sorted(params)}) but this "
                     f"family has one RoPE")
  legacy = hf.get("rope_scaling")
  if not params:
    params = dict(legacy or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
  kind = params.get("rope_type", params.get("type", "default"))
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise NotImplementedError(f"config.json: partial_rotary_factor={params['partial_rotary_factor']} "
                              f"is not supported")
  if kind in (None, "default"):
    return theta, None
  out = {"rope_type": kind, "factor": float(params.get("factor", 1.0))}
  if kind == "llama3":
    out.update(low_freq_factor=float(params["low_freq_factor"]),
               high_freq_factor=float(params["high_freq_factor"]),
               original_max_position_embeddings=int(params.get(
                   "original_max_position_embeddings", hf.get("max_position_embeddings"))))
  return theta, out


def rope_to_hf(theta: float, scaling) -> dict:
  """A ``rope_parameters`` dict (transformers 5 layout) for ``theta`` and a ``RopeScaling``."""
  out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": "default"}
  if scaling is not None:
    out.update(rope_type=scaling.rope_type, factor=float(scaling.factor))
    if scaling.rope_type == "llama3":
      out.update(low_freq_factor=float(scaling.low_freq_factor),
                 high_freq_factor=float(scaling.high_freq_factor),
                 original_max_position_embeddings=int(scaling.original_max_position_embeddings))
  return out


def rope_kwargs(hf: Mapping[str, Any], default_theta: float = 10000.0) -> dict:
  """``{"rope_theta", "rope_scaling"}`` kwargs of a family with one RoPE."""
  theta, scaling = rope_from_hf(hf, default_theta)
  return {"rope_theta": theta, "rope_scaling": scaling}


def rope_keys(c) -> dict:
  """The ``config.json`` RoPE keys of a family with one RoPE (``rope_parameters``, and
  ``rope_theta`` for readers older than transformers 5)."""
  return {"rope_parameters": rope_to_hf(c.rope_theta, c.rope_scaling), "rope_theta": c.rope_theta}


def sliding_layers_from_hf(hf: Mapping[str, Any], n: int, default_pattern: Optional[Callable[[int], bool]]
                           ) -> dict:
  """``{"layer_types", "sliding_window"}`` kwargs from ``layer_types`` or, failing that,
  ``use_sliding_window`` + ``max_window_layers`` (Qwen2/3) or a family pattern."""
  window = hf.get("sliding_window")
  types = hf.get("layer_types")
  if types is None:
    if "use_sliding_window" in hf:
      use = bool(hf.get("use_sliding_window")) and window is not None
      start = int(hf.get("max_window_layers", 0) or 0)
      types = ["sliding_attention" if use and i >= start else "full_attention" for i in range(n)]
    elif default_pattern is not None:
      types = ["sliding_attention" if default_pattern(i) else "full_attention" for i in range(n)]
    else:
      types = ["full_attention"] * n
  types = tuple(types)
  if "sliding_attention" not in types:
    return {"layer_types": None, "sliding_window": None}
  return {"layer_types": types, "sliding_window": None if window is None else int(window)}


def layer_types_to_hf(c) -> dict:
  types = [c.layer_type(i) for i in range(c.num_layers)]
  return {"layer_types": types, "sliding_window": c.sliding_window}


def _bias_read(hf: Mapping[str, Any]) -> dict:
  b = bool(hf.get("attention_bias", False))
  return {"qkv_bias": b, "o_bias": b}


# --------------------------------------------------------------------------- registry

_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  _FAMILIES[family.name] = family
  return family


def registered() -> tuple[Family, ...]:
  """Every registered family, in registration order."""
  return tuple(_FAMILIES.values())


def get(name: str) -> Family:
  try:
    return _FAMILIES[name]
  except KeyError:
    raise ValueError(f"unknown decoder family {name!r}; supported: {sorted(_FAMILIES)}") from None


def family_for(hf: Mapping[str, Any]) -> Family:
  """The family of a ``config.json`` dict, by its ``model_type``."""
  mt = hf.get("model_type")
  for fam in _FAMILIES.values():
    if mt in fam.model_types:
      return fam
  hint = ""
  if mt == "gemma3" and "text_config" in hf:
    hint = " (a multimodal Gemma 3 folder: only the text-only gemma3_text checkpoints are supported)"
  raise ValueError(f"config.json: unsupported model_type {mt!r}{hint}; supported: "
                   f"{sorted(t for f in _FAMILIES.values() for t in f.model_types)}")


def config_kwargs(hf: Mapping[str, Any]) -> dict:
  """``DecoderConfig`` keyword arguments of a ``config.json`` dict."""
  fam = family_for(hf)
  kw: dict[str, Any] = {"family": fam.name}
  for key, field, default in fam.keys:
    if key in hf and hf[key] is not None:
      kw[field] = hf[key]
    elif default is REQUIRED:
      raise ValueError(f"config.json ({fam.model_type}) has no {key!r}")
    else:
      kw[field] = default
  kw.update(fam.fixed)
  kw.update(fam.read(hf))
  if hf.get("use_bidirectional_attention"):
    raise NotImplementedError("config.json: use_bidirectional_attention=True (an encoder) is not supported")
  return kw


def hf_config(c) -> dict:
  """A ``config.json`` dict of a ``DecoderConfig``; raises when the config uses a switch
  its family's ``config.json`` cannot express (checked by reading the dict back)."""
  fam = get(c.family)
  out: dict[str, Any] = {"model_type": fam.model_type, "architectures": [fam.architecture]}
  for key, field, _ in fam.keys:
    value = getattr(c, field)
    out[key] = list(value) if isinstance(value, tuple) else value
  out.update(fam.write(c))
  back = config_kwargs(out)
  diff = {}
  for f in dataclasses.fields(c):
    if f.name in _NOT_IN_HF:
      continue
    ours, theirs = getattr(c, f.name), back.get(f.name, f.default)
    if f.name == "rope_scaling":
      if not _same_rope(ours, theirs):
        diff[f.name] = (ours, theirs)
    elif _norm(ours) != _norm(theirs) and not (f.name == "layer_types" and _same_types(c, theirs)):
      diff[f.name] = (ours, theirs)
  if diff:
    raise ValueError(f"this config cannot be written as a {fam.model_type} config.json: "
                     + ", ".join(f"{k}={a!r} (would read back as {b!r})" for k, (a, b) in diff.items()))
  return out


_NOT_IN_HF = {"adapter_activation"}


def _same_types(c, types) -> bool:
  """``layer_types`` written out in full read back as ``None`` (all full) or the same tuple."""
  full = tuple(c.layer_type(i) for i in range(c.num_layers))
  return (types is None and set(full) == {"full_attention"}) or (types is not None and tuple(types) == full)


def _norm(v):
  if isinstance(v, list):
    return tuple(v)
  if isinstance(v, float) and v.is_integer():
    return int(v)
  return v


def _same_rope(ours, kw) -> bool:
  if ours is None or kw is None:
    return ours is None and kw is None
  return all(getattr(ours, k) == v for k, v in kw.items())


def tensor_table(c, shapes: Mapping[str, tuple[int, ...]]) -> list[TensorEntry]:
  """The :class:`TensorEntry` of every parameter path in ``shapes`` (``decoder.param_shapes``)."""
  fam = get(c.family)
  patterns = [(re.compile("^" + re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), hf)
              for ours, hf in fam.modules.items()]
  out = []
  for path, shape in shapes.items():
    module, _, leaf = path.rpartition("/")
    for rx, hf in patterns:
      m = rx.match(module)
      if m:
        break
    else:
      raise ValueError(f"family {fam.name}: no Hugging Face name for parameter {path!r}")
    suffix = "bias" if leaf == "bias" else "weight"
    name = hf.format(i=m.groupdict().get("i", ""), e="{e}") + "." + suffix
    if len(shape) == 3:
      names = tuple(name.format(e=e) for e in range(shape[0]))
    else:
      names = (name,)
    out.append(TensorEntry(path, tuple(shape), names, leaf == "kernel"))
  return out

