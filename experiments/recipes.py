"""Builds (frozen base, reparam, optimizer) from a config dict: the glue between
``configs/*.json`` and the library. Every method trains the classifier head fully.

Config ``method`` entries: ``{"kind": KIND, ...}`` with KIND one of the keys of
:data:`METHODS`; remaining keys are passed to the method's constructor.
Config ``optimizer`` entries: ``{"kind": "adamw" | "galore_adamw" | "adamw_8bit", "lr": ..., ...}``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

import lowrank_jax as lj

HEAD = r"^head/"


def _lora(theta0, key, **kw):
  return theta0, lj.lora(**kw)


def _frozen(theta0, key):
  return theta0, None


def _full(theta0, key, where=r"^(bert|head)/"):
  return theta0, lj.full(where)


def _optional(module: str, name: str) -> Callable:
  """A method provided by another module of the library, looked up when used."""
  def build(theta0, key, **kw):
    import importlib
    fn = getattr(importlib.import_module(module), name)
    out = fn(**kw)
    return theta0, out
  return build


def _qlora(theta0, key, quant: dict | None = None, **lora_kw):
  from lowrank_jax.quant import qlora
  quant = dict(quant or {})
  where = quant.pop("where", r"^bert/encoder/.*/kernel$")
  theta0 = qlora.quantize(theta0, where, **quant)
  return theta0, lj.lora(**lora_kw)


METHODS: dict[str, Callable[..., Any]] = {
  "frozen": _frozen,
  "full": _full,
  "lora": _lora,
  "qlora": _qlora,
  "dora": _optional("lowrank_jax.methods.dora", "dora"),
  "lokr": _optional("lowrank_jax.methods.lokr", "lokr"),
  "loha": _optional("lowrank_jax.methods.loha", "loha"),
  "vera": _optional("lowrank_jax.methods.vera", "vera"),
  "ia3": _optional("lowrank_jax.methods.ia3", "ia3"),
  "glora": _optional("lowrank_jax.methods.glora", "glora"),
  "adalora": _optional("lowrank_jax.methods.adalora", "adalora"),
}


def build_method(cfg: dict, theta0, key):
  """Returns ``(theta0', reparam, phi)``; the head is always trained in full."""
  spec = dict(cfg)
  kind = spec.pop("kind")
  if kind not in METHODS:
    raise ValueError(f"unknown method kind {kind!r}; known: {sorted(METHODS)}")
  theta0, method = METHODS[kind](theta0, key, **spec)
  head = lj.full(HEAD)
  if method is None:
    reparam = head
  elif kind == "full":
    reparam = method
  else:
    reparam = lj.chain(method, head)
  theta0, phi = lj.initialize(reparam, key, theta0)
  return theta0, reparam, phi


def build_optimizer(cfg: dict, total_steps: int) -> optax.GradientTransformation:
  spec = dict(cfg)
  kind = spec.pop("kind", "adamw")
  lr = spec.pop("lr", 1e-3)
  warmup = spec.pop("warmup_frac", 0.06)
  wd = spec.pop("weight_decay", 0.01)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, int(warmup * total_steps)),
                                                max(2, total_steps), end_value=lr * 0.05)
  clip = spec.pop("clip", 1.0)
  if kind == "adamw":
    opt = optax.adamw(schedule, weight_decay=wd, **spec)
  elif kind == "adamw_8bit":
    from lowrank_jax.optim import adam8bit
    opt = adam8bit.adamw_8bit(schedule, weight_decay=wd, **spec)
  elif kind == "galore_adamw":
    from lowrank_jax.optim import galore
    opt = galore.galore_adamw(schedule, weight_decay=wd, **spec)
  else:
    raise ValueError(f"unknown optimizer kind {kind!r}")
  return optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt
