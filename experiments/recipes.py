"""Builds a training setup from a config dict: the glue between ``configs/*.json`` and the
library. Every method also trains the classifier head in full.

Config ``method``: ``{"kind": KIND, ...}``, KIND a key of :data:`METHODS`; the other keys go
to the method's constructor (``where``, ``rank``, ``alpha``...), except ``quant``, which
first stores the frozen base by a codec (``{"where": ..., "codec": "nf4" | "int4_affine" |
..., ...}``, the keywords of :func:`lowrank_jax.quantize`; ``qlora`` defaults to NF4 + DQ). Config ``optimizer``:
``{"kind": "adamw" | "adamw_8bit" | "galore_adamw", "lr": ..., ...}``. Optional config
``deploy``: how the trained model is deployed before the extra test evaluation:
``{"kind": "merge_quantize", "codec": "int4_affine", ...}`` (merge, then quantize) or
``{"kind": "qalora_merge"}`` (QA-LoRA's merge that stays int4) or ``{"kind": "l4q_merge"}``
(L4Q's int codes of the merged weight, equal to its training forward).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple, Optional

import optax

import lowrank_jax as lj
from lowrank_jax.optim import make_optimizer

HEAD = r"^head/"
ENCODER_KERNELS = r"^bert/encoder/.*/kernel$"


class Setup(NamedTuple):
  theta0: Any                       # frozen base (possibly quantized)
  reparam: lj.Reparam               # method chained with the head
  phi: Any                          # trainable parameters
  regularizer: Optional[Callable]   # phi -> scalar added to the loss
  wrap_optimizer: Callable          # tx -> tx (e.g. AdaLoRA's rank allocation)


def _identity(tx):
  return tx


def _quantized(theta0, quant: Optional[dict]):
  """``theta0`` with ``quant["where"]`` (default: the encoder kernels) stored by a codec
  (:func:`lowrank_jax.quantize`; ``quant`` holds its keyword arguments)."""
  if quant is None:
    return theta0
  quant = dict(quant)
  return lj.quantize(theta0, quant.pop("where", ENCODER_KERNELS), **quant)


def _plain(fn_path: str, default_quant: Optional[dict] = None) -> Callable:
  """A method constructor ``fn(**kw) -> Reparam`` from the library, by dotted path; the
  config key ``quant`` (or ``default_quant``) first quantizes the frozen base."""
  module, name = fn_path.rsplit(".", 1)

  def build(theta0, total_steps, quant: Optional[dict] = default_quant, **kw):
    method = getattr(importlib.import_module(module), name)(**kw)
    return _quantized(theta0, quant), method, None, _identity
  return build


def _frozen(theta0, total_steps):
  return theta0, None, None, _identity


def _full(theta0, total_steps, where=r"^(bert|head)/"):
  return theta0, lj.full(where), None, _identity


def _glora(theta0, total_steps, config=None, **kw):
  """GLoRA; ``config`` may map paths to JSON lists of choice names ``[A, B, C, D, E]``."""
  from lowrank_jax.methods.glora import LayerConfig
  if isinstance(config, dict):
    config = {p: LayerConfig(*c) for p, c in config.items()}
  elif isinstance(config, (list, tuple)):
    config = LayerConfig(*config)
  return theta0, lj.glora(**kw, **({} if config is None else {"config": config})), None, _identity


def _adalora(theta0, total_steps, target_r: int = 4, orth_reg_weight: float = 0.5,
             tinit_frac: float = 0.1, tfinal_frac: float = 0.2, deltaT: int = 5, **kw):
  from lowrank_jax.methods import adalora as ad
  reparam = ad.adalora(**kw)
  alloc = ad.rank_allocator(target_r, total_step=total_steps, tinit=int(tinit_frac * total_steps),
                            tfinal=int(tfinal_frac * total_steps), deltaT=deltaT)

  def reg(phi):
    return orth_reg_weight * ad.orthogonal_regularizer(phi[0])
  return theta0, reparam, reg, lambda tx: ad.with_rank_allocator(tx, alloc)


METHODS: dict[str, Callable[..., Any]] = {
  "frozen": _frozen,
  "full": _full,
  "lora": _plain("lowrank_jax.lora"),
  "qlora": _plain("lowrank_jax.lora", default_quant={"codec": "nf4", "block_size": 64,
                                                    "double_quant": True}),
  "dora": _plain("lowrank_jax.dora"),
  "lokr": _plain("lowrank_jax.lokr"),
  "loha": _plain("lowrank_jax.loha"),
  "vera": _plain("lowrank_jax.vera"),
  "ia3": _plain("lowrank_jax.ia3"),
  "glora": _glora,
  "adalora": _adalora,
  "said": _plain("lowrank_jax.intrinsic_said"),
  "loftq": _plain("lowrank_jax.loftq"),
  "qalora": _plain("lowrank_jax.qalora"),
  "l4q": _plain("lowrank_jax.l4q"),
  "adapters": _plain("lowrank_jax.methods.adapters.bottleneck_adapters"),
  "prefix": _plain("lowrank_jax.methods.prefix.prefix_reparam"),
}


def build(cfg: dict, theta0, key, total_steps: int) -> Setup:
  """The training setup of one ``method`` config; the head is always trained in full."""
  spec = dict(cfg)
  kind = spec.pop("kind")
  if kind not in METHODS:
    raise ValueError(f"unknown method kind {kind!r}; known: {sorted(METHODS)}")
  theta0, method, reg, wrap = METHODS[kind](theta0, total_steps, **spec)
  if method is None:
    reparam = lj.full(HEAD)
  elif kind == "full":
    reparam = method
  else:
    reparam = lj.chain(method, lj.full(HEAD))
  theta0, phi = lj.initialize(reparam, key, theta0)
  return Setup(theta0, reparam, phi, reg, wrap)


def build_optimizer(cfg: dict, total_steps: int) -> optax.GradientTransformation:
  """``lowrank_jax.optim.make_optimizer`` with warm-up + cosine decay of ``lr``; defaults:
  AdamW, weight decay 0.01, global-norm clipping at 1.0."""
  spec = {"kind": "adamw", "lr": 1e-3, "weight_decay": 0.01, "clip": 1.0, **cfg}
  lr = spec.pop("lr")
  warmup = spec.pop("warmup_frac", 0.06)
  spec["lr"] = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, int(warmup * total_steps)),
                                                  max(2, total_steps), end_value=lr * 0.05)
  return make_optimizer(spec)


def deploy(cfg: Optional[dict], reparam: lj.Reparam, theta0, phi):
  """The deployed weights: merged dense, or quantized after the merge, or QA-LoRA-merged."""
  if not cfg:
    return lj.merge(reparam, theta0, phi)
  spec = dict(cfg)
  kind = spec.pop("kind")
  if kind == "merge_quantize":
    where = spec.pop("where", ENCODER_KERNELS)
    return lj.quantize(lj.merge(reparam, theta0, phi), where, **spec)
  if kind == "qalora_merge":
    return lj.qalora_merge(reparam.apply(theta0, phi))
  if kind == "l4q_merge":
    return lj.l4q_merge(reparam.apply(theta0, phi))
  raise ValueError(f"unknown deploy kind {kind!r}; expected merge_quantize, qalora_merge or l4q_merge")
