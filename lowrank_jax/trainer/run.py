"""One run end to end: task -> setup -> (resume) -> loop -> evaluation -> exports -> result.

Files of a run in ``OUT/``::

    NAME.json               the result row (strict JSON), written when the run ends
    NAME/config.json        the validated config
    NAME/metrics.jsonl      train / epoch / diverged lines
    NAME/checkpoints/       step_<8 digits>/ (the last ``checkpointing.keep``)
    NAME/adapter/           the PEFT adapter folder (``export.peft``)
    NAME/merged/            the merged Hugging Face folder (``export.merged``)

A checkpoint stores ``phi``, the optimizer state and, as metadata, the step, the dropout
key's data, the data position, the running epoch loss and history, the config and the
base's path and content hash, never the base. :func:`run` with ``resume=True``
continues from the latest complete checkpoint after checking that the config (apart from
``checkpointing``, ``export``, ``mesh`` and ``distributed``) and the base are the ones it
was written with: a run may continue on another mesh, device count or process count.

Many processes: every process calls :func:`run` with the same config (its own
``distributed`` settings aside); all of them train, evaluate and write checkpoints
(collectively), process 0 alone writes the metrics, the result row and the exports.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
from typing import Optional

import jax
import numpy as np

from lowrank_jax import train, tree as tree_lib
from lowrank_jax.optim import memory
from lowrank_jax.trainer import base as base_lib, export, files
from lowrank_jax.trainer.config import RunConfig, to_dict
from lowrank_jax.trainer.loop import LoopState, Outcome, run_loop
from lowrank_jax.trainer.processes import AgreedStop, is_primary
from lowrank_jax.trainer.rundir import RunDir
from lowrank_jax.trainer.setup import Setup, build_setup, deployed
from lowrank_jax.trainer.signals import StopFlag
from lowrank_jax.trainer.tasks import Keys, Problem, build_problem

__all__ = ["Prepared", "prepare", "run", "config_changes", "restore_state", "CHECKPOINT_FORMAT",
           "RESUMABLE_CHANGES"]

CHECKPOINT_FORMAT = "lowrank_jax.trainer/1"
# sections a resumed run may change (the mesh and the processes do not change the arithmetic)
RESUMABLE_CHANGES = ("checkpointing", "export", "mesh", "distributed")


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Everything a run builds before its first step."""
  config: RunConfig
  keys: Keys
  problem: Problem
  setup: Setup
  steps_per_epoch: int
  total_steps: int


def prepare(config: RunConfig) -> Prepared:
  """Builds the task, the step counts and the setup of ``config``."""
  keys = Keys.from_seed(config.training.seed)
  problem = build_problem(config, keys)
  n = len(next(iter(problem.train_rows.values())))
  bs = config.training.batch_size
  if n < bs:
    raise ValueError(f"{config.name}: training.batch_size {bs} exceeds the {n} training rows")
  try:
    problem.placement.check_batch(bs)
  except ValueError as e:
    raise ValueError(f"{config.name}: {e}") from None
  steps_per_epoch = n // bs
  total = config.training.max_steps or config.training.epochs * steps_per_epoch
  setup = build_setup(config, problem, keys.method, total)
  return Prepared(config, keys, problem, setup, steps_per_epoch, total)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(saved: dict, current: dict) -> list[str]:
  """``"key: old -> new"`` for every difference outside :data:`RESUMABLE_CHANGES`."""
  a = _flat({k: v for k, v in saved.items() if k not in RESUMABLE_CHANGES})
  b = _flat({k: v for k, v in current.items() if k not in RESUMABLE_CHANGES})
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resumable(config: RunConfig, run_dir: RunDir) -> Optional[int]:
  """The step a resumed run continues from (``None``: no checkpoint); raises
  :class:`~lowrank_jax.trainer.base.ResumeError` listing the config changes since that checkpoint."""
  step = run_dir.latest()
  if step is None:
    return None
  meta = run_dir.metadata(step)
  if meta.get("format") != CHECKPOINT_FORMAT:
    raise base_lib.ResumeError(f"{run_dir.path(step)}: not a {CHECKPOINT_FORMAT} checkpoint")
  changes = config_changes(meta["config"], to_dict(config))
  if changes:
    raise base_lib.ResumeError(f"{config.name}: the config differs from the one checkpoint {run_dir.path(step)} "
                     f"was written with: {'; '.join(changes)}. Resume with the same config, or run "
                     "without --resume to start afresh")
  return step


