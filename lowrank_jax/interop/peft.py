"""Hugging Face PEFT adapter folders <-> ``(reparam, phi)``.

A PEFT adapter folder (``save_pretrained``) holds

* ``adapter_config.json``: the tuner's config (``peft_type``, ``r``, ``lora_alpha``,
  ``use_rslora``, ``use_dora``, ``target_modules``, ``rank_pattern``, ... and any number of
  other keys, which a loader must tolerate);
* ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), with tensors named
  ``base_model.model.<module path>.<param>``: ``lora_A.weight`` ``[r, in]``,
  ``lora_B.weight`` ``[out, r]``, for DoRA ``lora_magnitude_vector`` ``[out]`` (no
  ``.weight``), for AdaLoRA ``lora_A`` / ``lora_E`` / ``lora_B`` (no ``.weight``; after rank
  allocation only the kept triplets, listed by ``rank_pattern``), LoKr ``lokr_w1[_a|_b]`` /
  ``lokr_w2[_a|_b]``, LoHa ``hada_w{1,2}_{a,b}``, VeRA ``vera_lambda_b`` / ``vera_lambda_d``
  (+ ``base_model.vera_A`` / ``vera_B``), IA3 ``ia3_l``; trained biases as
  ``<module>[.base_layer].bias`` and ``modules_to_save`` as ``<module>.weight`` / ``.bias``.

Our ``phi`` leaf holds peft's tensors transposed under the same letters, at the tree path of
the adapted kernel: LoRA ``{"a": lora_A.T [in, r], "b": lora_B.T [r, out]}`` (+ ``"m"`` for
DoRA, the magnitude vector as is; ``{"a", "e", "b"}`` for AdaLoRA), LoKr ``{"w1": lokr_w1.T,
...}``, LoHa ``{"w1_a": hada_w1_a.T, ...}``, VeRA ``{"lambda_b", "lambda_d"}``, IA3
``{"l_out"}`` or ``{"l_in"}``; trained biases and ``modules_to_save`` are a chained
``full`` entry. Import records the registry config on the reparam (``Reparam.config``);
export reads it back, so no setting has to be repeated (and none can be forgotten). Module names map to tree paths by a user-supplied
function; the default, :func:`bert_module_to_path`, is the Hugging Face BERT layout
of :mod:`lowrank_jax.models.bert` (``encoder.layer.0.attention.self.query`` ->
``encoder/layer_0/attention/query/kernel``). GPT-2 style ``fan_in_fan_out`` adapters
need no special case here: peft stores the same ``A``/``B`` shapes and our kernels are
``[in, out]`` either way.

Decoder families (:mod:`lowrank_jax.models.decoder`) map with
:func:`decoder_module_to_path` / :func:`decoder_path_to_module`, derived from the family's
table in :mod:`lowrank_jax.models.families`. Mixture-of-experts stacks are adapted by peft
through ``target_parameters`` (``ParamWrapper``): per layer the fused ``mlp.experts.gate_up_proj``
``[E, 2F, D]`` and ``mlp.experts.down_proj`` ``[E, D, F]``, one rank-``r`` pair per expert
stored as ``lora_A.weight`` ``[E r, in]`` (expert-major) and ``lora_B.weight`` ``[out, r E]``
(expert-minor); when both are adapted, the first target wraps the experts module and the
second wraps the first, so their tensors are named ``mlp.experts.base_layer.lora_*`` and
``mlp.experts.lora_*``. Our ``phi`` at ``mlp/experts/{gate,up,down}_proj/kernel`` is
``{"a": [E, in, r], "b": [E, r, out]}`` (:func:`lowrank_jax.methods.batched.batched_lora`);
the fused ``gate_up`` pair becomes a gate and an up leaf sharing ``a``, and is written back
fused (rank ``r`` when they share ``a``, else rank ``r_gate + r_up`` with a block-diagonal
``B``, recorded in ``rank_pattern``/``alpha_pattern`` at an unchanged scale).

Tensors are read and written with ``safetensors.numpy`` (never torch). Exports are
atomic: the folder is written under a temporary name next to the target and renamed
into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import lazy, tree as tree_lib, validate
from lowrank_jax.interop import hf
from lowrank_jax.io import safetensors as st
from lowrank_jax.methods import registry, vera as vera_lib
from lowrank_jax.models import bert, decoder, families
from lowrank_jax.reparam import (PerModule, PhiMismatchError, Reparam, chain, initialize as lj_initialize,
                                  per_module)

__all__ = [
  "CONFIG_NAME",
  "WEIGHTS_NAME",
  "PeftAdapter",
  "bert_module_to_path",
  "bert_path_to_module",
  "decoder_module_to_path",
  "decoder_path_to_module",
  "read_peft_folder",
  "load_peft_adapter",
  "save_peft_adapter",
  "lora_config",
  "per_module",
  "PerModule",
  "SUPPORTED",
]

PyTree = Any
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


# --------------------------------------------------------------------------- name mapping

# The BERT linears peft may adapt, as our paths; the names both ways come from the one
# renaming that loads the weights (models.bert.bert_rules / hf_name), not a second table.
_BERT_LINEAR = re.compile(
    r"^(encoder/layer_\d+/(attention/(query|key|value|output)|intermediate|output)|pooler)/kernel$")


def bert_module_to_path(module: str) -> str:
  """Hugging Face BERT module name -> our tree path (:mod:`lowrank_jax.models.bert`).

  ``encoder.layer.{i}.attention.self.{query,key,value}`` -> ``encoder/layer_{i}/attention/{q,k,v}/kernel``,
  ``...attention.output.dense`` -> ``.../attention/output/kernel``,
  ``...intermediate.dense`` -> ``.../intermediate/kernel``, ``...output.dense`` ->
  ``.../output/kernel``; a leading ``bert.`` (``BertFor*`` models) is dropped.
  """
  path = hf.rename(module + ".weight", bert.bert_rules())
  if not _BERT_LINEAR.match(path):
    raise KeyError(f"no module -> path mapping for {module!r} (not a BERT linear layer); "
                   "pass your own module_to_path / path_to_module")
  return path


def bert_path_to_module(path: str) -> str:
  """Inverse of :func:`bert_module_to_path`."""
  if not _BERT_LINEAR.match(path):
    raise KeyError(f"no path -> module mapping for {path!r} (not a BERT linear kernel); "
                   "pass your own module_to_path / path_to_module")
  return bert.hf_name(path)[: -len(".weight")]


_EXPERT_WRAPPER = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts(?:\.base_layer)*$")
_EXPERT_NODE = re.compile(r"^layers/layer_(\d+)/mlp/experts$")
_EXPERT_PARAMS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _decoder_linears(config) -> list[tuple[re.Pattern, str, re.Pattern, str]]:
  """``(hf regex, our module template, our regex, hf template)`` of the family's linears."""
  out = []
  for ours, theirs in families.get(config.family).modules.items():
    if "{e}" in theirs or ours.endswith(("norm", "embed_tokens", "router")):
      continue
    out.append((re.compile("^" + re.escape(theirs).replace(r"\{i\}", r"(\d+)") + "$"), ours,
                re.compile("^" + re.escape(ours).replace(r"\{i\}", r"(\d+)") + "/kernel$"), theirs))
  return out


def _decoder_tensors(config) -> dict[str, str]:
  """Hugging Face tensor name -> our leaf path of every 1-d / 2-d leaf of the family's table
  (norm scales, embeddings, kernels, biases; not the expert stacks): the names of trained
  base tensors (``modules_to_save``, trained biases) both ways."""
  return {e.hf[0]: e.path for e in families.tensor_table(config, decoder.param_shapes(config)) if not e.stacked}


def decoder_module_to_path(config) -> Callable[[str], str]:
  """peft module name -> our path for a decoder family (``config`` a ``DecoderConfig``).

  ``model.layers.{i}.self_attn.q_proj`` -> ``layers/layer_{i}/attention/q_proj/kernel``
  (every linear of the family's table, ``lm_head`` included); an expert ``ParamWrapper``
  (``model.layers.{i}.mlp.experts[.base_layer]``) -> the node ``layers/layer_{i}/mlp/experts``.
  The function's ``tensor_to_path(name, ndim)`` attribute maps the family's tensor names
  (``model.norm.weight`` -> ``norm/scale``; :func:`load_peft_adapter`'s default for trained
  base tensors).
  """
  table = _decoder_linears(config)
  tensors = _decoder_tensors(config)

  def tensor_to_path(name: str, ndim: int) -> str:
    if name not in tensors:
      raise KeyError(f"{name!r} is not a tensor of the {config.family} family's model")
    return tensors[name]

  def module_to_path(module: str) -> str:
    m = _EXPERT_WRAPPER.match(module)
    if m:
      return f"layers/layer_{m.group(1)}/mlp/experts"
    for rx, ours, _, _ in table:
      m = rx.match(module)
      if m:
        return ours.replace("{i}", m.group(1) if rx.groups else "") + "/kernel"
    raise KeyError(f"no module -> path mapping for {module!r} in the {config.family} family "
                   f"(its adaptable linears: {sorted({t for _, _, _, t in table})})")
  module_to_path.tensor_to_path = tensor_to_path
  return module_to_path


