"""The method registry: one :class:`MethodSpec` per PEFT method, the one list that configs,
the benchmark, the README's method table and the tests read.

    from lowrank_jax.methods import registry
    r = registry.build("lora", where=r"(query|value)/kernel", rank=8, alpha=16)
    cfg = registry.parse("lora", {"where": "(query|value)/kernel", "rank": 8})  # e.g. from JSON
    r = registry.build_from(cfg)
    r = registry.chain_from([{"name": "lora", "where": "(query|value)/kernel", "rank": 8},
                             {"name": "full", "where": "^head/"}])

Each method's ``config_cls`` is a frozen dataclass derived from its factory's signature
(the parameter names, defaults and annotations, ``where`` included), so that it cannot
drift from the factory. It validates on construction: an unknown key is an error listing
the valid keys with the closest match, a missing required key an error naming it, a value
of the wrong type an error naming the key and the expected type (all :class:`ConfigError`).
JSON values are converted where the type asks for it: lists to tuples, ints to floats,
dtype names to dtypes, GLoRA's ``[A, B, C, D, E]`` lists to its ``LayerConfig``.

Codecs (``lowrank_jax.quant``) and optimizers (``lowrank_jax.optim``) are not methods:
they have their own registries.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import inspect
import re
import typing
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import tree as tree_lib
from lowrank_jax.methods.adalora import adalora
from lowrank_jax.methods.adapters import bottleneck_adapters
from lowrank_jax.methods.batched import batched_lora
from lowrank_jax.methods.dora import dora
from lowrank_jax.methods.full import full
from lowrank_jax.methods.glora import glora
from lowrank_jax.methods.ia3 import ia3
from lowrank_jax.methods.l4q import l4q
from lowrank_jax.methods.loftq import loftq
from lowrank_jax.methods.loha import loha
from lowrank_jax.methods.lokr import lokr
from lowrank_jax.methods.lora import lora
from lowrank_jax.methods.prefix import prefix_reparam
from lowrank_jax.methods.qalora import qalora
from lowrank_jax.methods.said import intrinsic_said
from lowrank_jax.methods.vera import vera
from lowrank_jax.reparam import Reparam, chain

__all__ = ["ConfigError", "MethodConfig", "MethodSpec", "METHODS", "get", "build", "parse",
           "build_from", "chain_from", "as_dict", "markdown_table"]


class ConfigError(ValueError):
  """A method name or configuration that does not match the registry."""


# ---------------------------------------------------------------------------------------------
# Types of the config fields: the factories' annotations, plus two that annotations do not say.


class DType:
  """Field type of a dtype parameter: a dtype or its name (``"bfloat16"``), stored as a
  ``numpy.dtype``."""


class WhereSpec:
  """Field type of a leaf selection (:data:`lowrank_jax.tree.Where`): a regex, a sequence of
  regexes, a predicate ``(path, leaf) -> bool``, a :class:`~lowrank_jax.tree.Siblings`, a mask
  mapping or ``None`` (every leaf)."""


def _type_name(tp) -> str:
  """``tp`` in words, for error messages."""
  if tp is Any:
    return "anything"
  if tp is jax.Array:
    return "jax.Array"
  if tp is DType:
    return "a dtype or dtype name"
  if tp is WhereSpec:
    return "a regex, a list of regexes, a predicate (path, leaf) -> bool, Siblings, a mask or None"
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is Union:
    return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
  if origin is Literal:
    return "one of " + ", ".join(repr(a) for a in args)
  if origin in (collections.abc.Callable,):
    return "a callable"
  if origin is not None:
    inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
    return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
  return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
  pass


def _conform(value, tp):
  """``value`` checked against ``tp`` and converted where JSON cannot say it (list -> tuple,
  int -> float, dtype name -> dtype, list -> NamedTuple). Raises :class:`_Mismatch`."""
  if tp is Any:
    return value
  if tp is DType:
    if value is None or isinstance(value, bool):
      raise _Mismatch
    try:
      return jnp.dtype(value)
    except TypeError as e:
      raise _Mismatch from e
  if tp is WhereSpec:
    if value is None or callable(value) or isinstance(value, (tree_lib.Siblings, Mapping)):
      return value
    if isinstance(value, str):
      _regex(value)
      return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
      for v in value:
        _regex(v)
      return tuple(value)
    raise _Mismatch
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is Union:
    for a in args:
      try:
        return _conform(value, a)
      except _Mismatch:
        pass
    raise _Mismatch
  if origin is Literal:
    if any(value == a and type(value) is type(a) for a in args):
      return value
    raise _Mismatch
  if tp is type(None):
    if value is None:
      return value
    raise _Mismatch
  if tp is bool:
    if isinstance(value, (bool, np.bool_)):
      return bool(value)
    raise _Mismatch
  if tp is int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
      return int(value)
    raise _Mismatch
  if tp is float:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
      return float(value)
    raise _Mismatch
  if tp is str:
    if isinstance(value, str):
      return value
    raise _Mismatch
  if origin is collections.abc.Callable or tp is Callable:
    if callable(value):
      return value
    raise _Mismatch
  if isinstance(tp, type) and issubclass(tp, tuple) and hasattr(tp, "_fields"):  # NamedTuple
    if isinstance(value, tp):
      return value
    if isinstance(value, (list, tuple)) and len(value) == len(tp._fields):
      return tp(*value)
    raise _Mismatch
  if origin in (collections.abc.Mapping, dict):
    if not isinstance(value, Mapping):
      raise _Mismatch
    kt, vt = args or (Any, Any)
    return {_conform(k, kt): _conform(v, vt) for k, v in value.items()}
  if origin in (collections.abc.Sequence, list, tuple):
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
      raise _Mismatch
    if origin is tuple and args and args[-1] is not Ellipsis:
      if len(value) != len(args):
        raise _Mismatch
      return tuple(_conform(v, a) for v, a in zip(value, args))
    elt = args[0] if args else Any
    return tuple(_conform(v, elt) for v in value)
  if isinstance(tp, type):
    if isinstance(value, tp):
      return value
    raise _Mismatch
  raise TypeError(f"registry: cannot check values against the type {tp!r}")


def _regex(s: str) -> None:
  try:
    re.compile(s)
  except re.error as e:
    raise _Mismatch(f"invalid regex {s!r}: {e}") from e


def _did_you_mean(key: str, valid: Iterable[str]) -> str:
  close = difflib.get_close_matches(key, list(valid), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# Config classes


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """Base of every method's config class; ``method_name`` is its registry name."""
  method_name: ClassVar[str] = ""

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      try:
        object.__setattr__(self, f.name, _conform(value, f.type))
      except _Mismatch as e:
        why = f" ({e})" if str(e) else ""
        raise ConfigError(f"{self.method_name}: parameter {f.name!r} must be {_type_name(f.type)}, "
                          f"got {type(value).__name__} {value!r}{why}") from None