def restore_state(run_dir: RunDir, step: int, template: LoopState) -> tuple[LoopState, dict]:
  """The loop state saved at ``step`` (``template`` gives the structures) and its metadata."""
  meta = run_dir.metadata(step)
  ck = run_dir.restore(step, template.phi, template.opt_state)
  state = LoopState(phi=ck.phi, opt_state=ck.opt_state, step=int(meta["step"]),
                    epoch_loss_sum=float(meta["epoch_loss_sum"]),
                    epoch_loss_count=int(meta["epoch_loss_count"]), history=list(meta["history"]))
  return state, meta


def _label(path: str) -> str:
  """Memory-report label: the first path component that is not a chain index."""
  return next((c for c in path.split("/") if not c.isdigit()), "(root)")


def _result(p: Prepared, outcome: Outcome, mem, final: dict, deployed_metrics: dict, exports: dict,
            compilations: Optional[int] = None) -> dict:
  c, problem = p.config, p.problem
  n_train = tree_lib.count_params(outcome.state.phi)
  placement = problem.placement
  n_total = tree_lib.count_params(problem.theta0)
  out = {
    "name": c.name, "task": c.task, "method": "+".join(c.method_names) or "head only",
    "config": to_dict(c), "status": outcome.status,
    "trainable_params": n_train, "total_params": n_total, "trainable_percent": 100.0 * n_train / n_total,
    **final, **deployed_metrics,
    "steps": outcome.state.step, "total_steps": p.total_steps,
    "step_time_s": outcome.step_time_s, "train_time_s": outcome.train_time_s,
    "peak_rss_bytes": train.peak_rss_bytes(), "memory": mem.as_dict(),
    "history": outcome.state.history, "base": problem.base, "exports": exports, **problem.info,
    "placement": placement.describe(), "processes": jax.process_count(),
  }
  if compilations is not None:
    out["step_compilations"] = compilations
  if outcome.status == "completed":  # bitwise identity of the trained state
    out["state_sha256"] = {"phi": base_lib.tree_hash(placement.to_host(outcome.state.phi)),
                           "opt_state": base_lib.tree_hash(placement.to_host(outcome.state.opt_state))}
  if outcome.diverged is not None:
    out["diverged"] = outcome.diverged
  return out