def decoder_path_to_module(config) -> Callable[[str], str]:
  """Inverse of :func:`decoder_module_to_path` (expert stacks: the ``mlp.experts`` module);
  its ``torch_name(path)`` attribute is the tensor name of any 1-d / 2-d leaf."""
  table = _decoder_linears(config)
  names = {path: name for name, path in _decoder_tensors(config).items()}

  def torch_name(path: str) -> str:
    if path not in names:
      raise KeyError(f"no tensor name for {path!r} in the {config.family} family")
    return names[path]

  def path_to_module(path: str) -> str:
    m = _EXPERT_NODE.match(path)
    if m:
      return f"model.layers.{m.group(1)}.mlp.experts"
    for _, _, rx, theirs in table:
      m = rx.match(path)
      if m:
        return theirs.replace("{i}", m.group(1) if rx.groups else "")
    raise KeyError(f"no path -> module mapping for {path!r} in the {config.family} family")
  path_to_module.torch_name = torch_name
  return path_to_module


# --------------------------------------------------------------------------- reading

_TUNER_PARAMS = {
  "LORA": ("lora_A", "lora_B", "lora_magnitude_vector"),
  "ADALORA": ("lora_A", "lora_B", "lora_E"),
  "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
  "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
  "VERA": ("vera_lambda_b", "vera_lambda_d"),
  "IA3": ("ia3_l",),
}
SUPPORTED = tuple(_TUNER_PARAMS)
_ALL_PARAMS = sorted({p for ps in _TUNER_PARAMS.values() for p in ps}, key=len, reverse=True)
_PARAM_RE = re.compile(r"^(?P<module>.+)\.(?P<param>" + "|".join(map(re.escape, _ALL_PARAMS)) +
                       r")(?:\.weight)?$")
_BASE_RE = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.(?P<param>weight|bias)$")


def _init_of(config: dict) -> str:
  """``init_lora_weights`` in lower case (``"true"`` for the default)."""
  return str(config.get("init_lora_weights", True)).lower()


