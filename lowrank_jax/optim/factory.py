"""Optimizers from JSON-style config dicts (what the main job's ``configs/*.json`` hold).

::

    make_optimizer({"kind": "galore_adamw", "lr": 1e-4, "rank": 96,
                    "update_proj_gap": 200, "scale": 0.25,
                    "where": "encoder/.*kernel/w$", "weight_decay": 0.01})
    make_optimizer({"kind": "adamw_8bit", "lr": 2e-3, "weight_decay": 0.01})
    make_optimizer({"kind": "loraplus", "base": "adamw", "lr": 2e-4, "ratio": 16})

Common keys: ``lr``, ``weight_decay``, ``b1``, ``b2``, ``eps``; ``clip`` (global norm,
chained in front); ``offload`` (``true``: :func:`lowrank_jax.optim.offload`, or
``"force"``). GaLore keys: ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``,
``where``, ``svd``, ``moments`` (``"fp32"``/``"8bit"``), ``projector_dtype``
(``"bfloat16"``/``"float32"``), ``compat``. LoRA+ keys: ``ratio``, ``base``
(``"adamw"``/``"adamw_8bit"``), ``where_b``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from lowrank_jax.optim.adam8bit import adamw_8bit
from lowrank_jax.optim.galore import galore_adamw
from lowrank_jax.optim.loraplus import loraplus
from lowrank_jax.optim.offload import offload

__all__ = ["make_optimizer"]

_COMMON = {"kind", "lr", "weight_decay", "b1", "b2", "eps", "clip", "offload"}
_KEYS = {
  "adamw": set(),
  "adamw_8bit": {"min_8bit_size", "block_size"},
  "galore_adamw": {"rank", "update_proj_gap", "scale", "proj_type", "where", "svd", "moments",
                   "projector_dtype", "compat"},
  "loraplus": {"ratio", "base", "where_b"},
}


def _adam_kwargs(spec: dict) -> dict:
  return {k: spec[k] for k in ("b1", "b2", "eps") if k in spec}


def make_optimizer(spec: dict) -> optax.GradientTransformation:
  """Builds an optax transformation from ``spec`` (see the module docstring).

  Raises a ``ValueError`` naming unknown kinds and keys.
  """
  kind = spec.get("kind")
  if kind not in _KEYS:
    raise ValueError(f"unknown optimizer kind {kind!r}; expected one of {sorted(_KEYS)}")
  unknown = set(spec) - _COMMON - _KEYS[kind]
  if unknown:
    raise ValueError(f"optimizer {kind!r}: unknown keys {sorted(unknown)}; allowed "
                     f"{sorted(_COMMON | _KEYS[kind])}")
  lr, wd = spec.get("lr", 1e-3), spec.get("weight_decay", 0.0)
  adam = _adam_kwargs(spec)
  if kind == "adamw":
    tx = optax.adamw(lr, weight_decay=wd, **adam)
  elif kind == "adamw_8bit":
    extra = {k: spec[k] for k in ("min_8bit_size", "block_size") if k in spec}
    tx = adamw_8bit(lr, weight_decay=wd, **adam, **extra)
  elif kind == "galore_adamw":
    kw: dict[str, Any] = {k: spec[k] for k in ("update_proj_gap", "scale", "proj_type", "where",
                                               "svd", "moments", "compat") if k in spec}
    if "projector_dtype" in spec:
      kw["projector_dtype"] = jnp.dtype(spec["projector_dtype"])
    tx = galore_adamw(lr, spec.get("rank", 128), weight_decay=wd, **adam, **kw)
  else:
    base = spec.get("base", "adamw")
    ctor = {"adamw": optax.adamw, "adamw_8bit": adamw_8bit}.get(base)
    if ctor is None:
      raise ValueError(f"loraplus base must be 'adamw' or 'adamw_8bit', got {base!r}")
    kw = {"where_b": spec["where_b"]} if "where_b" in spec else {}
    tx = loraplus(ctor, lr, spec.get("ratio", 16.0), weight_decay=wd, **adam, **kw)
  if spec.get("offload"):
    tx = offload(tx, enabled=True if spec["offload"] == "force" else None)
  if spec.get("clip"):
    tx = optax.chain(optax.clip_by_global_norm(spec["clip"]), tx)
  return tx
