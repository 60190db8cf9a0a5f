"""The training loop: deterministic data order, a progress bar, JSON-lines metrics,
evaluation after every epoch, checkpoints, a stop on SIGTERM/SIGINT and on divergence.

Everything that decides the trajectory is a pure function of the saved state, so a run
resumed from any checkpoint reaches the same parameters as one never interrupted:

* the rows of step ``s`` are ``order(seed, epoch)[index * B:(index + 1) * B]`` with
  ``epoch, index = divmod(s, steps_per_epoch)`` and ``order`` a permutation drawn from
  ``numpy.random.default_rng([seed, epoch])``;
* the dropout key of step ``s`` is ``fold_in(key, s)``;
* ``phi``, the optimizer state (step counts, schedules, AdaLoRA's budget) and the
  running epoch loss come back from the checkpoint exactly.

A step whose loss, gradients or updated parameters are not finite stops the run
(``status="diverged"``; nothing of it is checkpointed).

Many processes: each process computes the same global batch indices, feeds only its own
rows (``local_rows``) and ``to_device`` assembles the global batch; only the process that
``write_metrics`` writes the metrics file. ``stop`` must then be read alike by every
process (:class:`~lowrank_jax.trainer.processes.AgreedStop`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from tqdm import tqdm

from lowrank_jax import train
from lowrank_jax.trainer import files
from lowrank_jax.trainer.signals import StopFlag

__all__ = ["LoopState", "Outcome", "epoch_order", "batch_at", "run_loop"]

PyTree = Any


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The row order of ``epoch``: a permutation of ``range(n)`` from ``(seed, epoch)`` alone."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def batch_at(rows: Mapping[str, np.ndarray], batch_size: int, seed: int, epoch: int, index: int) -> dict:
  """Batch ``index`` of ``epoch`` (full batches only; the last partial one is dropped)."""
  n = len(next(iter(rows.values())))
  idx = epoch_order(n, seed, epoch)[index * batch_size:(index + 1) * batch_size]
  if len(idx) != batch_size:
    raise IndexError(f"batch {index} of epoch {epoch} is past the {n // batch_size} full batches")
  return {k: v[idx] for k, v in rows.items()}


@dataclasses.dataclass
class LoopState:
  """What a checkpoint restores: the arrays and the loop's position and running sums."""
  phi: PyTree
  opt_state: PyTree
  step: int = 0
  epoch_loss_sum: float = 0.0
  epoch_loss_count: int = 0
  history: list = dataclasses.field(default_factory=list)

  def position(self, steps_per_epoch: int) -> dict:
    epoch, index = divmod(self.step, steps_per_epoch)
    return {"epoch": epoch, "index": index, "step": self.step}

  def meta(self) -> dict:
    """The JSON part (everything but the arrays)."""
    return {"epoch_loss_sum": self.epoch_loss_sum, "epoch_loss_count": self.epoch_loss_count,
            "history": self.history}


@dataclasses.dataclass
class Outcome:
  """How the loop ended: ``"completed"``, ``"interrupted"`` (by ``signal``) or ``"diverged"``."""
  status: str
  state: LoopState
  step_time_s: float
  train_time_s: float
  signal: Optional[str] = None
  diverged: Optional[dict] = None


