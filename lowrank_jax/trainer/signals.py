"""Stopping cleanly: SIGTERM/SIGINT become a flag the loop reads between steps, and a child
process never outlives the parent that started it.

* :class:`StopFlag` (a context manager) turns the first SIGTERM or SIGINT into
  ``flag.signal`` (the loop finishes its step, writes a checkpoint and returns); a second
  SIGINT raises ``KeyboardInterrupt`` as usual. ``forward_to`` passes the signal on to a
  child process (the parent of a per-config child).
* :func:`die_with_parent` (called first thing in a child): on Linux
  ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, so the kernel sends SIGTERM when the parent dies,
  even by SIGKILL; elsewhere a daemon thread polls ``os.getppid()``. Either way the child
  then stops like on any SIGTERM. If the parent is already gone when it is called, the
  child signals itself at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

__all__ = ["StopFlag", "die_with_parent"]

PR_SET_PDEATHSIG = 1
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
  """Records the first SIGTERM/SIGINT while active (main thread only; elsewhere inert)."""

  def __init__(self):
    self.signal: Optional[str] = None
    self.child: Optional[subprocess.Popen] = None
    self._previous: dict = {}

  @property
  def requested(self) -> bool:
    return self.signal is not None

  def forward_to(self, child: Optional[subprocess.Popen]) -> None:
    """Signals received from now on are passed to ``child`` as well (``None``: stop forwarding)."""
    self.child = child

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signum)
    if self.signal is not None and signum == signal.SIGINT and self.child is None:
      raise KeyboardInterrupt
    if self.signal is None:
      self.signal = name
      print(f"\n{name} received: finishing the current step, then writing a checkpoint "
            f"(SIGINT again to abort at once)", file=sys.stderr, flush=True)

  def __enter__(self) -> "StopFlag":
    if threading.current_thread() is threading.main_thread():
      for s in _SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()


def _watch_parent(parent: int, interval: float) -> None:
  while os.getppid() == parent:
    time.sleep(interval)
  os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent(parent: int, *, interval: float = 0.5) -> str:
  """Makes this process receive SIGTERM when process ``parent`` (its parent) exits.

  Returns ``"prctl"`` or ``"poll"``, the mechanism used.
  """
  how = "poll"
  if sys.platform.startswith("linux"):
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0:
      how = "prctl"
  if how == "poll":
    threading.Thread(target=_watch_parent, args=(parent, interval), daemon=True,
                     name="lowrank_jax-parent-watch").start()
  if os.getppid() != parent:  # the parent died before the death signal was armed
    os.kill(os.getpid(), signal.SIGTERM)
  return how
