"""The checkpoints of one run: ``<run>/checkpoints/step_<8 digits>/``, the last K kept.

Each checkpoint is one :func:`lowrank_jax.checkpoint.save` folder (atomic: complete or
absent) holding the trainable state and, as JSON metadata, everything else a resumed run
needs (step, RNG key data, data position, metrics history, the config, the base's path and
content hash). So the *latest complete* checkpoint is simply the highest ``step_*`` folder;
what a kill can leave behind is Orbax's temporary folder of an unfinished save and, while
old checkpoints are pruned, a folder renamed to ``.deleting-step_*`` before its removal
(never a half-deleted ``step_*``). :meth:`RunDir.clean` removes both.

Many processes (one shared run directory): every process saves and restores (collective),
process 0 alone renames and deletes, between barriers, and what exists is process 0's
view (:func:`~lowrank_jax.trainer.processes.agree`), so all processes take the same
decisions.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
from typing import Any, Optional

from lowrank_jax import checkpoint
from lowrank_jax.trainer.processes import agree, barrier, is_primary

__all__ = ["RunDir"]

_STEP = re.compile(r"^step_(\d{8})$")


class RunDir:
  """Checkpoint folder management for one run directory."""

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root)
    self.checkpoints = self.root / "checkpoints"

  def path(self, step: int) -> pathlib.Path:
    return self.checkpoints / f"step_{int(step):08d}"

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending (this process's view; see :meth:`latest`)."""
    if not self.checkpoints.is_dir():
      return []
    return sorted(int(m.group(1)) for p in self.checkpoints.iterdir() if (m := _STEP.match(p.name)))

  def latest(self) -> Optional[int]:
    """The latest complete checkpoint's step (process 0's view on every process)."""
    steps = self.steps()
    step = agree(steps[-1] if steps else -1)
    return None if step < 0 else step

  def has(self, step: int) -> bool:
    """Whether the checkpoint of ``step`` exists (process 0's view on every process)."""
    return bool(agree(int(step) in self.steps()))

  def clean(self) -> list[str]:
    """Removes leftovers of interrupted saves (process 0); returns their names."""
    removed = self._clean() if is_primary() else []
    barrier(f"clean:{self.root}")
    return removed

  def _clean(self) -> list[str]:
    if not self.checkpoints.is_dir():
      return []
    removed = []
    for p in self.checkpoints.iterdir():
      if not _STEP.match(p.name) and ("step_" in p.name):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed

  def save(self, step: int, phi: Any, opt_state: Any, metadata: dict, keep: int) -> pathlib.Path:
    """Writes the checkpoint of ``step`` (replacing one of the same step) and keeps the last ``keep``."""
    path = self.path(step)
    if is_primary():
      self.checkpoints.mkdir(parents=True, exist_ok=True)
    barrier(f"mkdir:{path}")
    checkpoint.save(path, phi, opt_state, metadata={**metadata, "step": int(step)},
                    overwrite=self.has(step))
    self.prune(keep)
    return path

  def prune(self, keep: int) -> None:
    """Deletes all but the last ``keep`` checkpoints (each renamed away first, then removed;
    process 0)."""
    if is_primary():
      self._prune(keep)
    barrier(f"prune:{self.root}")

  def _prune(self, keep: int) -> None:
    for step in self.steps()[:-keep] if keep > 0 else []:
      path = self.path(step)
      doomed = path.with_name(f".deleting-{path.name}")
      os.replace(path, doomed)
      shutil.rmtree(doomed, ignore_errors=True)

  def metadata(self, step: int) -> dict:
    """The user metadata of the checkpoint of ``step``."""
    return checkpoint.read_metadata(self.path(step))["metadata"]

  def restore(self, step: int, phi_like: Any, opt_state_like: Any) -> checkpoint.Checkpoint:
    return checkpoint.restore(self.path(step), phi_like, opt_state_like)

  def remove_all(self) -> None:
    """Drops every checkpoint (a fresh start of a run that has some; process 0)."""
    if is_primary():
      self._remove_all()
    barrier(f"remove_all:{self.root}")

  def _remove_all(self) -> None:
    if self.checkpoints.exists():
      doomed = self.checkpoints.with_name(".deleting-checkpoints")
      shutil.rmtree(doomed, ignore_errors=True)
      os.replace(self.checkpoints, doomed)
      shutil.rmtree(doomed, ignore_errors=True)