def _read_config(folder: str) -> tuple[dict, str]:
  """``(adapter_config.json as a dict, its path)``; a damaged file raises
  :class:`~lowrank_jax.validate.CorruptFileError` naming it."""
  cfg_path = os.path.join(folder, CONFIG_NAME)
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
  try:
    with open(cfg_path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise validate.corrupt_file(cfg_path, e, what="adapter config") from e
  if not isinstance(config, dict):
    raise validate.CorruptFileError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
  return config, cfg_path


def _read_tensors(folder: str) -> tuple[str, dict[str, np.ndarray]]:
  """``(path, {name: array})`` of ``adapter_model.safetensors``, read without torch (bf16
  included), checked finite; a damaged file raises ``CorruptFileError`` naming it."""
  w_path = os.path.join(folder, WEIGHTS_NAME)
  if not os.path.exists(w_path):
    if os.path.exists(os.path.join(folder, "adapter_model.bin")):
      raise ValueError(f"{folder} holds a legacy pickled adapter_model.bin; only safetensors "
                       f"adapters can be read without torch")
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
  try:
    tensors = st.load_file(w_path)  # also checks every floating tensor finite (NonFiniteError)
  except validate.NonFiniteError:
    raise
  except (OSError, ValueError, KeyError) as e:
    raise validate.corrupt_file(w_path, e, what="adapter weights") from e
  return w_path, tensors


def _group(tensors: dict[str, np.ndarray], w_path: str) -> dict[str, dict[str, np.ndarray]]:
  """``{module: {param: array}}``: adapter tensors under their parameter name (``lora_A``,
  ``lokr_w1``, ...; ``.weight`` dropped), trained base tensors (biases, ``modules_to_save``)
  under ``weight`` / ``bias``, model-level tensors (VeRA's ``base_model.vera_A``) under the
  module ``""``."""
  modules: dict[str, dict[str, np.ndarray]] = {}
  for name, arr in tensors.items():
    if name.startswith(PREFIX):
      rest = name[len(PREFIX):]
      m = _PARAM_RE.match(rest) or _BASE_RE.match(rest)
      if m is None:
        raise ValueError(f"unsupported adapter tensor {name!r} in {w_path}; supported: the "
                         f"parameters {', '.join(_ALL_PARAMS)} and trained weight/bias tensors")
      module, param = m.group("module"), m.group("param")
    elif name.startswith("base_model.") and name.count(".") == 1:
      module, param = "", name[len("base_model."):]
    else:
      raise ValueError(f"unexpected tensor name {name!r} in {w_path} (expected the prefix {PREFIX!r})")
    if param in modules.setdefault(module, {}):
      raise ValueError(f"{w_path}: tensor {name!r} appears twice (as {param} of {module!r})")
    modules[module][param] = arr
  return modules


def read_peft_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
  """``(config, {module: {param: array}})`` of an adapter folder, torch layouts as stored.

  ``param`` is the tuner's parameter name (``lora_A``, ``lora_B``, ``lora_magnitude_vector``,
  ``lora_E``, ``lokr_w1``, ``hada_w1_a``, ``vera_lambda_b``, ``ia3_l``, ...; a ``.weight``
  suffix dropped), or ``weight`` / ``bias`` for trained base tensors (``bias="all"`` /
  ``"lora_only"``, ``modules_to_save``); model-level tensors (VeRA's saved projections)
  are under the module ``""``. Works for adapters this library cannot apply.
  """
  folder = os.fspath(folder)
  config, _ = _read_config(folder)
  w_path, tensors = _read_tensors(folder)
  return config, _group(tensors, w_path)


class PeftAdapter(NamedTuple):
  """An imported adapter: apply with ``reparam.apply(theta0, phi)``; ``config`` is the
  ``adapter_config.json`` contents (kept for a faithful re-export)."""
  reparam: Reparam
  phi: PyTree
  config: dict


def _check_config(config: dict, cfg_path: str) -> str:
  """The ``peft_type``, after every check that needs the config alone (run before any tensor
  is read): what this library cannot represent raises ``NotImplementedError`` saying what and
  why."""
  kind = config.get("peft_type")
  if kind not in SUPPORTED:
    raise NotImplementedError(f"{cfg_path}: peft_type {kind!r} cannot be imported (supported: "
                              f"{', '.join(SUPPORTED)}); prompt-learning adapters and other tuners "
                              f"have no weight-space reparametrization here")
  unsupported = {
    "lora_bias": "a trained bias on lora_B, which lowrank_jax's LoRA has not",
    "use_qalora": "QA-LoRA's pooled adapter input, which peft's and lowrank_jax's QA-LoRA define differently",
    "layer_replication": "layers duplicated in the base model",
    "trainable_token_indices": "trained rows of the embedding table (trainable tokens)",
    "alora_invocation_tokens": "activated LoRA (adapter active only after invocation tokens)",
    "megatron_config": "Megatron-parallel layers",
  }
  for key, why in unsupported.items():
    if why and config.get(key):
      raise NotImplementedError(f"{cfg_path}: {key}={config[key]!r} is not supported: the adapter "
                                f"has {why}")
  init = _init_of(config)
  if kind == "LORA" and (init not in ("true", "false", "gaussian", "pissa", "olora") or config.get("loftq_config")):
    raise NotImplementedError(
        f"{cfg_path}: init_lora_weights={config.get('init_lora_weights')!r}: this adapter's lora_A / lora_B "
        f"are relative to a base that its initialisation rewrote (quantized by LoftQ, or decomposed by a "
        f"randomized or data-dependent method), which cannot be re-derived from the pretrained base here; "
        f"convert it to a plain LoRA first with peft's save_pretrained(..., "
        f"path_initial_model_for_weight_conversion=<initial adapter>) (rank 2r)")
  if init in ("pissa", "olora") and config.get("use_dora"):
    raise NotImplementedError(f"{cfg_path}: DoRA with init_lora_weights={init!r} is not supported")
  if kind in ("LORA", "ADALORA") and config.get("bias", "none") not in ("none", "all", "lora_only"):
    raise NotImplementedError(f"{cfg_path}: bias={config.get('bias')!r} (expected none, all or lora_only)")
  if kind == "VERA" and not config.get("save_projection", True):
    raise NotImplementedError(
        f"{cfg_path}: save_projection=False: peft regenerates VeRA's frozen projections vera_A / vera_B "
        f"from torch's random generator (projection_prng_key={config.get('projection_prng_key')}), "
        f"which cannot be reproduced without torch; save the adapter with save_projection=True")
  for key in ("rank_pattern", "alpha_pattern"):
    value = config.get(key) or {}
    if not isinstance(value, dict):
      raise ValueError(f"{cfg_path}: {key} must be a mapping, got {value!r}")
  return kind


def _pattern_key(keys, module: str) -> Optional[str]:
  """peft's ``get_pattern_key``: the first key ``k`` with ``re.match(r"(.*\\.)?(k)$", module)``."""
  for key in keys:
    if re.match(rf"(.*\.)?({key})$", module):
      return key
  return None


def _hparams(config: dict, kind: str, module: str) -> tuple[int, float]:
  """``(r, alpha)`` of ``module`` under the config's ``rank_pattern`` / ``alpha_pattern``."""
  r = int(config.get("r", 8))
  alpha = float(config.get("alpha" if kind in ("LOKR", "LOHA") else "lora_alpha", r) or r)
  rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
  rk, ak = _pattern_key(rp, module), _pattern_key(ap, module)
  return (int(rp[rk]) if rk is not None else r), (float(ap[ak]) if ak is not None else alpha)


def _targeted(config: dict, module: str) -> bool:
  """Whether peft's config targets ``module`` (``target_modules``, ``layers_to_transform``)."""
  target = config.get("target_modules")
  if isinstance(target, str):
    hit = re.fullmatch(target, module) is not None
  elif target:
    hit = any(module == t or module.endswith("." + t) for t in target)
  else:
    hit = True
  layers = config.get("layers_to_transform")
  if hit and layers is not None:
    layers = [layers] if isinstance(layers, int) else list(layers)
    pattern = config.get("layers_pattern") or ["layers", "h", "blocks", "layer"]
    pattern = [pattern] if isinstance(pattern, str) else list(pattern)
    m = re.search(r"\.(?:" + "|".join(map(re.escape, pattern)) + r")\.(\d+)\.", "." + module)
    hit = m is not None and int(m.group(1)) in layers
  return hit


def _saved_module(config: dict, module: str) -> bool:
  """peft's ``modules_to_save`` match: a plain suffix (``"norm"`` also saves ``input_layernorm``)."""
  return any(module.endswith(k) for k in config.get("modules_to_save") or ())


def _default_tensor_to_path(module_to_path: Callable[[str], str]) -> Callable[[str, int], str]:
  """Our path of a trained base tensor ``<module>.weight`` / ``.bias``: the BERT loader's
  renaming for the BERT mapping, else the sibling of ``module_to_path(module)``'s kernel."""
  if module_to_path is bert_module_to_path:
    return lambda name, ndim: hf.rename(name, bert.bert_rules(), ndim=ndim)
  if hasattr(module_to_path, "tensor_to_path"):  # decoder_module_to_path: the family's table
    return module_to_path.tensor_to_path

  def tensor_to_path(name: str, ndim: int) -> str:
    module, _, param = name.rpartition(".")
    kernel = module_to_path(module)
    parent = kernel.rpartition("/")[0]
    return f"{parent}/kernel" if param == "weight" and ndim == 2 else f"{parent}/{param}"
  return tensor_to_path


def _module_path(module_to_path, module: str) -> str:
  try:
    return module_to_path(module)
  except KeyError as e:
    raise KeyError(f"adapter module {module!r}: {e.args[0] if e.args else e}") from None


def _fit(module: str, path: str, what: str, found, expected) -> None:
  if tuple(found) != tuple(expected):
    raise ValueError(f"module {module!r} -> '{path}': {what} has shape {tuple(found)}, expected "
                     f"{tuple(expected)}")


def _leaf_lora(config, kind, module, path, params, shape, dtype):
  """LoRA / DoRA / AdaLoRA: ``(phi leaf, group key)``."""
  use_dora = kind == "LORA" and bool(config.get("use_dora"))
  expect = {"lora_A", "lora_B"} | ({"lora_E"} if kind == "ADALORA" else set()) | (
      {"lora_magnitude_vector"} if use_dora else set())
  if set(params) != expect:
    raise ValueError(f"module {module!r}: tensors {sorted(params)} but a {kind}"
                     f"{' (DoRA)' if use_dora else ''} adapter needs {sorted(expect)}")
  A, B = params["lora_A"], params["lora_B"]
  if len(shape) != 2:
    raise ValueError(f"module {module!r} -> '{path}': base leaf has shape {shape}, not a matrix")
  d_in, d_out = shape
  if kind == "ADALORA":
    return _leaf_adalora(config, module, path, params, shape, dtype), ()
  r, alpha = _hparams(config, kind, module)
  if A.ndim != 2 or B.ndim != 2 or A.shape != (r, d_in) or B.shape != (d_out, r):
    where = "" if r == int(config.get("r", 8)) else " (rank_pattern)"
    raise ValueError(f"module {module!r} -> '{path}': lora_A {A.shape} and lora_B {B.shape} do not fit: "
                     f"expected lora_A ({r}, {d_in}) [r, in] and lora_B ({d_out}, {r}) [out, r] for r={r}"
                     f"{where} and the kernel {shape} [in, out]")
  leaf = {"a": jnp.asarray(A.T, dtype), "b": jnp.asarray(B.T, dtype)}
  if use_dora:
    m = params["lora_magnitude_vector"]
    _fit(module, path, "lora_magnitude_vector", m.shape, (d_out,))
    leaf["m"] = jnp.asarray(m, dtype)
  return leaf, (r, alpha)


def _leaf_adalora(config, module, path, params, shape, dtype):
  """AdaLoRA: pruned triplets (after rank allocation peft saves only the kept ones, listed by
  ``rank_pattern``) are put back as zeros at their positions, so every leaf has ``init_r``
  triplets (peft's scale ``alpha / (init_r + 1e-5)`` and our layout; a zero ``e_i`` is a
  masked triplet, as during training)."""
  init_r = int(config.get("init_r", 12))
  d_in, d_out = shape
  A, E, B = params["lora_A"], params["lora_E"].reshape(-1), params["lora_B"]
  keep = (config.get("rank_pattern") or {}).get(module + ".lora_E")
  if keep is None:
    keep = [True] * init_r
  keep = np.asarray(keep, bool)
  k = int(keep.sum())
  if len(keep) != init_r or A.shape != (k, d_in) or E.shape != (k,) or B.shape != (d_out, k):
    raise ValueError(f"module {module!r} -> '{path}': lora_A {A.shape}, lora_E {params['lora_E'].shape}, "
                     f"lora_B {B.shape} do not fit: expected ({k}, {d_in}), ({k}, 1), ({d_out}, {k}) "
                     f"(init_r={init_r}, {k} triplets kept by rank_pattern, kernel {shape} [in, out])")
  a = np.zeros((d_in, init_r), A.dtype)
  e = np.zeros((init_r,), E.dtype)
  b = np.zeros((init_r, d_out), B.dtype)
  a[:, keep], e[keep], b[keep] = A.T, E, B.T
  return {"a": jnp.asarray(a, dtype), "e": jnp.asarray(e, dtype), "b": jnp.asarray(b, dtype)}


def _leaf_named(prefix: str, ours: Callable[[str], str]):
  """LoKr / LoHa / VeRA / IA3: each peft tensor ``<prefix><name>`` is our ``ours(name)``,
  transposed (IA3's ``[out, 1]`` or ``[1, in]`` column is our vector)."""
  def read(config, kind, module, path, params, shape, dtype):
    unknown = sorted(p for p in params if not p.startswith(prefix))
    if unknown:
      raise ValueError(f"module {module!r}: tensors {unknown} do not belong to a {kind} adapter")
    if any(p.endswith(("_t1", "_t2")) for p in params):
      raise NotImplementedError(f"module {module!r}: {sorted(params)}: Tucker cores of convolutions "
                                f"are not supported (linear layers only)")
    if len(shape) != 2:
      raise ValueError(f"module {module!r} -> '{path}': base leaf has shape {shape}, not a matrix")
    leaf = {}
    for p, v in params.items():
      v = np.asarray(v)
      leaf[ours(p[len(prefix):])] = jnp.asarray(v.reshape(-1) if prefix == "ia3_" else v.T, dtype)
    key = _hparams(config, kind, module) if kind in ("LOKR", "LOHA") else ()
    return leaf, key
  return read


def _ia3_name(feedforward: bool) -> Callable[[str], str]:
  return lambda name: "l_in" if feedforward else "l_out"


_LEAF_READERS = {
  "LORA": _leaf_lora,
  "ADALORA": _leaf_lora,
  "LOKR": _leaf_named("lokr_", lambda n: n),
  "LOHA": _leaf_named("hada_", lambda n: n),
  "VERA": _leaf_named("vera_", lambda n: n),
}


def _build(kind: str, config: dict, mask: PyTree, key: tuple, shared: dict, ff_paths: list[str],
           dtype) -> Reparam:
  """The registry method of one group of modules (same hyper-parameters)."""
  if kind in ("LORA",):
    r, alpha = key
    return registry.build("dora" if config.get("use_dora") else "lora", where=mask, rank=r, alpha=alpha,
                          rslora=bool(config.get("use_rslora")),
                          dropout=float(config.get("lora_dropout") or 0.0), dtype=dtype)
  if kind == "ADALORA":
    return registry.build("adalora", where=mask, init_r=int(config.get("init_r", 12)),
                          alpha=float(config.get("lora_alpha", 8)), dtype=dtype)
  if kind == "LOKR":
    r, alpha = key
    return registry.build("lokr", where=mask, rank=r, alpha=alpha,
                          decompose_both=bool(config.get("decompose_both")),
                          decompose_factor=int(config.get("decompose_factor", -1)), dtype=dtype)
  if kind == "LOHA":
    r, alpha = key
    return registry.build("loha", where=mask, rank=r, alpha=alpha, dtype=dtype)
  if kind == "VERA":
    if set(shared) != {"vera_A", "vera_B"}:
      raise ValueError(f"a VeRA adapter saved with save_projection=True holds base_model.vera_A and "
                       f"base_model.vera_B; found model-level tensors {sorted(shared)}")
    a, b = jnp.asarray(shared["vera_A"].T, dtype), jnp.asarray(shared["vera_B"].T, dtype)
    r = int(config.get("r", 256))
    if a.shape[1] != r or b.shape[0] != r:
      raise ValueError(f"VeRA projections vera_A {shared['vera_A'].shape} [r, in_max] and vera_B "
                       f"{shared['vera_B'].shape} [out_max, r] do not have r={r} of adapter_config.json")
    return registry.build("vera", where=mask, rank=r, projections=(a, b),
                          d_initial=float(config.get("d_initial", 0.1)),
                          dropout=float(config.get("vera_dropout") or 0.0), dtype=dtype)
  if kind == "IA3":
    return registry.build("ia3", where=mask, feedforward=["^" + re.escape(p) + "$" for p in ff_paths] or None,
                          dtype=dtype)
  raise NotImplementedError(kind)


def load_peft_adapter(folder: str | os.PathLike, theta0: PyTree, *,
                      module_to_path: Callable[[str], str] = bert_module_to_path,
                      tensor_to_path: Optional[Callable[[str, int], str]] = None,
                      dtype=jnp.float32) -> PeftAdapter:
  """Imports a PEFT adapter folder onto our parameter tree.

  Supported: LoRA (rsLoRA, DoRA, ``rank_pattern`` / ``alpha_pattern``,
  ``layers_to_transform``, ``bias="all"`` / ``"lora_only"``, ``modules_to_save``, expert
  stacks of decoder families), AdaLoRA (also after rank allocation), LoKr, LoHa, VeRA
  (saved projections) and IA3. PiSSA / OLoRA adapters (``A B`` relative to the residual
  their initialisation left) are re-derived from ``theta0`` as peft does when it loads
  them and imported as the LoRA of rank ``2r`` relative to ``theta0`` (peft's conversion).
  ``adapter_config.json`` is checked before any tensor is read; what cannot be
  represented raises ``NotImplementedError`` saying what and why (LoftQ or randomized
  initialisations, trained ``lora_B`` biases, trainable tokens, ...). The tensors are read
  without torch and checked finite; a target that does not fit names the module, our
  path, the expected and the found shapes.

  Args:
    folder: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    theta0: the base parameters (arrays or ``jax.ShapeDtypeStruct``), used for the tree
      structure and to check every adapter shape against its kernel.
    module_to_path: peft module name -> our leaf path.
    tensor_to_path: ``(torch tensor name, ndim) -> our path`` of trained base tensors
      (biases, ``modules_to_save``); default: the BERT loader's renaming with the BERT
      mapping, the family's tensor table with :func:`decoder_module_to_path` (norms,
      ``lm_head``, biases), else the kernel / bias beside ``module_to_path(module)``.
    dtype: dtype of the imported adapter arrays (trained base tensors keep the base's).

  Returns:
    A :class:`PeftAdapter` ``(reparam, phi, config)``. ``phi`` mirrors ``theta0`` with
    ``None`` at the leaves the adapter does not touch; with trained biases or
    ``modules_to_save`` the reparam is ``chain(adapter, full(those leaves))`` and ``phi``
    the pair. ``reparam.config`` is the registry config (a :class:`PerModule` of them when
    modules differ in rank or alpha, a tuple for the chain).
  """
  folder = os.fspath(folder)
  config, cfg_path = _read_config(folder)
  kind = _check_config(config, cfg_path)           # the config alone, before any tensor
  w_path, tensors = _read_tensors(folder)
  modules = _group(tensors, w_path)
  shared = modules.pop("", {})
  if shared and kind != "VERA":
    raise ValueError(f"{w_path}: model-level tensors {sorted(shared)} in a {kind} adapter")
  items = tree_lib.flatten_with_paths(theta0)
  index = {p: i for i, (p, _) in enumerate(items)}
  treedef = jax.tree_util.tree_structure(theta0, is_leaf=lazy.is_lazy)
  to_path = tensor_to_path or _default_tensor_to_path(module_to_path)
  leaves: list[Optional[dict]] = [None] * len(items)
  groups: list[Optional[tuple]] = [None] * len(items)
  trained: list[Any] = [None] * len(items)
  ff_paths, stacked, expert_modules = [], False, []
  feedforward = config.get("feedforward_modules") or []
  for module, params in modules.items():
    base_params = {k: v for k, v in params.items() if k in ("weight", "bias")}
    params = {k: v for k, v in params.items() if k not in ("weight", "bias")}
    for pname, value in base_params.items():
      _place_trained(config, kind, module, pname, value, to_path, index, items, trained, w_path)
    if not params:
      continue
    foreign = sorted(set(params) - set(_TUNER_PARAMS[kind]))
    if foreign:
      raise ValueError(f"{w_path}: module {module!r} has tensors {foreign}, which do not belong to a {kind} "
                       f"adapter (its parameters: {', '.join(_TUNER_PARAMS[kind])})")
    if not config.get("target_parameters") and not _targeted(config, module):
      raise ValueError(f"{w_path} holds {kind} tensors of module {module!r}, which {CONFIG_NAME} does not "
                       f"target (target_modules={config.get('target_modules')!r}, layers_to_transform="
                       f"{config.get('layers_to_transform')!r}); peft would not load them")
    path = _module_path(module_to_path, module)
    if path not in index and any(p.startswith(path + "/") for p in index):  # an expert ParamWrapper
      if kind != "LORA" or config.get("use_dora"):
        raise NotImplementedError(f"module {module!r}: only plain LoRA is supported on expert stacks")
      for leaf_path, leaf in _expert_leaves_from_peft(module, path, params, index, items, dtype).items():
        if leaves[index[leaf_path]] is not None:
          raise ValueError(f"module {module!r}: '{leaf_path}' is adapted twice")
        leaves[index[leaf_path]] = leaf
      stacked = True
      expert_modules.append(module)
      continue
    if path not in index:
      raise KeyError(f"adapter module {module!r} maps to path {path!r}, which is not in the base "
                     f"tree; paths near it: {[p for p in index if p.rsplit('/', 1)[0] == path.rsplit('/', 1)[0]]}")
    shape = tuple(items[index[path]][1].shape)
    if kind == "IA3":
      ff = _targeted({"target_modules": feedforward}, module) if feedforward else False
      if len(shape) == 2 and "ia3_l" in params:  # peft's layout says which: [1, in] feed-forward, else [out, 1]
        _fit(module, path, "ia3_l (feed-forward: [1, in])" if ff else "ia3_l (not feed-forward: [out, 1])",
             np.shape(params["ia3_l"]), (1, shape[0]) if ff else (shape[1], 1))
      leaf = _leaf_named("ia3_", _ia3_name(ff))(config, kind, module, path, params, shape, dtype)[0]
      if ff:
        ff_paths.append(path)
      key = ()
    else:
      leaf, key = _LEAF_READERS[kind](config, kind, module, path, params, shape, dtype)
    leaves[index[path]], groups[index[path]] = leaf, key
  if not any(l is not None for l in leaves):
    raise ValueError(f"{folder} holds no adapter tensors")
  if stacked:
    # the expert stacks and the modules at the config's (r, alpha) in one batched LoRA;
    # modules with their own rank_pattern / alpha_pattern entry in LoRA parts beside it
    default = (int(config.get("r", 8)), float(config.get("lora_alpha", 8)))
    other = [g for g in dict.fromkeys(groups) if g is not None and g != default]
    in_stack = [l is not None and g not in other for l, g in zip(leaves, groups)]
    mask = jax.tree_util.tree_unflatten(treedef, in_stack)
    leaf_ranks = {path: int(l["a"].shape[-1]) for (path, _), l, s in zip(items, leaves, in_stack)
                  if s and int(l["a"].shape[-1]) != default[0]}
    names = [f"{m}.{p.rpartition('.')[2]}" for m in expert_modules for p in _EXPERT_PARAMS]
    reparam = _stacked_reparam(config, mask, leaf_ranks, names)
    if other:
      parts = [(jax.tree_util.tree_unflatten(treedef, [g == key for g in groups]), None) for key in other]
      parts = [(m, _build(kind, config, m, key, shared, ff_paths, dtype)) for (m, _), key in zip(parts, other)]
      reparam = per_module(parts + [(mask, reparam)])
  else:
    keys = list(dict.fromkeys(g for g in groups if g is not None))
    parts = []
    for key in keys:
      mask = jax.tree_util.tree_unflatten(treedef, [g == key for g in groups])
      if kind == "LORA" and _init_of(config) in ("pissa", "olora"):
        key = _relative_to_pretrained(config, key, mask, theta0, treedef, leaves, folder)
      parts.append((mask, _build(kind, config, mask, key, shared, ff_paths, dtype)))
    reparam = parts[0][1] if len(parts) == 1 else per_module(parts)
  phi = jax.tree_util.tree_unflatten(treedef, leaves)
  _check_fits(reparam, theta0, phi, folder, items, modules, module_to_path)
  if any(t is not None for t in trained):
    mask = jax.tree_util.tree_unflatten(treedef, [t is not None for t in trained])
    reparam = chain(reparam, registry.build("full", where=mask))
    phi = (phi, jax.tree_util.tree_unflatten(treedef, trained))
  return PeftAdapter(reparam=reparam, phi=phi, config=config)


def _relative_to_pretrained(config, key, mask, theta0, treedef, leaves, folder) -> tuple:
  """A PiSSA / OLoRA adapter (``A B`` relative to the residual ``W - s A0 B0``) as the LoRA
  of rank ``2r`` relative to the pretrained base ``W``: ``[A | A0] [B; -B0] = A B - A0 B0``,
  the same scale (``alpha`` doubled, ``sqrt 2`` times with rsLoRA), exactly what peft's
  ``path_initial_model_for_weight_conversion`` writes. ``A0 B0`` is re-derived from ``W``
  (the SVD or QR of the initialisation is deterministic), as peft does when it loads such a
  folder. Rewrites ``leaves`` in place; returns the group's new ``(r, alpha)``."""
  r, alpha = key
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(theta0)):
    raise ValueError(f"{folder}: a {_init_of(config)}-initialised adapter is re-derived from the base "
                     f"weights; pass theta0 as arrays, not jax.ShapeDtypeStruct")
  init = registry.build("lora", where=mask, rank=r, alpha=alpha, rslora=bool(config.get("use_rslora")),
                        init=_init_of(config))
  _, phi0 = lj_initialize(init, jax.random.key(0), theta0)
  for i, (leaf, p0) in enumerate(zip(leaves, treedef.flatten_up_to(phi0))):
    if p0 is not None and leaf is not None:
      leaves[i] = {"a": jnp.concatenate([leaf["a"], p0["a"].astype(leaf["a"].dtype)], axis=1),
                   "b": jnp.concatenate([leaf["b"], -p0["b"].astype(leaf["b"].dtype)], axis=0)}
  return 2 * r, alpha * (2 ** 0.5 if config.get("use_rslora") else 2)


