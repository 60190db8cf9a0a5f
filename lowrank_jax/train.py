"""A jitted train step over ``phi`` and a small loop with progress, metrics and memory.

The step differentiates ``loss(reparam.apply(theta0, phi))`` w.r.t. ``phi`` only;
``theta0`` (frozen, possibly quantized) is an argument, never a closure constant, so
it is not baked into the compiled program and can be sharded like any input::

    step = make_train_step(reparam, optimizer, loss_fn)
    phi, opt_state, metrics = step(phi, opt_state, theta0, batch, rng)
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.reparam import Reparam

PyTree = Any
LossFn = Callable[[PyTree, dict, Optional[jax.Array]], tuple[jax.Array, dict]]

__all__ = [
  "all_finite",
  "make_train_step",
  "make_eval_step",
  "softmax_cross_entropy",
  "batches",
  "peak_rss_bytes",
  "StepTimer",
]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
  """Mean cross-entropy and accuracy of integer ``labels``."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
  acc = (jnp.argmax(logits, -1) == labels).mean()
  return loss, {"loss": loss, "accuracy": acc}


def all_finite(tree: PyTree) -> jax.Array:
  """``True`` when every element of every floating leaf of ``tree`` is finite."""
  flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.stack(flags).all() if flags else jnp.asarray(True)


def make_train_step(reparam: Reparam, optimizer: optax.GradientTransformation, loss_fn: LossFn, *,
                    regularizer: Optional[Callable[[PyTree], jax.Array]] = None,
                    donate: bool = True, jit: bool = True, check_finite: bool = False):
  """Builds ``step(phi, opt_state, theta0, batch, rng) -> (phi, opt_state, metrics)``.

  Args:
    reparam: the PEFT method.
    optimizer: any optax transformation (GaLore, 8-bit, LoRA+ ... compose in).
    loss_fn: ``(theta, batch, rng) -> (loss, metrics)`` on the adapted weights ``theta``
      (``rng`` is ``None`` in deterministic mode).
    regularizer: optional ``phi -> scalar`` added to the loss (e.g. AdaLoRA's
      orthogonality penalty); reported as ``metrics["regularizer"]``.
    donate: donate ``phi`` and ``opt_state`` buffers to the update (in-place on device).
    jit: wrap in ``jax.jit``.
    check_finite: add ``metrics["finite"]``: the loss, the gradients and the updated
      ``phi`` are all finite (one reduction over ``phi`` per step).
  """

  def step(phi, opt_state, theta0, batch, rng):
    if rng is not None:
      rng_reparam, rng_model = jax.random.split(rng)
    else:
      rng_reparam = rng_model = None

    def objective(phi):
      theta = reparam.apply(theta0, phi, rng=rng_reparam)
      loss, metrics = loss_fn(theta, batch, rng_model)
      if regularizer is not None:
        reg = regularizer(phi)
        metrics = {**metrics, "regularizer": reg}
        loss = loss + reg
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(phi)
    updates, opt_state = optimizer.update(grads, opt_state, phi)
    phi = optax.apply_updates(phi, updates)
    metrics = dict(metrics)
    metrics.setdefault("loss", loss)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if check_finite:
      metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"]) & all_finite(phi)
    return phi, opt_state, metrics

  if jit:
    step = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  return step


def make_eval_step(reparam: Reparam, loss_fn: LossFn, *, jit: bool = True):
  """``eval_step(phi, theta0, batch) -> metrics`` in deterministic mode."""

  def step(phi, theta0, batch):
    return loss_fn(reparam.apply(theta0, phi), batch, None)[1]

  return jax.jit(step) if jit else step


def batches(data: dict, batch_size: int, *, rng: Optional[np.random.Generator] = None,
            drop_last: bool = True) -> Iterator[dict]:
  """Yields dicts of numpy batches from a dict of equal-length arrays (shuffled if ``rng``)."""
  n = len(next(iter(data.values())))
  order = rng.permutation(n) if rng is not None else np.arange(n)
  stop = n - n % batch_size if drop_last else n
  for i in range(0, stop, batch_size):
    idx = order[i:i + batch_size]
    yield {k: v[idx] for k, v in data.items()}


def peak_rss_bytes() -> int:
  """Peak resident set size of this process (``ru_maxrss``; KiB on Linux, bytes on macOS)."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(r if sys.platform == "darwin" else r * 1024)


class StepTimer:
  """Median wall time of steps after warm-up (blocks on the step's outputs).

  With fewer steps than ``warmup + 1``, the median falls back to the steps after the
  first (which includes compilation); with a single step it is ``nan``.
  """

  def __init__(self, warmup: int = 2):
    self.warmup, self.all_times = warmup, []

  def time(self, fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    self.all_times.append(time.perf_counter() - t0)
    return out

  @property
  def times(self) -> list[float]:
    """The timed steps the median is taken over."""
    if len(self.all_times) > self.warmup:
      return self.all_times[self.warmup:]
    return self.all_times[1:]

  @property
  def median(self) -> float:
    return float(np.median(self.times)) if self.times else float("nan")
