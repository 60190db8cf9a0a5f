"""Typed configs of the PEFT methods: every factory records what it built, as data.

    @configured("lora")
    def lora(where, rank: int = 8, alpha: Optional[float] = None, ...) -> Reparam: ...

    r = lora("(query|value)/kernel", 8, alpha=16)
    r.config            # LoraConfig(where='(query|value)/kernel', rank=8, alpha=16.0, ...)
    lora.config_cls     # the frozen dataclass of lora's parameters

:func:`configured` derives a frozen dataclass (a :class:`MethodConfig`) from the factory's
signature once (the parameter names, defaults and annotations, ``where`` included), so that
it cannot drift from the factory. On every call it binds the arguments (positional ones
too), validates them into that config and returns the factory's :class:`Reparam` with the
config recorded (``Reparam.config``): a method called directly (``lj.lora(...)``) carries
the same config as one built by :mod:`lowrank_jax.methods.registry`, which reads
``factory.config_cls``. A factory that calls another configured factory internally (LoRA's
bias modes chain ``full``) records its own config: the outermost call's config wins.

The config validates on construction: an unknown key is an error listing the valid keys
with the closest match, a missing required key an error naming it, a value of the wrong
type an error naming the key and the expected type (all :class:`ConfigError`). Values are
converted where the type asks for it (what JSON cannot say): lists to tuples, ints to
floats, dtype names to dtypes, GLoRA's ``[A, B, C, D, E]`` lists to its ``LayerConfig``.
The factory is called with the converted values, so a direct call and a registry build
run the same code on the same values.

This module sits below every method (``lowrank_jax/_layers.py``) and imports none.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import inspect
import re
import typing
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Optional, TypeVar, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import tree as tree_lib

__all__ = ["ConfigError", "MethodConfig", "DType", "WhereSpec", "configured", "config_class"]


class ConfigError(ValueError):
  """A method name or configuration that does not match the method's parameters."""


# ---------------------------------------------------------------------------------------------
# Types of the config fields: the factories' annotations, plus two that annotations do not say.


class DType:
  """Field type of a dtype parameter: a dtype or its name (``"bfloat16"``), stored as a
  ``numpy.dtype``."""


class WhereSpec:
  """Field type of a leaf selection (:data:`lowrank_jax.tree.Where`): a regex, a sequence of
  regexes, a predicate ``(path, leaf) -> bool``, a :class:`~lowrank_jax.tree.Siblings`, a
  boolean mask pytree or ``None`` (every leaf)."""


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


def _is_bool(x) -> bool:
  return isinstance(x, (bool, np.bool_)) or (isinstance(x, (np.ndarray, jax.Array))
                                             and x.shape == () and x.dtype == np.bool_)


def _where(value):
  """A leaf selection checked (regexes compiled) and normalised (a list of regexes -> tuple)."""
  if value is None or callable(value) or isinstance(value, (tree_lib.Siblings, Mapping)):
    return value
  if isinstance(value, str):
    _regex(value)
    return value
  if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
    for v in value:
      _regex(v)
    return tuple(value)
  # any other pytree is a mask: every leaf a boolean (e.g. a list- or tuple-structured tree's)
  leaves, treedef = jax.tree_util.tree_flatten(value)
  if not jax.tree_util.treedef_is_leaf(treedef) and leaves and all(_is_bool(x) for x in leaves):
    return value
  raise _Mismatch


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
    return _where(value)
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
  raise TypeError(f"config: cannot check values against the type {tp!r}")


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

  def as_kwargs(self) -> dict[str, Any]:
    """``{parameter: value}``: the factory's keyword arguments."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _field_type(factory: Callable, name: str, param: inspect.Parameter, hints: Mapping[str, Any]):
  tp = hints.get(name, inspect.Parameter.empty)
  if tp == tree_lib.Where:
    return WhereSpec
  if tp is inspect.Parameter.empty:  # the factories leave only dtype arguments unannotated
    if not name.endswith("dtype"):
      raise TypeError(f"config: {factory.__name__}({name}=...) has no type annotation")
    return Optional[DType] if param.default is None else DType
  return tp


def config_class(name: str, factory: Callable) -> type:
  """The frozen dataclass of ``factory``'s parameters (keyword-only, the factory's defaults),
  a :class:`MethodConfig` whose ``method_name`` is ``name``. Its ``__init__`` checks the keys
  first: unknown ones with a did-you-mean, missing ones."""
  hints = typing.get_type_hints(factory)
  fields, required = [], []
  for pname, p in inspect.signature(factory).parameters.items():
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      raise TypeError(f"config: {factory.__name__} takes *{pname}; a config needs named parameters")
    tp = _field_type(factory, pname, p, hints)
    if p.default is p.empty:
      fields.append((pname, tp))
      required.append(pname)
    else:
      fields.append((pname, tp, dataclasses.field(default=p.default)))
  cls_name = "".join(part.capitalize() for part in name.split("_")) + "Config"
  cls = dataclasses.make_dataclass(cls_name, fields, bases=(MethodConfig,), frozen=True, kw_only=True,
                                   namespace={"method_name": name, "__module__": factory.__module__})
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


F = TypeVar("F", bound=Callable)


def configured(name: str) -> Callable[[F], F]:
  """Decorator of a method factory ``(**params) -> Reparam`` registered as ``name``.

  The returned function has the factory's signature, docstring and ``__name__``
  (``functools.wraps``) and an attribute ``config_cls`` (:func:`config_class`). A call binds
  its arguments (positional ones by the factory's order) into a ``config_cls`` (raising
  :class:`ConfigError` naming the key for a bad one), calls the factory with the validated
  values and returns its reparam with ``config`` recorded (``Reparam.with_config``).
  """

  def decorate(factory: F) -> F:
    cls = config_class(name, factory)
    positional = [p.name for p in inspect.signature(factory).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @functools.wraps(factory)
    def call(*args, **kwargs):
      if len(args) > len(positional):
        raise TypeError(f"{factory.__name__}() takes {len(positional)} positional argument(s) "
                        f"({', '.join(positional)}) but {len(args)} were given")
      for pname, value in zip(positional, args):
        if pname in kwargs:
          raise TypeError(f"{factory.__name__}() got multiple values for argument {pname!r}")
        kwargs[pname] = value
      config = cls(**kwargs)
      return factory(**config.as_kwargs()).with_config(config)

    call.config_cls = cls
    return typing.cast(F, call)

  return decorate
