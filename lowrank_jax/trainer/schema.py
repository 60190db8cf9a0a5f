"""Typed parsing of JSON-style mappings into frozen dataclasses, with errors that name the key.

A config section is a frozen dataclass; :func:`parse` walks its fields (``typing`` hints:
``bool``, ``int``, ``float``, ``str``, ``Literal``, ``Optional``/unions, ``tuple[T, ...]``,
``dict``/``Mapping`` (free JSON), ``Any``, nested dataclasses) and checks, for every key:

* unknown keys: an error listing the valid keys, with a did-you-mean (:func:`did_you_mean`);
* types: ``bool`` is never an ``int``, an ``int`` is accepted for a ``float`` (and becomes one),
  floats must be finite;
* values: a field's ``metadata["check"] = (predicate, "must be ...")`` (see :func:`checked`).

Every error is a :class:`ConfigError` ``"<source>: <key>: <what is wrong>"``, ``source`` being
the config file. :func:`coerce_text` parses a ``--set key=value`` string by the type of the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from typing import Any, Callable, Literal, Mapping, Optional, Union

__all__ = ["ConfigError", "did_you_mean", "checked", "parse", "parse_value", "field_types",
           "coerce_text", "to_json"]


class ConfigError(ValueError):
  """A bad config: the message names the file (``source``) and the dotted key."""


def did_you_mean(name: str, choices) -> str:
  """``" did you mean 'x'?"`` for the closest of ``choices``, or ``""``."""
  close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
  return f" did you mean '{close[0]}'?" if close else ""


def unknown_key(source: str, key: str, name: str, valid) -> ConfigError:
  """The error for an unknown ``name`` at ``key`` among the ``valid`` keys."""
  where = f"{key}." if key else ""
  return ConfigError(f"{source}: unknown key '{where}{name}';{did_you_mean(name, valid)} "
                     f"valid keys{' of ' + key if key else ''}: {', '.join(sorted(valid))}")


def checked(default: Any, predicate: Callable[[Any], bool], message: str, **kw):
  """A dataclass field whose value (when not ``None``) must satisfy ``predicate``."""
  return dataclasses.field(default=default, metadata={"check": (predicate, message)}, **kw)


def field_types(cls) -> dict[str, Any]:
  """``{field name: resolved type}`` of a dataclass."""
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_union(tp) -> bool:
  return typing.get_origin(tp) in (Union, types.UnionType)


def _describe(tp) -> str:
  if tp is type(None):
    return "null"
  if _is_union(tp):
    return " or ".join(_describe(a) for a in typing.get_args(tp))
  if typing.get_origin(tp) is Literal:
    return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
  if dataclasses.is_dataclass(tp):
    return "an object"
  names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
           dict: "an object", tuple: "a list"}
  origin = typing.get_origin(tp) or tp
  if origin in (dict, Mapping, typing.get_origin(Mapping[str, Any])):
    return "an object"
  return names.get(origin, getattr(tp, "__name__", str(tp)))


def _bad(source: str, key: str, tp, raw) -> ConfigError:
  return ConfigError(f"{source}: {key}: expected {_describe(tp)}, got {json.dumps(raw, default=repr)} "
                     f"({type(raw).__name__})")


def _json_like(raw, source: str, key: str):
  """Checks that ``raw`` is plain JSON (dicts with string keys, lists, scalars)."""
  if isinstance(raw, Mapping):
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
      raise ConfigError(f"{source}: {key}: object keys must be strings, got {bad[0]!r}")
    return {k: _json_like(v, source, f"{key}.{k}") for k, v in raw.items()}
  if isinstance(raw, (list, tuple)):
    return [_json_like(v, source, f"{key}[{i}]") for i, v in enumerate(raw)]
  if isinstance(raw, float) and not math.isfinite(raw):
    raise ConfigError(f"{source}: {key}: {raw} is not a finite number")
  if raw is None or isinstance(raw, (bool, int, float, str)):
    return raw
  raise ConfigError(f"{source}: {key}: {raw!r} ({type(raw).__name__}) is not a JSON value")


def parse_value(tp, raw, source: str, key: str):
  """``raw`` (a JSON value) checked and converted to the type ``tp``."""
  origin = typing.get_origin(tp)
  if tp is Any:
    return _json_like(raw, source, key)
  if dataclasses.is_dataclass(tp):
    return parse(tp, raw, source, key)
  if _is_union(tp):
    args = typing.get_args(tp)
    if raw is None:
      if type(None) in args:
        return None
      raise _bad(source, key, tp, raw)
    options = [a for a in args if a is not type(None)]
    errors = []
    for a in options:
      try:
        return parse_value(a, raw, source, key)
      except ConfigError as e:
        errors.append(e)
    if len(options) == 1 or any(dataclasses.is_dataclass(a) for a in options):
      raise errors[0]
    raise _bad(source, key, tp, raw)
  if origin is Literal:
    for a in typing.get_args(tp):
      if raw == a and type(raw) is type(a):
        return a
    raise ConfigError(f"{source}: {key}: {json.dumps(raw, default=repr)} is not "
                      f"{_describe(tp)}{did_you_mean(raw, typing.get_args(tp))}")
  if tp is bool:
    if isinstance(raw, bool):
      return raw
    raise _bad(source, key, tp, raw)
  if tp is int:
    if isinstance(raw, int) and not isinstance(raw, bool):
      return int(raw)
    raise _bad(source, key, tp, raw)
  if tp is float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
      if not math.isfinite(raw):
        raise ConfigError(f"{source}: {key}: {raw} is not a finite number")
      return float(raw)
    raise _bad(source, key, tp, raw)
  if tp is str:
    if isinstance(raw, str):
      return raw
    raise _bad(source, key, tp, raw)
  if origin is tuple:
    if not isinstance(raw, (list, tuple)):
      raise _bad(source, key, tp, raw)
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(parse_value(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(raw))
    if len(args) != len(raw):
      raise ConfigError(f"{source}: {key}: expected a list of {len(args)} items, got {len(raw)}")
    return tuple(parse_value(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, raw)))
  if origin in (dict, typing.get_origin(Mapping[str, Any])) or tp in (dict, Mapping):
    if not isinstance(raw, Mapping):
      raise _bad(source, key, tp, raw)
    return _json_like(raw, source, key)
  raise TypeError(f"schema: unsupported field type {tp!r} at {key}")  # a bug in a config class


def parse(cls, raw, source: str, key: str = "", *, overrides: Optional[Mapping[str, Any]] = None):
  """An instance of the dataclass ``cls`` from the mapping ``raw``.

  Args:
    cls: a (frozen) dataclass; fields without a default are required.
    raw: a mapping of JSON values (``None`` means ``{}``).
    source: the file the mapping came from, for error messages.
    key: the dotted key of this section (``""`` at the top).
    overrides: already-parsed values for some fields (custom-parsed by the caller).

  Raises:
    ConfigError: naming ``source`` and the dotted key of the first problem.
  """
  if raw is None:
    raw = {}
  if not isinstance(raw, Mapping):
    raise ConfigError(f"{source}: {key or 'the config'}: expected an object, got "
                      f"{json.dumps(raw, default=repr)}")
  types_ = field_types(cls)
  unknown = [k for k in raw if k not in types_]
  if unknown:
    raise unknown_key(source, key, unknown[0], types_)
  values = {}
  overrides = overrides or {}
  for f in dataclasses.fields(cls):
    sub = f"{key}.{f.name}" if key else f.name
    if f.name in overrides:
      values[f.name] = overrides[f.name]
      continue
    if f.name not in raw:
      if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        raise ConfigError(f"{source}: missing required key '{sub}' ({_describe(types_[f.name])})")
      continue
    value = parse_value(types_[f.name], raw[f.name], source, sub)
    check = f.metadata.get("check")
    if check is not None and value is not None and not check[0](value):
      raise ConfigError(f"{source}: {sub}: {json.dumps(value, default=repr)} {check[1]}")
    values[f.name] = value
  try:
    return cls(**values)
  except (TypeError, ValueError) as e:  # a __post_init__ check of the section
    raise ConfigError(f"{source}: {key or 'the config'}: {e}") from e


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def coerce_text(tp, text: str, source: str, key: str):
  """A ``--set`` value string as the JSON value that ``tp`` expects.

  Strings stay strings (``null`` is ``None`` where the type allows it), numbers and booleans
  are read by their type (``true``/``false``, ``yes``/``no``, ``1``/``0``), lists, objects
  and untyped values as JSON (falling back to the plain string for untyped values).
  """
  if _is_union(tp):
    args = typing.get_args(tp)
    if text.strip() == "null" and type(None) in args:
      return None
    # numbers and booleans before strings, so "8" is 8 for ``int | str``
    for a in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
      try:
        value = coerce_text(a, text, source, key)
        parse_value(a, value, source, key)
        return value
      except ConfigError:
        continue
    raise ConfigError(f"{source}: {key}: cannot read {text!r} as {_describe(tp)}")
  if typing.get_origin(tp) is Literal:
    for a in typing.get_args(tp):
      if str(a).lower() == text.strip().lower() or json.dumps(a) == text.strip():
        return a
    raise ConfigError(f"{source}: {key}: {text!r} is not {_describe(tp)}"
                      f"{did_you_mean(text, typing.get_args(tp))}")
  if tp is str:
    return text
  if tp is bool:
    t = text.strip().lower()
    if t in _TRUE or t in _FALSE:
      return t in _TRUE
    raise ConfigError(f"{source}: {key}: expected true or false, got {text!r}")
  if tp is int:
    try:
      return int(text.strip().replace("_", ""))
    except ValueError:
      raise ConfigError(f"{source}: {key}: expected an integer, got {text!r}") from None
  if tp is float:
    try:
      return float(text.strip())
    except ValueError:
      raise ConfigError(f"{source}: {key}: expected a number, got {text!r}") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    if tp is Any:
      return text
    raise ConfigError(f"{source}: {key}: expected {_describe(tp)} as JSON, got {text!r}") from None


def to_json(value):
  """A config value as plain JSON (dataclasses to dicts, tuples to lists)."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, Mapping):
    return {str(k): to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v) for v in value]
  return value