def _field_type(factory: Callable, name: str, param: inspect.Parameter, hints: Mapping[str, Any]):
  tp = hints.get(name, inspect.Parameter.empty)
  if tp == tree_lib.Where:
    return WhereSpec
  if tp is inspect.Parameter.empty:  # the factories leave only dtype arguments unannotated
    if not name.endswith("dtype"):
      raise TypeError(f"registry: {factory.__name__}({name}=...) has no type annotation")
    return Optional[DType] if param.default is None else DType
  return tp


def _config_class(name: str, factory: Callable) -> type:
  """The frozen dataclass of ``factory``'s parameters (keyword-only, the factory's defaults).
  Its ``__init__`` checks the keys first: unknown ones with a did-you-mean, missing ones."""
  hints = typing.get_type_hints(factory)
  fields, required = [], []
  for pname, p in inspect.signature(factory).parameters.items():
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      raise TypeError(f"registry: {factory.__name__} takes *{pname}; a config needs named parameters")
    tp = _field_type(factory, pname, p, hints)
    if p.default is p.empty:
      fields.append((pname, tp))
      required.append(pname)
    else:
      fields.append((pname, tp, dataclasses.field(default=p.default)))
  cls_name = "".join(part.capitalize() for part in name.split("_")) + "Config"
  cls = dataclasses.make_dataclass(cls_name, fields, bases=(MethodConfig,), frozen=True, kw_only=True,
                                   namespace={"method_name": name, "__module__": __name__})
  cls.__doc__ = f"Hyper-parameters of ``{factory.__name__}`` (registry name ``{name!r}``)."
  names = [f[0] for f in fields]
  dataclass_init = cls.__init__

  @functools.wraps(dataclass_init)
  def __init__(self, **params):
    for key in params:
      if key not in names:
        raise ConfigError(f"{name}: unknown parameter {key!r}{_did_you_mean(key, names)}; "
                          f"valid parameters: {', '.join(names)}")
    missing = [k for k in required if k not in params]
    if missing:
      raise ConfigError(f"{name}: missing required parameter(s) {', '.join(map(repr, missing))}")
    dataclass_init(self, **params)

  cls.__init__ = __init__
  return cls


