"""From a config and a task to what the step trains: the (quantized) base, the method chain
from the registry, ``phi``, the optimizer with its schedule, and the deployed weights.

The chain is ``chain(method_1, ..., method_n, task head)``, always a chain (``phi`` is the
tuple of the parts' parameters), so paths in ``phi`` start with the part's index
(``0/bert/encoder/...``; GaLore's ``where`` sees these paths).

On a mesh (the problem's :class:`~lowrank_jax.trainer.placement.Placement`) the base is
placed after quantization and the methods' initialisation (which may rewrite it), and
``phi`` from its base weights' specs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import optax

from lowrank_jax.methods import adalora as adalora_lib, registry
from lowrank_jax.optim import make_optimizer
from lowrank_jax.methods.l4q import l4q_merge
from lowrank_jax.methods.qalora import qalora_merge
from lowrank_jax.quant import quantize
from lowrank_jax.reparam import Reparam, chain, initialize, merge
from lowrank_jax.trainer.config import (DeployConfig, QuantizeConfig, RankAllocatorConfig, RunConfig,
                                        quantize_kwargs)
from lowrank_jax.trainer.tasks import Problem

__all__ = ["Setup", "build_setup", "schedule", "quantized", "deployed"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Setup:
  """Attributes:
    theta0: the frozen base as the step sees it (quantized, or rewritten by PiSSA/LoftQ init).
    reparam: the chain of the config's methods and the task's head.
    phi: the trainable parameters at initialisation.
    optimizer: the optax transformation (schedule, clipping, AdaLoRA's budget inside).
    regularizer: ``phi -> scalar`` added to the loss (AdaLoRA's orthogonality), or ``None``.
    schedule: ``step -> learning rate``.
    method_parts: for each registry method of the chain, ``(index in phi, its config)``.
    theta0_specs, phi_specs: their ``PartitionSpec`` trees on the mesh (``None``: one device).
  """
  theta0: PyTree
  reparam: Reparam
  phi: PyTree
  optimizer: optax.GradientTransformation
  regularizer: Optional[Callable[[PyTree], jax.Array]]
  schedule: optax.Schedule
  method_parts: tuple[tuple[int, registry.MethodConfig], ...]
  theta0_specs: PyTree = None
  phi_specs: PyTree = None


def schedule(config: RunConfig, total_steps: int) -> optax.Schedule:
  """The learning rate per step: linear warm-up from 0, then the decay ``schedule.kind`` names."""
  s, lr = config.schedule, config.optimizer.lr
  if s.kind == "constant":
    return optax.constant_schedule(lr)
  warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_frac * total_steps)
  warmup = max(1, min(warmup, total_steps - 1)) if total_steps > 1 else 0
  end = lr * s.end_frac
  if s.kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(2, total_steps), end_value=end)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                               optax.linear_schedule(lr, end, max(1, total_steps - warmup))], [warmup])


def quantized(theta: PyTree, q: Optional[QuantizeConfig], default_where: str) -> PyTree:
  """``theta`` with ``q.where`` (or ``default_where``) stored by ``q``'s codec."""
  if q is None:
    return theta
  return quantize(theta, q.where or default_where, **quantize_kwargs(q))


def build_setup(config: RunConfig, problem: Problem, key: jax.Array, total_steps: int) -> Setup:
  """The :class:`Setup` of a run (``key``: the methods' init key)."""
  theta0 = quantized(problem.theta0, config.quantize, problem.quantize_where)
  parts = [registry.build_from(m) for m in config.methods]
  if problem.head is not None:
    parts.append(problem.head)
  if not parts:
    raise ValueError(f"{config.name}: nothing to train: 'methods' is empty and the task has no head")
  reparam = chain(*parts)
  theta0, phi = initialize(reparam, key, theta0)
  theta0, theta0_specs = problem.placement.place_theta0(theta0)
  phi, phi_specs = problem.placement.place_phi(phi, theta0, theta0_specs)
  method_parts = tuple(enumerate(config.methods))
  lr = schedule(config, total_steps)
  tx = make_optimizer(config.optimizer.spec(lr=lr))
  regularizer = None
  ada = [(i, m) for i, m in method_parts if m.method_name == "adalora"]
  if ada:
    (i, _), = ada
    ra = config.rank_allocator or RankAllocatorConfig()
    alloc = adalora_lib.rank_allocator(
        ra.target_r, total_step=total_steps, tinit=int(ra.tinit_frac * total_steps),
        tfinal=int(ra.tfinal_frac * total_steps), deltaT=ra.deltaT, beta1=ra.beta1, beta2=ra.beta2)
    tx = adalora_lib.with_rank_allocator(tx, alloc)
    weight = ra.orth_reg_weight

    def regularizer(phi, i=i):
      return weight * adalora_lib.orthogonal_regularizer(phi[i])
  return Setup(theta0=theta0, reparam=reparam, phi=phi, optimizer=tx, regularizer=regularizer,
               schedule=lr, method_parts=method_parts, theta0_specs=theta0_specs, phi_specs=phi_specs)


def deployed(deploy: Optional[DeployConfig], setup: Setup, phi: PyTree, default_where: str) -> PyTree:
  """The weights a deployment uses: merged dense and re-quantized, or QA-LoRA's / L4Q's
  integer merge (a quantized base stays quantized)."""
  if deploy is None:
    return merge(setup.reparam, setup.theta0, phi)
  if deploy.kind == "merge_quantize":
    return quantized(merge(setup.reparam, setup.theta0, phi), deploy.quantize, default_where)
  theta = setup.reparam.apply(setup.theta0, phi)
  return qalora_merge(theta) if deploy.kind == "qalora_merge" else l4q_merge(theta)