def _place_trained(config, kind, module, pname, value, to_path, index, items, trained, w_path) -> None:
  """A trained base tensor (``bias="all"`` / ``"lora_only"``, ``modules_to_save``) into
  ``trained`` at its path, in our layout (kernels transposed)."""
  name = f"{module}.{pname}"
  saved = _saved_module(config, module)
  if not saved and not (pname == "bias" and config.get("bias", "none") in ("all", "lora_only")):
    raise ValueError(f"{w_path} holds the base tensor {name!r}, but {CONFIG_NAME} neither trains "
                     f"biases (bias={config.get('bias', 'none')!r}) nor lists {module!r} in "
                     f"modules_to_save={config.get('modules_to_save')!r}")
  try:
    path = to_path(name, value.ndim)
  except KeyError as e:
    raise KeyError(f"{name!r} ({'modules_to_save' if saved else 'trained bias'}): no path for it "
                   f"({e}); pass tensor_to_path=") from None
  if path not in index:
    raise KeyError(f"{name!r} ({'modules_to_save' if saved else 'trained bias'}) maps to {path!r}, "
                   f"which is not in the base tree")
  like = items[index[path]][1]
  ours = np.asarray(value).T if path.endswith("/kernel") else np.asarray(value)
  if tuple(ours.shape) != tuple(like.shape):
    raise ValueError(f"{name!r} -> '{path}': shape {tuple(ours.shape)} (our layout), the base leaf has "
                     f"{tuple(like.shape)}")
  trained[index[path]] = {"w": jnp.asarray(ours, like.dtype)}  # the layout of lowrank_jax.full


