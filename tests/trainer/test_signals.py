"""SIGTERM/SIGINT become a flag; a child armed with die_with_parent gets SIGTERM when its
parent dies by SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lowrank_jax.trainer import signals as signals_lib
from lowrank_jax.trainer.signals import StopFlag

SIGNALS = signals_lib.__file__


def test_first_signal_sets_the_flag_second_sigint_raises_and_handlers_are_restored():
  before = signal.getsignal(signal.SIGTERM)
  with StopFlag() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert stop.requested and stop.signal == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
  assert signal.getsignal(signal.SIGTERM) is before


CHILD = textwrap.dedent(f"""
    import importlib.util, os, signal, sys, time
    # the module alone (it imports only the standard library), not the whole package
    spec = importlib.util.spec_from_file_location("signals", {str(SIGNALS)!r})
    signals = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(signals)
    def bye(signum, frame):
      open(sys.argv[1], "w").write(signal.Signals(signum).name)
      sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    print(signals.die_with_parent(int(sys.argv[2])), flush=True)
    time.sleep(60)
""")
PARENT = textwrap.dedent("""
    import os, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], str(os.getpid())])
    print(child.pid, flush=True)
    child.wait()
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_child_gets_sigterm_when_its_parent_is_killed(tmp_path):
  marker = tmp_path / "marker"
  parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(marker)], stdout=subprocess.PIPE,
                            text=True)
  int(parent.stdout.readline())  # the child's pid
  how = parent.stdout.readline().strip()  # the child armed the death signal (same stdout)
  assert how == ("prctl" if sys.platform.startswith("linux") else "poll")
  parent.kill()
  parent.wait()
  t0 = time.monotonic()
  while not marker.exists() and time.monotonic() - t0 < 60:
    time.sleep(0.05)
  assert marker.read_text() == "SIGTERM"
