"""One training run over two processes x 4 fake CPU devices (``jax.distributed`` on
localhost), through the command as a user launches it on two hosts:

1. ``lowrank-jax-train CONFIG --mesh fsdp:2,data:2,tensor:2 --coordinator localhost:PORT
   --num-processes 2 --process-id I --set mesh.dcn=fsdp:2`` in two processes (each runs the
   config in its child process, which joins the run). The FSDP axis spans the two processes
   (a hybrid mesh: ``mesh_utils.create_hybrid_device_mesh``, each process a slice), so each
   reads half of the base's bytes from the safetensors file; data and tensor axes are within
   them.
2. Both processes (command and child) are SIGKILLed mid-run; the same command with
   ``--resume`` continues in two processes. Then only process 1's command is SIGKILLed:
   its training process gets SIGTERM (it never outlives its parent), and both training
   processes stop after the same step with a checkpoint (a stop agreed between them;
   process 0 got no signal). ``--resume`` once more finishes the run. Every checkpoint of
   the run equals the one-device run's at the same step (1e-6).
3. The checkpoint the kill left is resumed by one process on one device and by one
   process on 8 devices: both reach the one-device run's final state (1e-6).

Every process has a timeout and is killed (with its children) at the end, so nothing hangs
or outlives the test.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from lowrank_jax.trainer import cli
from lowrank_jax.trainer.rundir import RunDir
from tests.trainer.conftest import ROOT
from tests.trainer.test_mesh import assert_same_state, checkpoint_arrays, mesh_config, needs_8

MESH2 = "fsdp:2,data:2,tensor:2"  # fsdp first: it is the axis that spans the two processes
DCN = "fsdp:2"  # ... as a hybrid (multislice) mesh: each process is a slice, fsdp spans them
NAME = "sft_tiny_mesh"
STEPS = 7  # a checkpoint after each (configs/sft_tiny_mesh.json)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(cache: pathlib.Path) -> dict:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
         "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(var, None)
  return env


def _launch(cfg: str, out: pathlib.Path, logs: pathlib.Path, env: dict, *extra: str) -> list:
  """The command in two processes (fresh coordinator port); output to ``logs/<i>.log``."""
  port = _free_port()
  procs = []
  for i in range(2):
    log = open(logs / f"{i}.log", "w")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "lowrank_jax.trainer.cli", cfg, "--out", str(out), "--quiet", "--mesh", MESH2,
         "--set", f"mesh.dcn={DCN}", "--coordinator", f"localhost:{port}", "--num-processes", "2",
         "--process-id", str(i), *extra],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    log.close()
  return procs


def _children(pid: int) -> list[int]:
  out = []
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      out.append(int(stat.parent.name))
  return out


def _alive(pid: int) -> bool:
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _kill(procs) -> None:
  """SIGKILL the commands' children (the training processes), then the commands."""
  pids = [c for p in procs for c in _children(p.pid)]
  for pid in pids + [p.pid for p in procs]:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  for p in procs:
    p.wait(timeout=30)
  deadline = time.monotonic() + 30
  while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
    time.sleep(0.05)


def _wait(procs, logs: pathlib.Path, timeout: float = 420) -> None:
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs):
    if time.monotonic() > deadline:
      _kill(procs)
      pytest.fail(f"two-process run did not finish in {timeout} s:\n{_tail(logs)}")
    time.sleep(0.1)
  assert [p.returncode for p in procs] == [0, 0], _tail(logs)


def _tail(logs: pathlib.Path) -> str:
  return "\n".join(f"--- process {i}:\n" + "\n".join(
      l for l in (logs / f"{i}.log").read_text().splitlines()[-40:] if "spmd_partitioner" not in l)
      for i in range(2))


def _number(text: str) -> int:
  return int(text.replace(",", ""))


def _steps(run: pathlib.Path) -> list[int]:
  return RunDir(run).steps()