def _check_fits(reparam, theta0, phi, folder, items, modules, module_to_path) -> None:
  """Runs the reparam's own checks (``phi`` against the method on ``theta0``) abstractly, so a
  module whose tensors do not fit is named now, with its peft name."""
  try:
    jax.eval_shape(lambda t, p: reparam.apply(t, p), _abstract_tree(theta0), phi)
  except PhiMismatchError as e:
    by_path = {}
    for module in modules:
      try:
        by_path[module_to_path(module)] = module
      except KeyError:
        pass
    m = re.search(r"'([^']+)'", str(e))
    module = by_path.get(m.group(1)) if m else None
    raise ValueError(f"{folder}: {'module ' + repr(module) + ': ' if module else ''}{e}") from e


def _abstract_tree(tree: PyTree) -> PyTree:
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _stacked_reparam(config: dict, mask: PyTree, leaf_ranks: dict[str, int], expert_names: list[str]) -> Reparam:
  """LoRA on expert stacks (peft's ``target_parameters``): the tensors' own ranks (fused
  stacks: ``rank_pattern`` entries that keep the scale) at the config's scale.
  ``expert_names``: ``<wrapper module>.<parameter>`` of the stacks, which the patterns may match."""
  r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
  root = (lambda x: x ** 0.5) if config.get("use_rslora") else (lambda x: x)
  rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
  for key in {k for k in set(rp) | set(ap) if any(_pattern_key([k], n) for n in expert_names)}:
    rk, ak = int(rp.get(key, r)), float(ap.get(key, alpha))
    if abs(ak / root(rk) - alpha / root(r)) > 1e-9 * abs(alpha / root(r)):
      raise NotImplementedError(f"rank_pattern/alpha_pattern entry {key!r} (r={rk}, alpha={ak}) changes "
                                f"the LoRA scale of expert stacks from {alpha / root(r)}")
  if config.get("lora_dropout"):
    raise NotImplementedError("lora_dropout on expert stacks (peft does not support it either)")
  pattern = {"^" + re.escape(p) + "$": k for p, k in leaf_ranks.items()}
  return registry.build("batched_lora", where=mask, rank=r, alpha=alpha, rslora=bool(config.get("use_rslora")),
                        rank_pattern=pattern or None)


def _expert_leaves_from_peft(module, node, params, index, items, dtype) -> dict[str, dict]:
  """The phi leaves of one expert ``ParamWrapper``: fused ``gate_up_proj`` (``in = D``,
  ``out = 2F``) or ``down_proj`` (``in = F``, ``out = D``), told apart by shape."""
  if set(params) != {"lora_A", "lora_B"}:
    raise ValueError(f"module {module!r}: tensors {sorted(params)}, expected lora_A and lora_B")
  A, B = params["lora_A"], params["lora_B"]
  shape = {name: tuple(items[index[f"{node}/{name}/kernel"]][1].shape)
           for name in ("gate_proj", "up_proj", "down_proj") if f"{node}/{name}/kernel" in index}
  if set(shape) != {"gate_proj", "up_proj", "down_proj"}:
    raise ValueError(f"module {module!r} -> '{node}': expected gate_proj, up_proj and down_proj stacks there")
  e, d, f = shape["gate_proj"]
  fused = A.shape[1] == d and B.shape[0] == 2 * f
  down = A.shape[1] == f and B.shape[0] == d
  rE = A.shape[0]
  if fused == down or A.ndim != 2 or B.ndim != 2 or rE % e or B.shape[1] != rE:
    raise ValueError(f"module {module!r} -> '{node}': lora_A {A.shape} [r E, in] and lora_B {B.shape} "
                     f"[out, r E] fit neither gate_up_proj ({d} -> {2 * f}) nor down_proj ({f} -> {d}) "
                     f"of {e} experts")
  r = rE // e
  a = jnp.asarray(A.reshape(e, r, A.shape[1]).transpose(0, 2, 1), dtype)      # [E, in, r]
  b = jnp.asarray(B.reshape(B.shape[0], r, e).transpose(2, 1, 0), dtype)      # [E, r, out]
  if down:
    return {f"{node}/down_proj/kernel": {"a": a, "b": b}}
  return {f"{node}/gate_proj/kernel": {"a": a, "b": b[..., :f]},
          f"{node}/up_proj/kernel": {"a": a, "b": b[..., f:]}}


# --------------------------------------------------------------------------- writing


def lora_config(rank: int, alpha: float, target_modules: list[str], *, use_rslora: bool = False,
                use_dora: bool = False, lora_dropout: float = 0.0,
                base_model_name_or_path: Optional[str] = None, **extra) -> dict:
  """A complete enough ``adapter_config.json`` for peft's ``PeftModel.from_pretrained``."""
  cfg = {
    "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
    "revision": None, "inference_mode": True, "r": int(rank), "lora_alpha": alpha,
    "lora_dropout": float(lora_dropout), "target_modules": sorted(set(target_modules)),
    "bias": "none", "fan_in_fan_out": False, "use_rslora": bool(use_rslora),
    "use_dora": bool(use_dora), "init_lora_weights": True, "modules_to_save": None,
    "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    "lora_bias": False,
  }
  cfg.update(extra)
  return cfg


def _is_adapter_leaf(x) -> bool:
  return isinstance(x, dict) and "a" in x and "b" in x


# Methods with no peft counterpart, and why (the export refuses them by name).
_NO_PEFT = {
  "glora": "peft 0.21 has no GLoRA tuner",
  "intrinsic_said": "peft has no intrinsic-dimension (SAID) tuner",
  "bottleneck_adapters": "peft has no bottleneck adapters",
  "prefix_tuning": "peft's prefix tuning is a prompt-learning adapter (past_key_values), not written here",
  "qalora": "peft's QA-LoRA (use_qalora) pools the adapter input differently from lowrank_jax's",
  "l4q": "L4Q trains the quantized merged weight itself: there is no adapter to export (save the merged model)",
  "full": "full fine-tuning alone has no adapter (save the merged model, or chain it after an adapter: "
          "modules_to_save / trained biases)",
}
_EXPORTABLE = ("lora", "dora", "adalora", "lokr", "loha", "vera", "ia3", "batched_lora", "loftq")


class _Plan(NamedTuple):
  """What to write: the adapter method's config(s) (one per group of modules), its ``phi``,
  and the ``phi`` of chained ``full`` entries (trained biases, ``modules_to_save``)."""
  name: str
  configs: tuple          # MethodConfig per group (a PerModule's parts, else one)
  phi: PyTree
  trained: tuple          # phi of full entries


