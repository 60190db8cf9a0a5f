"""The method registry: one :class:`MethodSpec` per PEFT method, the one list that configs,
the benchmark, the README's method table and the tests read.

    from lowrank_jax.methods import registry
    r = registry.build("lora", where=r"(query|value)/kernel", rank=8, alpha=16)
    cfg = registry.parse("lora", {"where": "(query|value)/kernel", "rank": 8})  # e.g. from JSON
    r = registry.build_from(cfg)
    r = registry.chain_from([{"name": "lora", "where": "(query|value)/kernel", "rank": 8},
                             {"name": "full", "where": "^head/"}])

Each method's ``config_cls`` is its factory's (``factory.config_cls``): a frozen dataclass
derived from the factory's signature by :func:`lowrank_jax.methods._config.configured`, the
one config type, recorded as ``Reparam.config`` whether the factory is called directly
(``lj.lora(...)``) or built here. It validates on construction: an unknown key is an error
listing the valid keys with the closest match, a missing required key an error naming it, a
value of the wrong type an error naming the key and the expected type (all
:class:`ConfigError`). JSON values are converted where the type asks for it: lists to tuples,
ints to floats, dtype names to dtypes, GLoRA's ``[A, B, C, D, E]`` lists to its ``LayerConfig``.

Codecs (``lowrank_jax.quant``) and optimizers (``lowrank_jax.optim``) are not methods:
they have their own registries.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from lowrank_jax.methods._config import (  # DType, WhereSpec: re-exported (their old home)
    ConfigError, DType, MethodConfig, WhereSpec, _did_you_mean)
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
from lowrank_jax.reparam import PerModule, Reparam, chain, per_module

__all__ = ["ConfigError", "MethodConfig", "MethodSpec", "METHODS", "get", "build", "parse",
           "build_from", "chain_from", "as_dict", "describe", "from_description", "markdown_table"]


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
  config_cls = getattr(factory, "config_cls", None)
  if config_cls is None or config_cls.method_name != name:
    raise TypeError(f"registry: {factory.__name__} must be decorated with @configured({name!r})")
  return MethodSpec(name=name, factory=factory, config_cls=config_cls,
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
  return spec.factory(**config.as_kwargs()).with_config(config)  # this very config object


def build(name: str, **params) -> Reparam:
  """``build_from(parse(name, params))``: the validated method ``name``."""
  return build_from(parse(name, params))


def chain_from(items: Sequence[Any]) -> Reparam:
  """The :func:`~lowrank_jax.chain` of several methods, each ``{"name": NAME, **params}``
  or a config instance (or anything :func:`from_description` takes: a nested list is a
  chain inside the chain, ``{"per_module": [...]}`` a :func:`~lowrank_jax.reparam.per_module`),
  in order."""
  if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence) or not items:
    raise ConfigError(f"chain_from expects a non-empty list of methods, got {items!r}")
  reparams = []
  for i, item in enumerate(items):
    if not isinstance(item, (MethodConfig, Mapping, list, tuple)) or (
        isinstance(item, Mapping) and "name" not in item and "per_module" not in item):
      raise ConfigError(f"chain_from: item {i} must be a config or a mapping with a 'name' key, got {item!r}")
    reparams.append(from_description(item))
  return chain(*reparams)


def from_description(data: Any) -> Reparam:
  """The :class:`Reparam` that :func:`describe` described: the inverse of :func:`describe`
  (``from_description(describe(r)).config == r.config``) for a method config or its
  ``{"name": NAME, **params}`` dict (:func:`build_from` / :func:`parse`), a list (a
  :func:`~lowrank_jax.chain` of its entries, :func:`chain_from`) or ``{"per_module": [...]}``
  (a :func:`~lowrank_jax.reparam.per_module` whose parts' ``where`` are their masks).

  Raises:
    ConfigError: data that describes no method (the message names the item).
  """
  if isinstance(data, MethodConfig):
    return build_from(data)
  if isinstance(data, (list, tuple)):
    return chain_from(data)
  if isinstance(data, Mapping) and set(data) == {"per_module"}:
    parts = data["per_module"]
    if isinstance(parts, (str, bytes, Mapping)) or not isinstance(parts, Sequence) or not parts:
      raise ConfigError(f"per_module: expects a non-empty list of method configs, got {parts!r}")
    configs = [p if isinstance(p, MethodConfig) else _parse_item(p, f"per_module part {i}")
               for i, p in enumerate(parts)]
    return per_module([(c.where, build_from(c)) for c in configs])
  if isinstance(data, Mapping):
    return build_from(_parse_item(data, "from_description"))
  raise ConfigError(f"from_description: expects a method config, a {{'name': ...}} mapping, a list "
                    f"(chain) or {{'per_module': [...]}}, got {type(data).__name__} {data!r}")


def _parse_item(item: Any, what: str) -> MethodConfig:
  if not isinstance(item, Mapping) or "name" not in item:
    raise ConfigError(f"{what}: must be a config or a mapping with a 'name' key, got {item!r}")
  params = dict(item)
  return parse(params.pop("name"), params)


def as_dict(config: MethodConfig) -> dict[str, Any]:
  """``{"name": NAME, **params}`` with dtypes as their names: the inverse of
  :func:`chain_from`'s items and of :func:`parse` (for JSON-able parameters; :func:`describe`
  checks that they are, and takes chains too)."""
  out = {"name": config.method_name}
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    if isinstance(v, np.dtype):
      v = v.name
    elif isinstance(v, tuple) and not hasattr(v, "_fields"):
      v = list(v)
    out[f.name] = v
  return out


def describe(reparam: Any) -> Any:
  """A reparam's config (``Reparam.config``; or the config itself) as JSON data.

  A method config is ``{"name": NAME, **params}`` (:func:`as_dict`), a :func:`~lowrank_jax.chain`
  the list of its entries' descriptions, a :class:`~lowrank_jax.reparam.PerModule`
  (``interop.peft.load_peft_adapter``'s rank/alpha patterns) ``{"per_module": [...]}``;
  values are JSON types only (dtypes by name, tuples as lists, masks as nested dicts of
  bools). :func:`from_description` is the inverse.

  Raises:
    ConfigError: nothing recorded (``config`` is ``None``), or a value that is not data
      (a callable ``where``, an array such as VeRA's ``key``, a ``ModelSlots``), named by
      its place and parameter.
  """
  return _describe(reparam.config if isinstance(reparam, Reparam) else reparam, "config")


def _describe(cfg: Any, at: str) -> Any:
  if cfg is None:
    raise ConfigError(f"{at}: no config recorded (a Reparam built by hand, e.g. with adapt(); the "
                      f"method factories and the registry record theirs)")
  if isinstance(cfg, PerModule):
    return {"per_module": [_describe(c, f"{at}.parts[{i}]") for i, c in enumerate(cfg.parts)]}
  if isinstance(cfg, MethodConfig):
    return {k: _json(v, f"{at} ({cfg.method_name}): parameter {k!r}") for k, v in as_dict(cfg).items()}
  if isinstance(cfg, tuple):
    return [_describe(c, f"{at}[{i}]") for i, c in enumerate(cfg)]
  raise ConfigError(f"{at}: {type(cfg).__name__} is not a method config")


def _json(v: Any, at: str) -> Any:
  """``v`` as JSON types, else a :class:`ConfigError` naming ``at``."""
  if v is None or isinstance(v, (bool, str)):
    return v
  if isinstance(v, (np.bool_, np.integer, np.floating)):
    return v.item()
  if isinstance(v, (int, float)):
    return v
  if isinstance(v, (np.ndarray, jax.Array)) and v.shape == () and v.dtype == np.bool_:
    return bool(v)  # a mask's leaf
  if isinstance(v, np.dtype):
    return v.name
  if isinstance(v, Mapping):
    bad = [k for k in v if not isinstance(k, str)]
    if bad:
      raise ConfigError(f"{at}: mapping keys must be strings to be JSON data, got {bad[0]!r}")
    return {k: _json(x, f"{at}[{k!r}]") for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_json(x, f"{at}[{i}]") for i, x in enumerate(v)]
  if callable(v):
    raise ConfigError(f"{at} is a callable ({v!r}): code is not JSON data; give a regex, a list of "
                      f"regexes or a boolean mask to describe it")
  raise ConfigError(f"{at}: a {type(v).__name__} is not JSON data")


def markdown_table() -> str:
  """The README's method table (``tests/methods/test_registry.py`` checks that it is there)."""
  lines = ["| method | name | call | paper | reference in tests | lazy matmul |",
           "|---|---|---|---|---|---|"]
  for s in METHODS.values():
    calls = ", ".join(f"`{c}`" for c in (s.call,) + s.extras)
    lines.append(f"| {s.title} | `{s.name}` | {calls} | {', '.join(s.paper)} | {s.reference} | "
                 f"{s.lazy_matmul or '-'} |")
  return "\n".join(lines)