def run(config: RunConfig, out: str | pathlib.Path, *, resume: bool = False, quiet: bool = False,
        stop: Optional[StopFlag] = None) -> dict:
  """Trains ``config``, writes its files under ``out`` and returns its result row.

  ``status`` of the row: ``"completed"``, ``"diverged"`` (non-finite loss, gradients or
  parameters) or ``"interrupted"`` (SIGTERM/SIGINT: a checkpoint was written; the row is
  not written to ``NAME.json``).
  """
  out = pathlib.Path(out)
  run_dir = RunDir(out / config.name)
  flag = stop or StopFlag()
  stop = AgreedStop(flag)
  primary = is_primary()
  quiet = quiet or not primary
  resume_step = check_resumable(config, run_dir) if resume else None
  if primary:
    files.write_json(run_dir.root / "config.json", to_dict(config))
  p = prepare(config)
  problem, setup = p.problem, p.setup
  placement = problem.placement
  if problem.load_report is not None:
    print(f"[{config.name}] {problem.load_report}", file=sys.stderr, flush=True)
  metrics_path = run_dir.root / "metrics.jsonl"
  opt_state = placement.place_opt_state(setup.optimizer.init(setup.phi), setup.phi, setup.phi_specs)
  state = LoopState(phi=setup.phi, opt_state=opt_state)
  key = p.keys.train
  if resume_step is not None:
    run_dir.clean()
    state, meta = restore_state(run_dir, resume_step, state)
    base_lib.check_same_base(meta["base"], problem.base, str(run_dir.path(resume_step)))
    key = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
    if primary:
      files.rewrite_jsonl(metrics_path, lambda r: r.get("kind") != "diverged" and r.get("step", 0) <= state.step)
      print(f"[{config.name}] resuming from step {state.step} of {p.total_steps} "
            f"({run_dir.path(resume_step)})", file=sys.stderr, flush=True)
  else:
    if run_dir.steps() and primary:
      print(f"[{config.name}] starting afresh: removing the checkpoints in {run_dir.checkpoints} "
            "(pass --resume to continue from them)", file=sys.stderr, flush=True)
    run_dir.remove_all()
    if primary:
      files.write_text(metrics_path, "")
  mem = memory.memory_report(setup.theta0, state.phi, state.opt_state, partition=_label)
  if not quiet:
    print(f"[{config.name}] {tree_lib.count_params(state.phi):,} trainable of "
          f"{tree_lib.count_params(problem.theta0):,} parameters, {p.total_steps} steps, "
          f"{placement.describe()}\n{mem}", file=sys.stderr, flush=True)

  meta_fixed = {"format": CHECKPOINT_FORMAT, "config": to_dict(config), "base": problem.base,
                "rng": [int(x) for x in np.asarray(jax.random.key_data(key)).ravel()],
                "total_steps": p.total_steps}

  def save(s: LoopState):
    if run_dir.has(s.step):  # the same step always holds the same state
      return
    run_dir.save(s.step, s.phi, s.opt_state, keep=config.checkpointing.keep,
                 metadata={**meta_fixed, **s.meta(), "data_position": s.position(p.steps_per_epoch)})

  reparam = setup.reparam
  epoch_split = problem.epoch_split

  def evaluate_epoch(phi):
    split, prefix = epoch_split
    return {f"{prefix}_{k}": v for k, v in problem.evaluate(reparam.apply(setup.theta0, phi), split).items()}

  step_fn = placement.step(functools.partial(
      train.make_train_step, reparam, setup.optimizer, problem.loss_fn, regularizer=setup.regularizer,
      check_finite=True))
  # PiSSA / OLoRA adapters export relative to their initial factors; the step donates phi's
  # buffers, so the initial phi (adapter-sized) is copied to the host first (a collective)
  wants_peft = config.export.peft and export.peft_exportable(config) is None
  initial_phi = placement.to_host(setup.phi) if wants_peft else None
  outcome = run_loop(
      name=config.name, state=state, step_fn=step_fn, theta0=setup.theta0, rows=problem.train_rows,
      batch_size=config.training.batch_size, seed=config.training.seed, key=key, total_steps=p.total_steps,
      evaluate_epoch=evaluate_epoch if epoch_split else None, checkpoint=save,
      every=config.checkpointing.every, stop=stop, metrics_path=metrics_path,
      log_every=config.training.log_every, schedule=setup.schedule, tokens=problem.tokens, quiet=quiet,
      local_rows=placement.local_rows(config.training.batch_size), to_device=placement.batch,
      write_metrics=primary)
  compilations = step_fn._cache_size() if hasattr(step_fn, "_cache_size") else None
  if outcome.status == "completed" and stop.requested:
    outcome.status, outcome.signal = "interrupted", stop.signal
  if outcome.status == "interrupted":
    if primary:
      where = run_dir.path(outcome.state.step) if outcome.state.step in run_dir.steps() else "none needed"
      print(f"[{config.name}] interrupted by {outcome.signal} at step {outcome.state.step} of {p.total_steps}; "
            f"checkpoint: {where}; continue with --resume", file=sys.stderr, flush=True)
    return _result(p, outcome, mem, {}, {}, {}, compilations)

  final, dep, exports = {}, {}, {}
  if outcome.status == "completed":
    phi = outcome.state.phi
    if problem.final_split is not None:
      split, prefix = problem.final_split
      final = {f"{prefix}_{k}": v for k, v in problem.evaluate(reparam.apply(setup.theta0, phi), split).items()}
    if config.deploy is not None and problem.final_split is not None:
      split, prefix = problem.final_split
      theta_dep = deployed(config.deploy, setup, phi, problem.quantize_where)
      dep = {f"deployed_{prefix}_{k}": v for k, v in problem.evaluate(theta_dep, split).items()}
    if config.export.peft:
      skipped = export.peft_exportable(config)
      if skipped is None:
        host_phi = placement.to_host(phi)  # a collective: every process gathers, process 0 writes
        if primary:  # None, or save_peft_adapter's reason for refusing the method
          skipped = export.export_peft(run_dir.root / "adapter", config, setup, host_phi, problem,
                                       initial_phi=initial_phi)
      exports["peft"] = str(run_dir.root / "adapter") if skipped is None else None
      if skipped:
        exports["peft_skipped"] = skipped
    if config.export.merged:
      export.export_merged(run_dir.root / "merged", config, setup, phi, problem)
      exports["merged"] = str(run_dir.root / "merged")
  result = _result(p, outcome, mem, final, dep, exports, compilations)
  if primary:
    files.write_json(out / f"{config.name}.json", result)
  return result
