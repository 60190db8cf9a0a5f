"""What experiments built on the main job share with it (the main job's own setup lives in
:mod:`lowrank_jax.trainer.setup`): the classifier head's selection, the encoder kernels,
and the optimizer of a flat ``optimizer`` dict with the main job's schedule."""

from __future__ import annotations

import optax

from lowrank_jax.optim import make_optimizer
from lowrank_jax.trainer import setup, tasks
from lowrank_jax.trainer.config import from_dict

__all__ = ["HEAD", "ENCODER_KERNELS", "build_optimizer"]

HEAD = tasks.HEAD
ENCODER_KERNELS = tasks.BERT_KERNELS


def build_optimizer(cfg: dict, total_steps: int) -> optax.GradientTransformation:
  """The optimizer of a flat dict (``{"kind", "lr", ..., "warmup_frac"}``, validated as the
  trainer's ``optimizer`` section) with warm-up + cosine decay over ``total_steps``."""
  cfg = dict(cfg)
  schedule = {"warmup_frac": cfg.pop("warmup_frac")} if "warmup_frac" in cfg else {}
  config = from_dict({"name": "optimizer", "optimizer": cfg, "schedule": schedule}, "<optimizer>")
  return make_optimizer(config.optimizer.spec(lr=setup.schedule(config, total_steps)))