def _plan(reparam: Reparam, phi: PyTree) -> _Plan:
  """Reads ``reparam.config`` (see :class:`~lowrank_jax.Reparam`): one method, a
  :class:`PerModule`, or a chain of one adapter method and ``full`` entries."""
  cfg = reparam.config
  is_chain = isinstance(cfg, tuple) and not isinstance(cfg, PerModule)
  if cfg is None:
    raise ValueError("save_peft_adapter: reparam.config is None (a reparam assembled by hand, e.g. with "
                     "adapt(); every method factory such as lj.lora(...) and the registry record one): "
                     "build it with a method factory or lowrank_jax.methods.registry so the export can "
                     "read its settings, or pass rank=, alpha= and use_rslora=")
  entries = list(cfg) if is_chain else [cfg]
  phis = list(phi) if is_chain else [phi]
  if is_chain and (not isinstance(phi, (tuple, list)) or len(phi) != len(cfg)):
    raise ValueError(f"save_peft_adapter: the reparam is a chain of {len(cfg)} entries; phi must be the "
                     f"tuple of their parameters")
  adapter, trained = None, []
  for c, p in zip(entries, phis):
    name = c.parts[0].method_name if isinstance(c, PerModule) else getattr(c, "method_name", None)
    if name is None:
      raise ValueError(f"save_peft_adapter: a chain entry has no registry config ({c!r})")
    if name == "full" and not isinstance(c, PerModule):
      trained.append(p)
      continue
    if name in _NO_PEFT:
      raise NotImplementedError(f"save_peft_adapter: {name} cannot be written as a peft adapter: {_NO_PEFT[name]}")
    if name not in _EXPORTABLE:
      raise NotImplementedError(f"save_peft_adapter: no peft export for {name!r} (exportable: {_EXPORTABLE})")
    if adapter is not None:
      raise NotImplementedError(f"save_peft_adapter: a peft adapter holds one method; the chain has "
                                f"{adapter[0]} and {name}")
    configs = c.parts if isinstance(c, PerModule) else (c,)
    if name == "lora" and configs[0].bias != "none":  # lora(bias=...) is chain(lora, full(biases))
      if not (isinstance(p, (tuple, list)) and len(p) == 2):
        raise ValueError(f"save_peft_adapter: LoRA with bias={configs[0].bias!r} has phi (lora, biases)")
      p, biases = p
      trained.append(biases)
    adapter = (name, configs, p)
  if adapter is None:
    raise NotImplementedError(f"save_peft_adapter: {_NO_PEFT['full']}")
  return _Plan(adapter[0], adapter[1], adapter[2], tuple(trained))


def _same(a, b) -> bool:
  return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))


def _contradictions(plan: _Plan, rank, alpha, use_rslora) -> None:
  """The old keyword arguments must agree with the reparam's own config."""
  cfg = plan.configs[0]
  got = {"rank": rank, "alpha": alpha, "use_rslora": use_rslora}
  mine = {"rank": getattr(cfg, "rank", getattr(cfg, "init_r", None)),
          "alpha": getattr(cfg, "alpha", None), "use_rslora": getattr(cfg, "rslora", False)}
  if mine["alpha"] is None:
    mine["alpha"] = mine["rank"]
  for k, v in got.items():
    if v is None:
      continue
    if len(plan.configs) > 1 and k != "use_rslora":
      raise ValueError(f"save_peft_adapter: {k}={v!r} given, but the reparam sets it per module "
                       f"({[getattr(c, 'rank', None) for c in plan.configs]}); leave it out")
    if (k == "use_rslora" and bool(v) != bool(mine[k])) or (k != "use_rslora" and not _same(v, mine[k])):
      raise ValueError(f"save_peft_adapter: {k}={v!r} contradicts the reparam's config ({plan.name} with "
                       f"{k}={mine[k]!r}); leave it out (the reparam's own settings are written)")


def _scale_key(c) -> tuple[int, float]:
  r = getattr(c, "rank")
  return r, float(r if c.alpha is None else c.alpha)


def _patterns(plan: _Plan, module_of: dict[str, str], phi_items) -> tuple[int, float, dict, dict]:
  """``(r, alpha, rank_pattern, alpha_pattern)``: the most common ``(r, alpha)`` as the default,
  the modules of other groups by their full (escaped) name."""
  by_path = {}
  for c in plan.configs:
    mask = c.where
    for (path, _), m in zip(phi_items, jax.tree_util.tree_leaves(mask) if isinstance(mask, dict) else []):
      if m:
        by_path[path] = _scale_key(c)
  if len(plan.configs) == 1:
    r, a = _scale_key(plan.configs[0])
    return r, a, {}, {}
  counts: dict = {}
  for key in by_path.values():
    counts[key] = counts.get(key, 0) + 1
  r, a = max(counts, key=counts.get)
  rp, ap = {}, {}
  for path, (rk, ak) in by_path.items():
    if path in module_of:
      if rk != r:
        rp[re.escape(module_of[path])] = rk
      if not _same(ak, a):
        ap[re.escape(module_of[path])] = ak
  return r, a, rp, ap