# ---------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """One PEFT method.

  Attributes:
    name: registry name (what configs say).
    factory: ``factory(**params) -> Reparam``.
    config_cls: frozen dataclass of ``factory``'s parameters (``where`` included).
    call: the public call, ``"lj.<factory name>"``.
    paper: arXiv ids.
    reference: what the tests compare it with.
    lazy_matmul: how our models multiply its weights without forming them ("" if they don't).
    test_file: the test module, relative to the repository root.
    title: the method in words (the README row).
    extras: other public calls of the method (e.g. ``"lj.glora_search"``).
  """
  name: str
  factory: Callable[..., Reparam]
  config_cls: type
  call: str
  paper: tuple[str, ...]
  reference: str
  lazy_matmul: str
  test_file: str
  title: str = ""
  extras: tuple[str, ...] = ()


def _spec(name: str, factory: Callable[..., Reparam], *, title: str, paper: tuple[str, ...] = (),
          reference: str, lazy_matmul: str = "", test_file: str, extras: tuple[str, ...] = ()) -> MethodSpec:
  return MethodSpec(name=name, factory=factory, config_cls=_config_class(name, factory),
                    call=f"lj.{factory.__name__}", paper=paper, reference=reference,
                    lazy_matmul=lazy_matmul, test_file=test_file, title=title, extras=extras)


_SPECS = [
    _spec("lora", lora,
          title="LoRA, rsLoRA (Kaiming/Gaussian/PiSSA/OLoRA init, dropout, bias none/all/lora_only)",
          paper=("2106.09685", "2312.03732", "2404.02948", "2406.01775"),
          reference="peft grads, peft run, dense SVD/QR",
          lazy_matmul='`x W0 + s(xA)B`, or `matmul="merged"`', test_file="tests/methods/test_lora.py"),
    _spec("dora", dora, title="DoRA", paper=("2402.09353",),
          reference="peft single layer + MiniLM (outputs, all grads)", lazy_matmul="factored column norm",
          test_file="tests/methods/test_dora.py"),
    _spec("lokr", lokr, title="KronA / LoKr (plain, decomposed)", paper=("2212.10650",),
          reference="peft, `rank(A⊗B)=rank A·rank B`", lazy_matmul="reshape identity",
          test_file="tests/methods/test_lokr.py"),
    _spec("loha", loha, title="LoHa", paper=("2108.06098",), reference="peft",
          lazy_matmul="Khatri-Rao factors", test_file="tests/methods/test_loha.py"),
    _spec("glora", glora, title="GLoRA + evolutionary config search", paper=("2306.07967",),
          reference="peft; synthetic search", lazy_matmul="`(x W0)(1+A) + xB` (low-rank `A` dense)",
          test_file="tests/methods/test_glora.py", extras=("lj.glora_search",)),
    _spec("adalora", adalora, title="AdaLoRA (SVD triplets, orth. regulariser, budgeted rank allocator)",
          paper=("2303.10512",), reference="peft grads + peft's RankAllocator step by step",
          lazy_matmul="`x W0 + s(x Q^T Λ)P`", test_file="tests/methods/test_adalora.py",
          extras=("lj.rank_allocator",)),
    _spec("vera", vera, title="VeRA", paper=("2310.11454",), reference="peft",
          lazy_matmul="`x W0 + ((xA)λ_d)Bλ_b`", test_file="tests/methods/test_vera.py"),
    _spec("ia3", ia3, title="IA3", paper=("2205.05638",), reference="peft",
          lazy_matmul="`(x W0)⊙l` or `(x⊙l) W0`", test_file="tests/methods/test_ia3.py"),
    _spec("intrinsic_said", intrinsic_said, title="Intrinsic SAID / DID (Fastfood via FWHT, O(D) memory)",
          paper=("2012.13255",), reference="dense Hadamard/Fastfood matrices",
          test_file="tests/methods/test_said.py"),
    _spec("bottleneck_adapters", bottleneck_adapters, title="Bottleneck adapters (Houlsby / Pfeiffer)",
          paper=("1902.00751", "2005.00247"),
          reference="float64 numpy BERT / Llama with hand-written adapters",
          test_file="tests/methods/test_adapters.py"),
    _spec("prefix_tuning", prefix_reparam,
          title="Prefix tuning (+ MLP reparametrisation, peft PrefixEncoder layout)", paper=("2101.00190",),
          reference="float64 numpy BERT / Llama over concatenated K/V",
          test_file="tests/methods/test_prefix.py", extras=("lj.prefix_tuning",)),
    _spec("full", full, title="Full fine-tuning of selected leaves",
          reference="the selected leaves are `phi`",
          test_file="tests/methods/test_full.py"),
    _spec("loftq", loftq, title="LoftQ (LoRA on a quantized base, alternating init)", paper=("2310.08659",),
          reference="error decreases with T, beats plain quantization",
          lazy_matmul="`x Q + s(xA)B`, `Q` decoded in the matmul", test_file="tests/quant/test_loftq.py"),
    _spec("qalora", qalora, title="QA-LoRA (group-pooled adapter, merge stays int4)", paper=("2309.14717",),
          reference="merged output equals unmerged", lazy_matmul="`x W_q + s(pool(x)A)B`",
          test_file="tests/quant/test_qalora.py", extras=("lj.qalora_merge",)),
    _spec("l4q", l4q, title="L4Q (QAT of the merged weight, learned per-group step/zero, STE/LSQ; "
          "int4 deploy = training forward)", paper=("2402.04902",),
          reference="float64 numpy STE/LSQ grads, affine init, deploy equality",
          lazy_matmul="- (merged, fake-quantized)", test_file="tests/quant/test_l4q.py",
          extras=("lj.l4q_merge",)),
    _spec("batched_lora", batched_lora,
          title="LoRA per expert of `[E, in, out]` stacks (MoE; peft `target_parameters`)",
          paper=("2106.09685",), reference="dense per-expert formula, through the grouped expert matmul",
          lazy_matmul="`ragged(x,W0) + s ragged(ragged(x,A),B)`", test_file="tests/methods/test_batched.py",
          extras=("lj.batched",)),
]

METHODS: Mapping[str, MethodSpec] = {s.name: s for s in _SPECS}
_BY_CONFIG = {s.config_cls: s for s in _SPECS}


def get(name: str) -> MethodSpec:
  """The :class:`MethodSpec` registered as ``name``.

  Raises:
    ConfigError: unknown name (the message lists the registered ones, with the closest).
  """
  if name not in METHODS:
    raise ConfigError(f"unknown method {name!r}{_did_you_mean(name, METHODS)}; "
                      f"registered methods: {', '.join(METHODS)}")
  return METHODS[name]


def parse(name: str, params: Mapping[str, Any]) -> MethodConfig:
  """The validated config of method ``name`` from a mapping of its parameters (e.g. JSON)."""
  if not isinstance(params, Mapping):
    raise ConfigError(f"{name}: parameters must be a mapping, got {type(params).__name__}")
  bad = [k for k in params if not isinstance(k, str)]
  if bad:
    raise ConfigError(f"{name}: parameter names must be strings, got {bad!r}")
  return get(name).config_cls(**params)


def build_from(config: MethodConfig) -> Reparam:
  """The :class:`Reparam` of a config made by :func:`parse` (or the config class itself),
  with ``config`` recorded as its ``Reparam.config``."""
  spec = _BY_CONFIG.get(type(config))
  if spec is None:
    raise ConfigError(f"build_from expects a registry method config, got {type(config).__name__}")
  reparam = spec.factory(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
  return reparam._replace(config=config)  # the reparam carries its own config (Reparam.config)


def build(name: str, **params) -> Reparam:
  """``build_from(parse(name, params))``: the validated method ``name``."""
  return build_from(parse(name, params))


def chain_from(items: Sequence[Union[Mapping[str, Any], MethodConfig]]) -> Reparam:
  """The :func:`~lowrank_jax.chain` of several methods, each ``{"name": NAME, **params}``
  or a config instance, in order."""
  if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence) or not items:
    raise ConfigError(f"chain_from expects a non-empty list of methods, got {items!r}")
  reparams = []
  for i, item in enumerate(items):
    if isinstance(item, MethodConfig):
      reparams.append(build_from(item))
      continue
    if not isinstance(item, Mapping) or "name" not in item:
      raise ConfigError(f"chain_from: item {i} must be a config or a mapping with a 'name' key, got {item!r}")
    params = dict(item)
    reparams.append(build_from(parse(params.pop("name"), params)))
  return chain(*reparams)


def as_dict(config: MethodConfig) -> dict[str, Any]:
  """``{"name": NAME, **params}`` with dtypes as their names: the inverse of
  :func:`chain_from`'s items and of :func:`parse` (for JSON-able parameters)."""
  out = {"name": config.method_name}
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    if isinstance(v, np.dtype):
      v = v.name
    elif isinstance(v, tuple) and not hasattr(v, "_fields"):
      v = list(v)
    out[f.name] = v
  return out


def markdown_table() -> str:
  """The README's method table (``tests/methods/test_registry.py`` checks that it is there)."""
  lines = ["| method | name | call | paper | reference in tests | lazy matmul |",
           "|---|---|---|---|---|---|"]
  for s in METHODS.values():
    calls = ", ".join(f"`{c}`" for c in (s.call,) + s.extras)
    lines.append(f"| {s.title} | `{s.name}` | {calls} | {', '.join(s.paper)} | {s.reference} | "
                 f"{s.lazy_matmul or '-'} |")
  return "\n".join(lines)

