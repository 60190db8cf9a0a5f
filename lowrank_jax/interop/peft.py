"""Hugging Face PEFT adapter folders <-> ``(reparam, phi)``.

A PEFT adapter folder (``save_pretrained``) holds

* ``adapter_config.json``: the ``LoraConfig`` (``peft_type``, ``r``, ``lora_alpha``,
  ``use_rslora``, ``use_dora``, ``target_modules``, ... and any number of other keys,
  which a loader must tolerate);
* ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), with tensors named
  ``base_model.model.<module path>.<param>``: ``lora_A.weight`` ``[r, in]``,
  ``lora_B.weight`` ``[out, r]``, for DoRA ``lora_magnitude_vector`` ``[out]`` (no
  ``.weight``), for AdaLoRA ``lora_A`` / ``lora_E`` / ``lora_B`` (no ``.weight``).

Our LoRA ``phi`` leaf is ``{"a": lora_A.T [in, r], "b": lora_B.T [r, out]}`` (+ ``"m"``
for DoRA, the magnitude vector as is; ``{"a", "e", "b"}`` for AdaLoRA), at the tree
path of the adapted kernel. Module names map to tree paths by a user-supplied
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

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.interop import hf
from lowrank_jax.io import safetensors as st
from lowrank_jax.methods import adalora as adalora_lib, batched as batched_lib, dora as dora_lib, lora as lora_lib
from lowrank_jax.models import bert, families
from lowrank_jax.reparam import Reparam

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
]

PyTree = Any
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

_PARAM_RE = re.compile(
    r"^(?P<module>.+)\.(?P<param>lora_A\.weight|lora_B\.weight|lora_magnitude_vector|"
    r"lora_A|lora_B|lora_E)$")


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


def decoder_module_to_path(config) -> Callable[[str], str]:
  """peft module name -> our path for a decoder family (``config`` a ``DecoderConfig``).

  ``model.layers.{i}.self_attn.q_proj`` -> ``layers/layer_{i}/attention/q_proj/kernel``
  (every linear of the family's table, ``lm_head`` included); an expert ``ParamWrapper``
  (``model.layers.{i}.mlp.experts[.base_layer]``) -> the node ``layers/layer_{i}/mlp/experts``.
  """
  table = _decoder_linears(config)

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
  return module_to_path


def decoder_path_to_module(config) -> Callable[[str], str]:
  """Inverse of :func:`decoder_module_to_path` (expert stacks: the ``mlp.experts`` module)."""
  table = _decoder_linears(config)

  def path_to_module(path: str) -> str:
    m = _EXPERT_NODE.match(path)
    if m:
      return f"model.layers.{m.group(1)}.mlp.experts"
    for _, _, rx, theirs in table:
      m = rx.match(path)
      if m:
        return theirs.replace("{i}", m.group(1) if rx.groups else "")
    raise KeyError(f"no path -> module mapping for {path!r} in the {config.family} family")
  return path_to_module


# --------------------------------------------------------------------------- reading


def read_peft_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
  """``(config, {module: {param: array}})`` of an adapter folder, torch layouts as stored.

  ``param`` is ``lora_A``, ``lora_B``, ``lora_magnitude_vector`` or ``lora_E`` (the
  ``.weight`` suffix dropped). Works for any adapter of the LoRA family, including those
  this library cannot apply.
  """
  from safetensors.numpy import load_file
  folder = os.fspath(folder)
  cfg_path, w_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
  if not os.path.exists(w_path):
    if os.path.exists(os.path.join(folder, "adapter_model.bin")):
      raise ValueError(f"{folder} holds a legacy pickled adapter_model.bin; only safetensors "
                       f"adapters can be read without torch")
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
  with open(cfg_path) as f:
    config = json.load(f)
  modules: dict[str, dict[str, np.ndarray]] = {}
  for name, arr in load_file(w_path).items():
    if not name.startswith(PREFIX):
      raise ValueError(f"unexpected tensor name {name!r} in {w_path} (expected the prefix {PREFIX!r})")
    m = _PARAM_RE.match(name[len(PREFIX):])
    if m is None:
      raise ValueError(f"unsupported adapter tensor {name!r} in {w_path}; supported: lora_A.weight, "
                       f"lora_B.weight, lora_magnitude_vector, lora_E")
    param = m.group("param").replace(".weight", "")
    modules.setdefault(m.group("module"), {})[param] = arr
  return config, modules


class PeftAdapter(NamedTuple):
  """An imported adapter: apply with ``reparam.apply(theta0, phi)``; ``config`` is the
  ``adapter_config.json`` contents (kept for a faithful re-export)."""
  reparam: Reparam
  phi: PyTree
  config: dict


def _check_supported(config: dict) -> str:
  kind = config.get("peft_type")
  if kind not in ("LORA", "ADALORA"):
    raise NotImplementedError(f"peft_type {kind!r} is not supported (LORA, ADALORA)")
  if config.get("bias", "none") != "none" or config.get("lora_bias"):
    raise NotImplementedError(f"adapters with trained biases (bias={config.get('bias')!r}, "
                              f"lora_bias={config.get('lora_bias')}) are not supported")
  if config.get("modules_to_save"):
    raise NotImplementedError(f"modules_to_save={config['modules_to_save']} is not supported")
  if kind == "LORA" and (config.get("rank_pattern") or config.get("alpha_pattern")):
    # patterns that keep the scale (peft's own for fused expert stacks: r -> 2r, alpha -> 2 alpha)
    # give one reparam; the rank only sizes new factors, apply uses the tensors' own
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    root = (lambda x: x ** 0.5) if config.get("use_rslora") else (lambda x: x)
    rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for key in set(rp) | set(ap):
      rk, ak = int(rp.get(key, r)), float(ap.get(key, alpha))
      if abs(ak / root(rk) - alpha / root(r)) > 1e-9 * abs(alpha / root(r)):
        raise NotImplementedError(f"rank_pattern/alpha_pattern entry {key!r} (r={rk}, alpha={ak}) changes "
                                  f"the LoRA scale from {alpha / root(r)}; per-module scales are not supported")
  return kind


def load_peft_adapter(folder: str | os.PathLike, theta0: PyTree, *,
                      module_to_path: Callable[[str], str] = bert_module_to_path,
                      dtype=jnp.float32) -> PeftAdapter:
  """Imports a PEFT LoRA / DoRA / AdaLoRA adapter folder onto our parameter tree.

  Args:
    folder: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    theta0: the base parameters (arrays or ``jax.ShapeDtypeStruct``), used for the tree
      structure and to check every adapter shape against its kernel.
    module_to_path: peft module name -> our leaf path.
    dtype: dtype of the imported adapter arrays.

  Returns:
    A :class:`PeftAdapter` ``(reparam, phi, config)``; ``phi`` mirrors ``theta0`` with
    ``None`` at the leaves the adapter does not touch.
  """
  config, modules = read_peft_folder(folder)
  kind = _check_supported(config)
  use_dora = bool(config.get("use_dora"))
  items = tree_lib.flatten_with_paths(theta0)
  index = {p: i for i, (p, _) in enumerate(items)}
  leaves: list[Optional[dict]] = [None] * len(items)
  ranks = set()
  stacked = False
  for module, params in modules.items():
    path = module_to_path(module)
    if path not in index and any(p.startswith(path + "/") for p in index):  # an expert ParamWrapper
      if kind != "LORA" or use_dora:
        raise NotImplementedError(f"module {module!r}: only plain LoRA is supported on expert stacks")
      for leaf_path, leaf in _expert_leaves_from_peft(module, path, params, index, items, dtype).items():
        if leaves[index[leaf_path]] is not None:
          raise ValueError(f"module {module!r}: '{leaf_path}' is adapted twice")
        leaves[index[leaf_path]] = leaf
        ranks.add(int(leaf["a"].shape[-1]))
      stacked = True
      continue
    if path not in index:
      raise KeyError(f"adapter module {module!r} maps to path {path!r}, which is not in the base "
                     f"tree; paths near it: {[p for p in index if p.rsplit('/', 1)[0] == path.rsplit('/', 1)[0]]}")
    w = items[index[path]][1]
    leaf = _leaf_from_peft(kind, use_dora, module, path, params, tuple(w.shape), dtype)
    ranks.add(int(leaf["a"].shape[1]))
    leaves[index[path]] = leaf
  if not modules:
    raise ValueError(f"{folder} holds no adapter tensors")
  treedef = jax.tree_util.tree_structure(theta0, is_leaf=lazy.is_lazy)
  phi = jax.tree_util.tree_unflatten(treedef, leaves)
  mask = jax.tree_util.tree_unflatten(treedef, [l is not None for l in leaves])
  r = int(config.get("r", 0))
  leaf_ranks = {path: int(l["a"].shape[-1]) for (path, _), l in zip(items, leaves)
                if l is not None and "e" not in l and int(l["a"].shape[-1]) != r}
  return PeftAdapter(reparam=_reparam(kind, config, mask, ranks, stacked, leaf_ranks), phi=phi, config=config)


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


def _leaf_from_peft(kind, use_dora, module, path, params, shape, dtype) -> dict:
  expect = {"lora_A", "lora_B"} | ({"lora_E"} if kind == "ADALORA" else set()) | (
      {"lora_magnitude_vector"} if use_dora else set())
  if set(params) != expect:
    raise ValueError(f"module {module!r}: tensors {sorted(params)} but a {kind}"
                     f"{' (DoRA)' if use_dora else ''} adapter needs {sorted(expect)}")
  A, B = params["lora_A"], params["lora_B"]
  if len(shape) != 2:
    raise ValueError(f"module {module!r} -> '{path}': base leaf has shape {shape}, not a matrix")
  d_in, d_out = shape
  if A.ndim != 2 or B.ndim != 2 or A.shape[1] != d_in or B.shape[0] != d_out or A.shape[0] != B.shape[1]:
    raise ValueError(f"module {module!r} -> '{path}': lora_A {A.shape} [r, in] and lora_B {B.shape} "
                     f"[out, r] do not fit the kernel {shape} [in, out]")
  leaf = {"a": jnp.asarray(A.T, dtype), "b": jnp.asarray(B.T, dtype)}
  if kind == "ADALORA":
    leaf = {"a": leaf["a"], "e": jnp.asarray(params["lora_E"].reshape(-1), dtype), "b": leaf["b"]}
  if use_dora:
    m = params["lora_magnitude_vector"]
    if m.shape != (d_out,):
      raise ValueError(f"module {module!r} -> '{path}': lora_magnitude_vector {m.shape} != ({d_out},)")
    leaf["m"] = jnp.asarray(m, dtype)
  return leaf


def _reparam(kind: str, config: dict, mask: PyTree, ranks: set, stacked: bool = False,
             leaf_ranks: Optional[dict[str, int]] = None) -> Reparam:
  if kind == "ADALORA":
    init_r = int(config.get("init_r", 12))
    if config.get("rank_pattern") or ranks != {init_r}:
      raise NotImplementedError(
          f"AdaLoRA adapters resized by a rank_pattern (tensor ranks {sorted(ranks)}, init_r={init_r}) "
          f"are not supported; peft's scaling of resized modules depends on how they were loaded")
    return adalora_lib.adalora(mask, init_r=init_r, alpha=config.get("lora_alpha", 8))
  patterns = bool(config.get("rank_pattern") or config.get("alpha_pattern"))
  if len(ranks) != 1 and not patterns:
    raise NotImplementedError(f"adapter has several ranks {sorted(ranks)} without a rank_pattern")
  rank = int(config["r"]) if patterns else ranks.pop()
  if not patterns and rank != int(config.get("r", rank)):
    raise ValueError(f"adapter tensors have rank {rank} but adapter_config.json says r={config.get('r')}")
  kw = dict(rank=rank, alpha=config.get("lora_alpha", 8), rslora=bool(config.get("use_rslora")),
            dropout=float(config.get("lora_dropout") or 0.0))
  if stacked or (patterns and leaf_ranks):
    if kw.pop("dropout") or config.get("use_dora"):
      raise NotImplementedError("lora_dropout or DoRA with expert stacks or a rank_pattern")
    # the tensors' own ranks (rank_pattern, fused expert stacks) at the config's scale
    pattern = {"^" + re.escape(p) + "$": r for p, r in (leaf_ranks or {}).items()}
    return batched_lib.batched_lora(mask, **kw, rank_pattern=pattern)
  if config.get("use_dora"):
    return dora_lib.dora(mask, **kw)
  return lora_lib.lora(mask, **kw)


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


def save_peft_adapter(folder: str | os.PathLike, phi: PyTree, config: Optional[dict] = None, *,
                      rank: Optional[int] = None, alpha: Optional[float] = None,
                      use_rslora: bool = False,
                      path_to_module: Callable[[str], str] = bert_path_to_module,
                      base_model_name_or_path: Optional[str] = None,
                      overwrite: bool = False) -> None:
  """Writes ``phi`` as a PEFT adapter folder, atomically.

  Args:
    folder: target folder (must not exist unless ``overwrite``).
    phi: LoRA / DoRA / AdaLoRA parameters (``None`` holes); DoRA leaves carry ``"m"``.
    config: an ``adapter_config.json`` dict to write as is (e.g. from
      :func:`load_peft_adapter`); if ``None``, built by :func:`lora_config` from
      ``rank``, ``alpha``, ``use_rslora`` and the module names.
    rank, alpha, use_rslora: the LoRA hyper-parameters when ``config`` is ``None``.
    path_to_module: our leaf path -> peft module name.
    base_model_name_or_path: recorded in a generated config.
    overwrite: replace an existing folder.
  """
  from safetensors.numpy import save_file
  folder = os.path.abspath(os.fspath(folder))
  tensors: dict[str, np.ndarray] = {}
  modules = []
  dora = adalora = False
  experts: dict[str, dict[str, dict]] = {}
  for path, leaf in _adapter_items(phi):
    if np.ndim(leaf["a"]) == 3:  # an expert stack: written fused, per layer, below
      node, _, rest = path.rpartition("/mlp/experts/")
      experts.setdefault(node + "/mlp/experts", {})[rest.split("/")[0]] = leaf
      continue
    module = path_to_module(path)
    modules.append(module)
    base = PREFIX + module
    a, b = np.asarray(leaf["a"]), np.asarray(leaf["b"])
    if "e" in leaf:
      adalora = True
      tensors[base + ".lora_A"] = np.ascontiguousarray(a.T)
      tensors[base + ".lora_E"] = np.ascontiguousarray(np.asarray(leaf["e"]).reshape(-1, 1))
      tensors[base + ".lora_B"] = np.ascontiguousarray(b.T)
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
      raise ValueError("save_peft_adapter: pass the AdaLoRA config dict (init_r, target_r, ...)")
    ranks = {int(np.shape(l["a"])[-1]) for _, l in _adapter_items(phi)}
    if rank is None:
      if len(ranks) != 1:
        raise ValueError(f"phi has several ranks {sorted(ranks)}; pass rank= and a config with rank_pattern")
      rank = ranks.pop()
    alpha = rank if alpha is None else alpha
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
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  if os.path.exists(folder) and not overwrite:
    raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp_", dir=parent)
  try:
    save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.write("\n")
    st.replace_folder(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


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
