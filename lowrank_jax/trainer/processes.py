"""Many processes running one training job: joining, agreeing, writing once.

Every process of a multi-process run (one per host, or per GPU) runs the same program on
its own devices; ``jax.Array`` values are global. What a process decides from local state
must be the same everywhere, or the next collective deadlocks:

* :func:`join`: ``jax.distributed`` from the command line, the config, the environment
  or the detected cluster (TPU pod, SLURM, ...), before any other JAX call;
* :func:`agree`: process 0's view of the file system (which checkpoints exist) on every
  process; :func:`barrier`: wait for all;
* :class:`AgreedStop`: a SIGTERM seen by one process stops every process after the
  same step;
* :func:`is_primary`: process 0 alone writes the files meant to exist once (metrics,
  results, exports); checkpoints are written by all (Orbax coordinates them).
"""

from __future__ import annotations

import signal as signal_lib
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from lowrank_jax import distributed
from lowrank_jax.trainer.config import DistributedSection
from lowrank_jax.trainer.signals import StopFlag

__all__ = ["join", "is_primary", "agree", "barrier", "AgreedStop"]


def join(section: DistributedSection, *, coordinator: Optional[str] = None,
         num_processes: Optional[int] = None, process_id: Optional[int] = None) -> distributed.ProcessInfo:
  """Joins the multi-process run, if there is one (before any other JAX call).

  The keywords (the command line) win over ``section`` (the config), which wins over the
  environment and the cluster ``jax.distributed`` detects; with none of them this is a
  single-process run and nothing happens (:func:`lowrank_jax.distributed.initialize`).
  """
  pick = lambda a, b: a if a is not None else b
  return distributed.initialize(
      pick(coordinator, section.coordinator), pick(num_processes, section.num_processes),
      pick(process_id, section.process_id), local_device_ids=section.local_device_ids,
      timeout_s=section.timeout_s)


def is_primary() -> bool:
  """Process 0: the one that writes files meant to exist once (metrics, results, exports)."""
  return jax.process_index() == 0


def agree(value: int) -> int:
  """Process 0's ``value`` (an int) on every process; ``value`` itself with one process."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def barrier(name: str) -> None:
  """Waits for every process (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"lowrank_jax.trainer:{name}")


class AgreedStop:
  """A :class:`~lowrank_jax.trainer.signals.StopFlag` every process reads alike.

  With several processes a SIGTERM (a preempted host, a dying parent) reaches them at
  different steps, and a process that stops to write a (collective) checkpoint while the
  others run their next (collective) step would deadlock them. Each read of
  :attr:`requested` is therefore a collective: it is ``True`` on every process as soon
  as one of them has a signal. Every process reads it at the same points of the loop.
  """

  def __init__(self, flag: StopFlag):
    self.flag = flag
    self._agreed: Optional[str] = None

  @property
  def requested(self) -> bool:
    if self._agreed is not None:
      return True
    if jax.process_count() == 1:
      if self.flag.requested:
        self._agreed = self.flag.signal
      return self._agreed is not None
    mine = signal_lib.Signals[self.flag.signal].value if self.flag.requested else 0
    codes = np.asarray(multihost_utils.process_allgather(np.asarray([mine], np.int32))).ravel()
    got = [int(c) for c in codes if c]
    if got:
      self._agreed = signal_lib.Signals(got[0]).name
    return self._agreed is not None

  @property
  def signal(self) -> Optional[str]:
    return self._agreed if self._agreed is not None else self.flag.signal
