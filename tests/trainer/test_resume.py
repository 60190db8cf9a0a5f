"""Runs that survive: SIGKILL at random moments then ``--resume`` reaches the bitwise-same
trained state as an uninterrupted run; SIGTERM checkpoints and exits 0; killing the parent
stops the training child. Every run is a real ``lowrank-jax-train`` subprocess."""

import json
import random
import signal
import sys

import pytest

from tests.trainer.conftest import finish, start, tiny_config, train_steps, wait_for, write_config

STEPS = 24  # 4 epochs of 6 steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory, subprocess_env):
  """An uninterrupted run: ``(config path, result row)``."""
  tmp = tmp_path_factory.mktemp("reference")
  path = write_config(tmp / "cfg", tiny_config("resume", training={"epochs": 4},
                                               checkpointing={"every": 3, "keep": 2}))
  rc, out = finish(start([path, "--out", tmp / "out", "--inline", "--quiet"], subprocess_env))
  assert rc == 0, out
  result = json.loads((tmp / "out" / "resume.json").read_text())
  assert result["status"] == "completed" and result["steps"] == STEPS
  return path, result


def _same_run(result: dict, ref: dict) -> None:
  assert result["state_sha256"] == ref["state_sha256"]  # phi and optimizer state, bitwise
  assert result["history"] == ref["history"]            # per-epoch losses and accuracies, exactly
  assert result["test_accuracy"] == ref["test_accuracy"] and result["test_loss"] == ref["test_loss"]


def test_resume_after_sigkill_at_random_steps_is_bitwise(tmp_path, subprocess_env, reference):
  path, ref = reference
  out = tmp_path / "out"
  metrics = out / "resume" / "metrics.jsonl"
  targets = sorted(random.Random(0).sample(range(3, STEPS - 3), 2))
  for i, target in enumerate(targets):
    proc = start([path, "--out", out, "--inline", "--quiet"] + ["--resume"] * (i > 0), subprocess_env)
    wait_for(lambda: train_steps(metrics) >= target, proc=proc, what=f"step {target}")
    proc.kill()  # SIGKILL, wherever it is: in a step, a checkpoint save, a metrics write
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "resume.json").exists()
  rc, log = finish(start([path, "--out", out, "--inline", "--quiet", "--resume"], subprocess_env))
  assert rc == 0, log
  assert "resuming from step" in log
  result = json.loads((out / "resume.json").read_text())
  _same_run(result, ref)
  # the metrics file holds every step once, as if the run had never stopped
  steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if '"train"' in l]
  assert steps == list(range(1, STEPS + 1))
  # the last 2 checkpoints are kept, nothing half-written or half-deleted is left
  assert sorted(p.name for p in (out / "resume" / "checkpoints").iterdir()) == [
      f"step_{STEPS - 3:08d}", f"step_{STEPS:08d}"]


def _children(pid: int) -> list[int]:
  with open(f"/proc/{pid}/task/{pid}/children") as f:
    return [int(x) for x in f.read().split()]


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_and_a_killed_parent_checkpoint_and_stop_then_resume_bitwise(tmp_path, subprocess_env, reference):
  path, ref = reference
  out = tmp_path / "out"
  metrics = out / "resume" / "metrics.jsonl"
  checkpoints = out / "resume" / "checkpoints"
  # 1. SIGTERM to the command (a parent and its training child): the step in flight ends,
  #    a checkpoint of it is written, the command exits 0 saying how to continue
  proc = start([path, "--out", out, "--quiet"], subprocess_env)
  wait_for(lambda: train_steps(metrics) >= 5, proc=proc, what="step 5")
  proc.send_signal(signal.SIGTERM)
  rc, log = finish(proc)
  assert rc == 0, log
  assert "interrupted by SIGTERM" in log and "--resume" in log
  stopped = train_steps(metrics)
  assert (checkpoints / f"step_{stopped:08d}").is_dir() and stopped < STEPS
  assert not (out / "resume.json").exists()
  # 2. resumed, then the parent SIGKILLed: it cannot pass anything on, yet the child stops
  #    (death signal), and like on SIGTERM it checkpoints the step it reached
  proc = start([path, "--out", out, "--quiet", "--resume"], subprocess_env)
  wait_for(lambda: train_steps(metrics) >= stopped + 3, proc=proc, what=f"step {stopped + 3}")
  (child,) = _children(proc.pid)
  proc.kill()
  finish(proc)
  wait_for(lambda: not _alive(child), timeout=60, what="the child to exit")
  stopped = train_steps(metrics)
  assert (checkpoints / f"step_{stopped:08d}").is_dir() and stopped < STEPS
  assert all(p.name.startswith("step_") for p in checkpoints.iterdir())  # nothing half-written
  # 3. resumed to the end: the same trained state as the uninterrupted run
  rc, log = finish(start([path, "--out", out, "--inline", "--quiet", "--resume"], subprocess_env))
  assert rc == 0, log
  assert f"resuming from step {stopped} " in log
  _same_run(json.loads((out / "resume.json").read_text()), ref)