def run_loop(*, name: str, state: LoopState, step_fn: Callable, theta0: PyTree,
             rows: Mapping[str, np.ndarray], batch_size: int, seed: int, key: jax.Array,
             total_steps: int, evaluate_epoch: Optional[Callable[[PyTree], dict]],
             checkpoint: Callable[[LoopState], Any], every: int, stop: StopFlag,
             metrics_path, log_every: int, schedule: Callable[[int], Any],
             tokens: Callable[[Mapping[str, np.ndarray]], int], quiet: bool = False,
             local_rows: slice = slice(None), to_device: Optional[Callable[[dict], Any]] = None,
             write_metrics: bool = True) -> Outcome:
  """Trains from ``state.step`` to ``total_steps`` (see the module docstring).

  Args:
    name: the run's name (progress bar, messages).
    state: where to start (fresh or restored).
    step_fn: ``(phi, opt_state, theta0, batch, key) -> (phi, opt_state, metrics)`` with
      ``metrics["loss"]``, ``["grad_norm"]`` and ``["finite"]``.
    theta0, rows, batch_size, seed, key: the base, the training rows, the data order, the
      dropout key.
    total_steps: where to stop.
    evaluate_epoch: ``phi -> {metric: value}`` after every epoch (``None``: no evaluation).
    checkpoint: writes ``state`` (called every ``every`` steps, at the end and on a stop).
    stop: the SIGTERM/SIGINT flag, read after every step.
    metrics_path: the JSON-lines file (``train`` lines every ``log_every`` steps, ``eval``
      lines after every epoch).
    schedule: ``step -> learning rate`` (for the log).
    tokens: real tokens in a batch (tokens/s).
    quiet: no progress bar and no per-epoch lines.
    local_rows: the rows of each batch this process feeds (default all).
    to_device: this process's rows -> the step's batch (default: the numpy rows as they are).
    write_metrics: write ``metrics_path`` (process 0 of a multi-process run).
  """
  n = len(next(iter(rows.values())))
  steps_per_epoch = n // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"{name}: batch_size {batch_size} exceeds the {n} training rows")
  timer = train.StepTimer(warmup=3)
  t_start = time.perf_counter()
  window: list[float] = []
  window_tokens, window_time = 0, 0.0
  bar = tqdm(total=total_steps, initial=state.step, desc=name, disable=quiet, file=sys.stderr,
             mininterval=1.0, dynamic_ncols=True)

  def finish(status, **kw) -> Outcome:
    bar.close()
    return Outcome(status, state, timer.median, time.perf_counter() - t_start, **kw)

  try:
    if stop.requested:
      return finish("interrupted", signal=stop.signal)
    while state.step < total_steps:
      epoch, index = divmod(state.step, steps_per_epoch)
      batch = batch_at(rows, batch_size, seed, epoch, index)
      mine = {k: v[local_rows] for k, v in batch.items()}
      t0 = time.perf_counter()
      phi, opt_state, metrics = timer.time(step_fn, state.phi, state.opt_state, theta0,
                                           mine if to_device is None else to_device(mine),
                                           jax.random.fold_in(key, state.step))
      dt = time.perf_counter() - t0
      loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
      if not bool(metrics["finite"]):
        info = {"step": state.step + 1, "loss": loss, "grad_norm": grad_norm}
        if write_metrics:
          files.append_jsonl(metrics_path, {"kind": "diverged", **info})
        print(f"[{name}] diverged at step {state.step + 1}: loss {loss}, gradient norm {grad_norm}; "
              f"stopping (no checkpoint of this step)", file=sys.stderr, flush=True)
        return finish("diverged", diverged=info)
      state.phi, state.opt_state = phi, opt_state
      state.step += 1
      state.epoch_loss_sum += loss
      state.epoch_loss_count += 1
      window.append(loss)
      window_tokens += tokens(batch)
      window_time += dt
      bar.update(1)
      if state.step % log_every == 0 or state.step == total_steps:
        rate = window_tokens / window_time if window_time > 0 else 0.0
        bar.set_postfix(loss=f"{np.mean(window):.4f}", tok_s=f"{rate:,.0f}", refresh=False)
        if write_metrics:
          files.append_jsonl(metrics_path, {
              "kind": "train", "step": state.step, "epoch": epoch + (index + 1) / steps_per_epoch,
              "loss": float(np.mean(window)), "grad_norm": grad_norm,
              "lr": float(schedule(state.step - 1)), "tokens_per_s": rate})
        window, window_tokens, window_time = [], 0, 0.0
      if state.step % steps_per_epoch == 0 or state.step == total_steps:
        row = {"epoch": epoch + 1, "step": state.step,
               "train_loss": state.epoch_loss_sum / max(state.epoch_loss_count, 1)}
        if evaluate_epoch is not None:
          row.update(evaluate_epoch(state.phi))
        state.history.append(row)
        state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
        if write_metrics:
          files.append_jsonl(metrics_path, {"kind": "epoch", **row})
        if not quiet:
          shown = "  ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in row.items()
                            if isinstance(v, float) and math.isfinite(v))
          bar.write(f"[{name}] epoch {epoch + 1} (step {state.step}): {shown}", file=sys.stderr)
      if state.step == total_steps:
        break
      if stop.requested:
        checkpoint(state)
        return finish("interrupted", signal=stop.signal)
      if every and state.step % every == 0:
        checkpoint(state)
    checkpoint(state)
    return finish("completed")
  finally:
    bar.close()