@needs_8
@pytest.mark.slow
def test_two_processes_equal_one_device_survive_sigkill_and_resume_on_any_device_count(tmp_path, capsys):
  cfg = mesh_config(tmp_path, training={"max_steps": STEPS})
  env = _env(tmp_path / "jax_cache")
  logs = tmp_path / "logs"
  logs.mkdir()
  # the reference: one process, one device
  ref = tmp_path / "ref"
  assert cli.main([cfg, "--out", str(ref), "--inline", "--quiet", "--mesh", "none"]) == 0
  assert _steps(ref / NAME) == list(range(1, STEPS + 1))

  # two processes, killed (commands and training processes) once two checkpoints exist
  out = tmp_path / "out"
  procs = _launch(cfg, out, logs, env)
  try:
    deadline = time.monotonic() + 420
    while len(_steps(out / NAME)) < 2:
      if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
        pytest.fail(f"no second checkpoint (exit codes {[p.poll() for p in procs]}):\n{_tail(logs)}")
      time.sleep(0.01)
  finally:
    _kill(procs)
  killed_at = _steps(out / NAME)[-1]
  assert killed_at < STEPS and not (out / f"{NAME}.json").exists(), "the run ended before the kill"
  for d in ("one", "eight"):  # that checkpoint, for the single-process resumes below
    shutil.copytree(out / NAME, tmp_path / d / NAME)

  # the same command with --resume: two processes continue from the latest complete checkpoint;
  # once they have written one more, process 1's command dies
  procs = _launch(cfg, out, logs, env, "--resume")
  try:
    while _steps(out / NAME)[-1] <= killed_at:
      assert all(p.poll() is None for p in procs), _tail(logs)
      time.sleep(0.01)
    orphan = _children(procs[1].pid)
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].wait(timeout=30)
    assert procs[0].wait(timeout=240) == 0, _tail(logs)
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in orphan) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert orphan and not any(_alive(pid) for pid in orphan), "the training process outlived its command"
  finally:
    _kill(procs)
  log0 = (logs / "0.log").read_text()
  assert f"resuming from step {killed_at} of {STEPS}" in log0
  stopped_at = int(re.search(rf"interrupted by SIGTERM at step (\d+) of {STEPS}; checkpoint: \S+step_0*\1", log0)[1])
  assert killed_at < stopped_at < STEPS and _steps(out / NAME)[-1] == stopped_at
  assert not (out / f"{NAME}.json").exists()

  # --resume again: to the end
  procs = _launch(cfg, out, logs, env, "--resume")
  try:
    _wait(procs, logs)
  finally:
    _kill(procs)
  log0, log1 = ((logs / f"{i}.log").read_text() for i in range(2))
  assert f"resuming from step {stopped_at} of {STEPS}" in log0
  for i, log in enumerate((log0, log1)):  # each process read only the slices its devices hold
    read, total = map(_number, re.search(rf"process {i} of 2 read ([\d,]+) of the base's ([\d,]+) bytes",
                                         log).groups())
    assert total == 34_112 and total / 2 <= read < total  # FSDP-split leaves half, replicated ones whole
  assert "process 1: done; process 0 writes" in log1
  row = json.loads((out / f"{NAME}.json").read_text())
  assert row["status"] == "completed" and row["processes"] == 2 and row["step_compilations"] == 1
  assert [r["name"] for r in json.loads((out / "results.json").read_text())] == [NAME]
  worst = 0.0
  for step in range(1, STEPS + 1):  # steps before and after the kill
    path = f"{NAME}/checkpoints/step_{step:08d}"
    worst = max(worst, assert_same_state(checkpoint_arrays(ref / path), checkpoint_arrays(out / path)))
  figures = [f"largest difference, two processes vs one device: {worst:.3g}"]

  # the killed run's checkpoint resumed by one process on one device, then on 8 devices
  final = checkpoint_arrays(ref / f"{NAME}/checkpoints/step_{STEPS:08d}")
  capsys.readouterr()
  for d, mesh in (("one", "none"), ("eight", MESH2)):
    assert cli.main([cfg, "--out", str(tmp_path / d), "--inline", "--quiet", "--resume", "--mesh", mesh]) == 0
    assert f"resuming from step {killed_at} of {STEPS}" in capsys.readouterr().err
    got = checkpoint_arrays(tmp_path / d / f"{NAME}/checkpoints/step_{STEPS:08d}")
    figures.append(f"largest difference, resumed by one process on {mesh} vs one device: {assert_same_state(final, got):.3g}")
  print("\n".join(figures))