def _torch_name(path: str, path_to_module: Callable[[str], str]) -> str:
  """The torch tensor name of our leaf ``path`` (a kernel -> ``<module>.weight``)."""
  if path_to_module is bert_path_to_module:
    return bert.hf_name(path)
  if hasattr(path_to_module, "torch_name"):  # decoder_path_to_module: the family's table
    return path_to_module.torch_name(path)
  parent, _, last = path.rpartition("/")
  module = path_to_module(parent + "/kernel")
  return module + "." + {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(last, last)


def save_peft_adapter(folder: str | os.PathLike, phi: PyTree, config: Optional[dict] = None, *,
                      reparam: Optional[Reparam] = None,
                      rank: Optional[int] = None, alpha: Optional[float] = None,
                      use_rslora: Optional[bool] = None,
                      path_to_module: Callable[[str], str] = bert_path_to_module,
                      base_model_name_or_path: Optional[str] = None,
                      rewritten_base: str = "convert", theta0: PyTree = None,
                      initial_phi: PyTree = None, base: PyTree = None,
                      overwrite: bool = False) -> None:
  """Writes ``phi`` as a PEFT adapter folder, atomically.

  The settings come from the reparam's own config (``reparam.config``, recorded by the
  method registry and by :func:`load_peft_adapter`): LoRA (rsLoRA, DoRA, per-module ranks
  and alphas as ``rank_pattern`` / ``alpha_pattern``, ``bias="all"`` / ``"lora_only"``),
  AdaLoRA, LoKr, LoHa, VeRA, IA3, LoRA on expert stacks, and ``full`` entries chained after
  the adapter (trained biases, other modules as ``modules_to_save``). Methods peft cannot
  represent are refused, saying why.

  Adapters whose initialisation rewrote the base (``init="pissa"`` / ``"olora"``, LoftQ):
  ``rewritten_base="convert"`` (default; PiSSA / OLoRA) writes the LoRA of rank ``2r``
  relative to the pretrained base, ``[A | A0] [B; -B0] = A B - A0 B0`` at the same scale, as
  peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does; ``A0 B0``
  is ``initial_phi`` or re-derived from the pretrained ``theta0``. ``"keep"`` writes the
  adapter as trained (PiSSA / OLoRA with their ``init_lora_weights``, which peft re-derives
  from the pretrained base when it loads them) and, given ``base`` (the rewritten base
  ``theta0'``), the rewritten weights of the adapted modules in ``rewritten_base.safetensors``
  beside it (torch names and layout; LoftQ needs them: load them into the model first).

  Args:
    folder: target folder (must not exist unless ``overwrite``).
    phi: the parameters (``None`` holes; a tuple for a chain).
    config: an ``adapter_config.json`` dict to write as is (e.g. from :func:`load_peft_adapter`).
    reparam: the reparam ``phi`` belongs to; its ``config`` says what to write.
    rank, alpha, use_rslora: the old way to say the LoRA settings (without ``reparam``:
      ``alpha`` must be given, a forgotten one would write ``lora_alpha = r``); with
      ``reparam`` they must agree with its config.
    path_to_module: our leaf path -> peft module name.
    base_model_name_or_path: recorded in a generated config.
    rewritten_base: ``"convert"`` or ``"keep"`` (see above).
    theta0, initial_phi, base: the pretrained base, the initial ``phi`` and the rewritten
      base of a base-rewriting adapter (see above).
    overwrite: replace an existing folder.
  """
  folder = os.path.abspath(os.fspath(folder))
  if rewritten_base not in ("convert", "keep"):
    raise ValueError(f"rewritten_base must be 'convert' or 'keep', got {rewritten_base!r}")
  extra_files: dict[str, dict[str, np.ndarray]] = {}
  if config is None and reparam is not None:
    plan = _plan(reparam, phi)
    _contradictions(plan, rank, alpha, use_rslora)
    validate.check_finite(plan.phi, what="save_peft_adapter: phi")
    tensors, config = _from_plan(plan, path_to_module, base_model_name_or_path, rewritten_base,
                                 theta0, initial_phi, base, extra_files)
  else:
    validate.check_finite(phi, what="save_peft_adapter: phi")
    tensors, config = _lora_tensors(phi, config, rank, alpha, bool(use_rslora), path_to_module,
                                    base_model_name_or_path)
  _write(folder, tensors, config, overwrite, extra_files)


def _write(folder: str, tensors: dict, config: dict, overwrite: bool, extra_files: dict) -> None:
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  if os.path.exists(folder) and not overwrite:
    raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp_", dir=parent)
  try:
    st.save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
    for name, extra in extra_files.items():
      st.save_file(extra, os.path.join(tmp, name), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.write("\n")
    st.replace_folder(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _lora_tensors(phi, config, rank, alpha, use_rslora, path_to_module, base_model_name_or_path):
  """The LoRA-family tensors of ``phi`` and, without ``config``, a LoRA config from the
  loose arguments (the path without a reparam)."""
  tensors: dict[str, np.ndarray] = {}
  modules = []
  dora = adalora = False
  experts: dict[str, dict[str, dict]] = {}
  keep = (config or {}).get("rank_pattern") if (config or {}).get("peft_type") == "ADALORA" else None
  for path, leaf in _adapter_items(phi):
    if np.ndim(leaf["a"]) == 3:  # an expert stack: written fused, per layer, below
      node, _, rest = path.rpartition("/mlp/experts/")
      experts.setdefault(node + "/mlp/experts", {})[rest.split("/")[0]] = leaf
      continue
    module = path_to_module(path)
    modules.append(module)
    base = PREFIX + module
    a, b = np.asarray(leaf["a"]), np.asarray(leaf["b"])
    if config:
      _check_against_config(config, module, path, leaf)
    if "e" in leaf:
      adalora = True
      e = np.asarray(leaf["e"]).reshape(-1)
      kept = np.asarray(keep[module + ".lora_E"], bool) if keep and module + ".lora_E" in keep else slice(None)
      tensors[base + ".lora_A"] = np.ascontiguousarray(a.T[kept])
      tensors[base + ".lora_E"] = np.ascontiguousarray(e[kept].reshape(-1, 1))
      tensors[base + ".lora_B"] = np.ascontiguousarray(b.T[:, kept])
    else:
      tensors[base + ".lora_A.weight"] = np.ascontiguousarray(a.T)
      tensors[base + ".lora_B.weight"] = np.ascontiguousarray(b.T)
    if "m" in leaf:
      dora = True
      tensors[base + ".lora_magnitude_vector"] = np.ascontiguousarray(np.asarray(leaf["m"]))
  rank_pattern: dict[str, int] = {}
  for node, stack in experts.items():
    names = _expert_tensors(path_to_module(node), stack, tensors)
    rank_pattern.update(names)
  if not tensors:
    raise ValueError("save_peft_adapter: phi holds no adapter leaf ({'a', 'b'} dicts)")
  if config is None:
    if adalora:
      raise ValueError("save_peft_adapter: pass reparam= (or the AdaLoRA config dict) for an AdaLoRA phi")
    ranks = {int(np.shape(l["a"])[-1]) for _, l in _adapter_items(phi)}
    if rank is None:
      if len(ranks) != 1:
        raise ValueError(f"phi has several ranks {sorted(ranks)}; pass reparam= (its config has them)")
      rank = ranks.pop()
    if alpha is None:
      raise ValueError("save_peft_adapter: pass reparam= (the reparam phi was trained with) so the export "
                       "reads its settings, or alpha= explicitly: without it the folder would claim "
                       f"lora_alpha = r = {rank}, and peft would scale the update by 1")
    extra = {}
    if experts:
      extra["target_parameters"] = [p for p in _EXPERT_PARAMS if p in rank_pattern]
      pattern = {f".*\\.{p.rpartition('.')[2]}": r for p, r in rank_pattern.items() if r != rank}
      if pattern and use_rslora:
        raise NotImplementedError("rsLoRA expert stacks whose fused rank differs from r")
      extra.update(rank_pattern=pattern, alpha_pattern={k: alpha * r / rank for k, r in pattern.items()})
    # full module names: peft matches a target by equality or by "." + suffix, so short
    # names such as "dense" would also adapt modules phi does not touch
    config = lora_config(rank, alpha, modules, use_rslora=use_rslora,
                         use_dora=dora, base_model_name_or_path=base_model_name_or_path, **extra)
  return tensors, config


def _check_against_config(config: dict, module: str, path: str, leaf: dict) -> None:
  """A given ``adapter_config.json`` must describe ``phi``: the tuner, the rank of every module
  (``r`` or its ``rank_pattern`` entry), DoRA's magnitude."""
  kind = config.get("peft_type")
  if kind not in ("LORA", "ADALORA"):
    raise ValueError(f"save_peft_adapter: config says peft_type={kind!r}, phi at '{path}' holds LoRA factors")
  if ("e" in leaf) != (kind == "ADALORA"):
    raise ValueError(f"save_peft_adapter: config says peft_type={kind!r}, phi at '{path}' holds "
                     f"{sorted(leaf)}")
  if kind == "ADALORA":
    want = int(config.get("init_r", 12))
    if np.shape(leaf["e"])[-1] != want:
      raise ValueError(f"save_peft_adapter: phi at '{path}' has {np.shape(leaf['e'])[-1]} AdaLoRA triplets, "
                       f"the config's init_r is {want}")
    return
  r, _ = _hparams(config, kind, module)
  if np.shape(leaf["a"])[-1] != r:
    raise ValueError(f"save_peft_adapter: phi at '{path}' (module {module!r}) has rank {np.shape(leaf['a'])[-1]}, "
                     f"the config says r={r}{' (rank_pattern)' if r != int(config.get('r', 8)) else ''}")
  if ("m" in leaf) != bool(config.get("use_dora")):
    raise ValueError(f"save_peft_adapter: the config says use_dora={bool(config.get('use_dora'))}, phi at "
                     f"'{path}' {'has' if 'm' in leaf else 'has no'} DoRA magnitude 'm'")


def _from_plan(plan: _Plan, path_to_module, base_model_name_or_path, rewritten_base, theta0,
               initial_phi, base, extra_files) -> tuple[dict, dict]:
  """Tensors and ``adapter_config.json`` of a reparam's config."""
  first = plan.configs[0]
  name, phi = plan.name, plan.phi
  init = getattr(first, "init", None)
  rewrites = name == "loftq" or init in ("pissa", "olora")
  common = {"task_type": None, "base_model_name_or_path": base_model_name_or_path, "revision": None,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None}
  if rewrites and rewritten_base == "convert":
    if name == "loftq":
      raise NotImplementedError(
          "save_peft_adapter: a LoftQ adapter cannot be converted to a LoRA of the pretrained base "
          "(Q(W) - W + s A B is not low-rank); pass rewritten_base='keep' and base=<the quantized base>")
    phi = _converted(plan, phi, theta0, initial_phi)
  if name in ("lora", "dora", "loftq", "batched_lora"):
    converted = rewrites and rewritten_base == "convert"
    tensors, _ = _lora_tensors(phi, {}, None, None, False, path_to_module, None)
    items = _adapter_items(phi)
    module_of = {p: path_to_module(p) for p, l in items if np.ndim(l["a"]) == 2}
    r, a, rp, ap = _patterns(plan, module_of, _mirror_items(phi))
    rslora = bool(getattr(first, "rslora", False))
    if converted:
      r, a = 2 * r, a * (2 ** 0.5 if rslora else 2)
      rp = {k: 2 * v for k, v in rp.items()}
      ap = {k: v * (2 ** 0.5 if rslora else 2) for k, v in ap.items()}
    extra = {}
    if name == "batched_lora":
      return _lora_tensors(phi, None, r, a, rslora, path_to_module, base_model_name_or_path)
    if rewrites and rewritten_base == "keep" and init in ("pissa", "olora"):
      extra["init_lora_weights"] = init
    if len(module_of) != len(items):  # expert stacks beside per-module LoRA parts (a PerModule)
      _, stacks = _lora_tensors(phi, None, r, a, rslora, path_to_module, base_model_name_or_path)
      extra["target_parameters"] = stacks["target_parameters"]
      rp, ap = {**rp, **stacks["rank_pattern"]}, {**ap, **stacks["alpha_pattern"]}
    config = lora_config(r, a, list(module_of.values()), use_rslora=rslora, use_dora=name == "dora",
                         lora_dropout=float(getattr(first, "dropout", 0.0)),
                         base_model_name_or_path=base_model_name_or_path, rank_pattern=rp, alpha_pattern=ap,
                         **extra)
  elif name == "adalora":
    # masked triplets (e_i = 0) are pruned as peft saves them, listed by rank_pattern
    keep = {path_to_module(p) + ".lora_E": [bool(v) for v in np.asarray(l["e"]).reshape(-1) != 0]
            for p, l in _adapter_items(phi)}
    keep = keep if not all(all(k) for k in keep.values()) else None
    tensors, _ = _lora_tensors(phi, {"peft_type": "ADALORA", "init_r": first.init_r, "rank_pattern": keep},
                               None, None, False, path_to_module, None)
    modules = [path_to_module(p) for p, _ in _adapter_items(phi)]
    config = {**common, "peft_type": "ADALORA", "r": 8, "init_r": first.init_r,
              "target_r": first.init_r, "lora_alpha": first.alpha, "lora_dropout": float(first.dropout),
              "target_modules": sorted(set(modules)), "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "rank_pattern": keep, "alpha_pattern": {}, "use_rslora": False,
              "use_dora": False, "lora_bias": False, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85,
              "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": 1}
  else:
    tensors, config = _other_tensors(plan, phi, path_to_module, common, theta0)
  if plan.trained:
    _trained_tensors(plan, phi, tensors, config, path_to_module)
  if rewritten_base == "keep" and base is not None and rewrites:
    extra_files["rewritten_base.safetensors"] = {
        _torch_name(p, path_to_module): np.ascontiguousarray(np.asarray(lazy.materialize(w)).T)
        for p, w in tree_lib.flatten_with_paths(base)
        if p in {q for q, _ in _adapter_items(phi)}}
  elif rewrites and rewritten_base == "keep" and name == "loftq":
    raise ValueError("save_peft_adapter: a LoftQ adapter kept as trained needs base= (the quantized base "
                     "it was trained against), written beside it as rewritten_base.safetensors")
  return tensors, config


def _mirror_items(phi: PyTree) -> list[tuple[str, Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(phi, is_leaf=lambda x: x is None or _is_adapter_leaf(x)
                                                   or (isinstance(x, dict) and _looks_like_leaf(x)))
  return [(tree_lib.path_str(p), x) for p, x in leaves]


def _looks_like_leaf(x: dict) -> bool:
  """A method's parameters at one leaf: a non-empty dict of arrays."""
  return bool(x) and all(hasattr(v, "shape") for v in x.values())


def _converted(plan: _Plan, phi: PyTree, theta0: PyTree, initial_phi: PyTree) -> PyTree:
  """``[A | A0] [B; -B0]`` per leaf (see :func:`save_peft_adapter`)."""
  if initial_phi is None:
    if theta0 is None:
      raise ValueError(
          f"save_peft_adapter: this adapter was initialised with init={plan.configs[0].init!r}, which "
          f"rewrote the base; writing it relative to the pretrained base (rewritten_base='convert', "
          f"peft's path_initial_model_for_weight_conversion) needs its initial A0 B0: pass theta0= (the "
          f"pretrained base; A0 B0 are re-derived) or initial_phi=; or rewritten_base='keep'")
    parts = []
    for c in plan.configs:
      r = registry.build_from(c)
      parts.append(lj_initialize(r, jax.random.key(0), theta0)[1])
    if len(parts) == 1:
      initial_phi = parts[0]
    else:
      initial_phi = jax.tree_util.tree_map(lambda *xs: next((x for x in xs if x is not None), None), *parts,
                                           is_leaf=lambda x: x is None or _is_adapter_leaf(x))

  def one(p, p0):
    if p is None:
      return None
    if p0 is None:
      raise ValueError("save_peft_adapter: initial_phi has no factors at a leaf phi adapts")
    return {"a": jnp.concatenate([p["a"], jnp.asarray(p0["a"], p["a"].dtype)], axis=-1),
            "b": jnp.concatenate([p["b"], -jnp.asarray(p0["b"], p["b"].dtype)], axis=-2)}
  return jax.tree_util.tree_map(one, phi, initial_phi, is_leaf=lambda x: x is None or _is_adapter_leaf(x))


def _other_tensors(plan: _Plan, phi, path_to_module, common, theta0) -> tuple[dict, dict]:
  """LoKr, LoHa, VeRA and IA3: each of our parameters is peft's ``<prefix><name>`` transposed."""
  name, first = plan.name, plan.configs[0]
  tensors: dict[str, np.ndarray] = {}
  modules, ff = [], []
  items = [(p, l) for p, l in _mirror_items(phi) if l is not None]
  prefix = {"lokr": "lokr_", "loha": "hada_", "vera": "vera_", "ia3": "ia3_l"}[name]
  for path, leaf in items:
    module = path_to_module(path)
    modules.append(module)
    for k, v in leaf.items():
      v = np.asarray(v)
      if name == "ia3":
        tensors[PREFIX + module + ".ia3_l"] = np.ascontiguousarray(v.reshape(1, -1) if k == "l_in" else v.reshape(-1, 1))
        if k == "l_in":
          ff.append(module)
      else:
        tensors[PREFIX + module + "." + prefix + k] = np.ascontiguousarray(v.T)
  if not items:
    raise ValueError(f"save_peft_adapter: phi holds no {name} parameters")
  targets = sorted(set(modules))
  if name in ("lokr", "loha"):
    module_of = {p: path_to_module(p) for p, _ in items}
    r, a, rp, ap = _patterns(plan, module_of, _mirror_items(phi))
    config = {**common, "peft_type": name.upper(), "r": r, "alpha": a, "rank_dropout": 0.0,
              "module_dropout": 0.0, "init_weights": True, "use_effective_conv2d": False,
              "target_modules": targets, "rank_pattern": rp, "alpha_pattern": ap, "exclude_modules": None}
    if name == "lokr":
      config.update(decompose_both=bool(first.decompose_both), decompose_factor=int(first.decompose_factor),
                    rank_dropout_scale=False)
  elif name == "vera":
    if first.projections is not None:
      a, b = first.projections
    elif theta0 is not None:
      a, b = vera_lib.shared_projections(first.key if first.key is not None else jax.random.key(0), theta0,
                                         first.where, first.rank, first.dtype)
    else:
      raise ValueError("save_peft_adapter: VeRA's frozen projections are drawn from its key for the selected "
                       "shapes; pass theta0= so they can be written (peft loads them with save_projection=True)")
    tensors["base_model.vera_A"] = np.ascontiguousarray(np.asarray(a).T)
    tensors["base_model.vera_B"] = np.ascontiguousarray(np.asarray(b).T)
    config = {**common, "peft_type": "VERA", "r": first.rank, "target_modules": targets,
              "projection_prng_key": 0, "save_projection": True, "vera_dropout": float(first.dropout),
              "d_initial": float(first.d_initial), "bias": "none", "fan_in_fan_out": False}
  else:
    config = {**common, "peft_type": "IA3", "target_modules": targets, "feedforward_modules": sorted(set(ff)),
              "fan_in_fan_out": False, "init_ia3_weights": True, "exclude_modules": None}
  return tensors, config


def _trained_tensors(plan: _Plan, phi, tensors, config, path_to_module) -> None:
  """Chained ``full`` entries: biases as peft's trained biases (``bias="all"`` when any is not
  beside an adapted kernel, else ``"lora_only"``), other leaves as ``modules_to_save``."""
  adapted = {p.rpartition("/")[0] for p, l in _mirror_items(phi) if l is not None}
  leaves = [(path, leaf) for trained in plan.trained for path, leaf in _mirror_items(trained) if leaf is not None]
  whole = {p.rpartition("/")[0] for p, _ in leaves if p.rpartition("/")[2] != "bias"}  # modules_to_save
  biases, saved = [], []
  for path, leaf in leaves:
    if set(leaf) != {"w"}:
      raise ValueError(f"save_peft_adapter: the full entry's phi at '{path}' is not {{'w': array}}")
    w = np.asarray(leaf["w"])
    torch_name = _torch_name(path, path_to_module)
    if path.endswith("/kernel"):
      w = w.T
    parent = path.rpartition("/")[0]
    if path.rpartition("/")[2] == "bias" and parent not in whole:
      lora_layer = parent in adapted and config["peft_type"] in ("LORA", "ADALORA")
      name = (PREFIX + torch_name[: -len(".bias")] + ".base_layer.bias") if lora_layer else PREFIX + torch_name
      biases.append(parent in adapted)
    else:
      if parent in adapted:
        raise NotImplementedError(f"save_peft_adapter: '{path}' is both adapted and fully trained; peft "
                                  f"cannot save a module both ways")
      saved.append(torch_name.rpartition(".")[0])
      name = PREFIX + torch_name
    tensors[name] = np.ascontiguousarray(w)
  if biases:
    if "bias" not in config:
      raise NotImplementedError(f"save_peft_adapter: {config['peft_type']} adapters have no trained biases in peft")
    config["bias"] = "lora_only" if all(biases) else "all"
  if saved:
    config["modules_to_save"] = sorted(set(saved))


def _expert_tensors(module: str, stack: dict[str, dict], tensors: dict) -> dict[str, int]:
  """Adds one layer's expert stacks to ``tensors`` in peft's ``ParamWrapper`` layout;
  returns ``{"mlp.experts.gate_up_proj" / "mlp.experts.down_proj": rank}`` written."""
  if set(stack) - {"gate_proj", "up_proj", "down_proj"} or (("gate_proj" in stack) != ("up_proj" in stack)):
    raise ValueError(f"{module}: expert stacks {sorted(stack)}; gate_proj and up_proj are fused in peft "
                     f"(adapt both or neither), down_proj alone is fine")
  pairs = []
  if "gate_proj" in stack:
    g, u = ({k: np.asarray(v) for k, v in stack[n].items()} for n in ("gate_proj", "up_proj"))
    if g["a"].shape == u["a"].shape and np.array_equal(g["a"], u["a"]):  # shared A: rank r
      a, b = g["a"], np.concatenate([g["b"], u["b"]], axis=-1)
    else:                                                                # block-diagonal B: rank r_g + r_u
      a = np.concatenate([g["a"], u["a"]], axis=-1)
      e, rg, f = g["b"].shape
      b = np.zeros((e, rg + u["b"].shape[1], 2 * f), g["b"].dtype)
      b[:, :rg, :f], b[:, rg:, f:] = g["b"], u["b"]
    pairs.append((_EXPERT_PARAMS[0], a, b))
  if "down_proj" in stack:
    pairs.append((_EXPERT_PARAMS[1], np.asarray(stack["down_proj"]["a"]), np.asarray(stack["down_proj"]["b"])))
  written = {}
  for j, (param, a, b) in enumerate(pairs):
    name = PREFIX + module + (".base_layer" if j == 0 and len(pairs) == 2 else "")
    e, d_in, r = a.shape
    tensors[name + ".lora_A.weight"] = np.ascontiguousarray(a.transpose(0, 2, 1).reshape(e * r, d_in))
    tensors[name + ".lora_B.weight"] = np.ascontiguousarray(b.transpose(2, 1, 0).reshape(b.shape[2], r * e))
    written[param] = r
  return written


def _adapter_items(phi: PyTree) -> list[tuple[str, dict]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      phi, is_leaf=lambda x: x is None or _is_adapter_leaf(x))
  return [(tree_lib.path_str(p), x) for p, x in leaves if x is not None]
