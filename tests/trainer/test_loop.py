"""The loop with a stand-in step (no compilation): the data order is a pure function of
(seed, epoch, position), checkpoints fall every N steps and at the end, a stop request
checkpoints the step reached, a non-finite step stops the run without saving it."""

import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lowrank_jax.trainer import loop
from lowrank_jax.trainer.signals import StopFlag


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 200), seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 1000))
def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch(n, seed, epoch):
  order = loop.epoch_order(n, seed, epoch)
  assert sorted(order.tolist()) == list(range(n))
  np.testing.assert_array_equal(order, loop.epoch_order(n, seed, epoch))


def test_batches_cover_each_epoch_once_and_differ_between_epochs():
  rows = {"x": np.arange(10), "y": np.arange(10) * 2}
  epoch0 = [loop.batch_at(rows, 3, 7, 0, i) for i in range(3)]
  seen = np.concatenate([b["x"] for b in epoch0])
  assert len(set(seen.tolist())) == 9 and all((b["y"] == 2 * b["x"]).all() for b in epoch0)
  assert not np.array_equal(seen, np.concatenate([loop.batch_at(rows, 3, 7, 1, i)["x"] for i in range(3)]))
  with pytest.raises(IndexError, match="past the 3 full batches"):
    loop.batch_at(rows, 3, 7, 0, 3)


def _fake_step(phi, opt_state, theta0, batch, key, *, diverge_at=None, on_step=None):
  """phi <- phi + sum(batch rows); the loss is the new phi; 'finite' fails at ``diverge_at``."""
  step = opt_state + 1
  phi = phi + float(batch["x"].sum())
  if on_step:
    on_step(step)
  return phi, step, {"loss": phi, "grad_norm": 1.0, "finite": step != diverge_at}


def _run(tmp_path, total=10, every=3, diverge_at=None, stop=None, on_step=None, start=None):
  saved = []
  rows = {"x": np.arange(8.0)}
  state = start or loop.LoopState(phi=0.0, opt_state=0)
  out = loop.run_loop(
      name="t", state=state, step_fn=lambda *a: _fake_step(*a, diverge_at=diverge_at, on_step=on_step),
      theta0=None, rows=rows, batch_size=2, seed=0, key=jax.random.key(0), total_steps=total,
      evaluate_epoch=lambda phi: {"val_score": phi}, checkpoint=lambda s: saved.append((s.step, s.phi)),
      every=every, stop=stop or StopFlag(), metrics_path=tmp_path / "m.jsonl", log_every=2,
      schedule=lambda step: 0.1, tokens=lambda b: 2, quiet=True)
  return out, saved


def test_checkpoints_every_n_and_at_the_end_with_epoch_history(tmp_path):
  out, saved = _run(tmp_path)
  assert out.status == "completed" and out.state.step == 10
  assert [s for s, _ in saved] == [3, 6, 9, 10]
  # 4 steps an epoch: epoch rows at steps 4 and 8, and the last (partial) one at 10
  assert [(h["epoch"], h["step"]) for h in out.state.history] == [(1, 4), (2, 8), (3, 10)]
  assert out.state.history[0]["val_score"] == 28.0  # one epoch adds every row once: 0 + ... + 7
  lines = [json.loads(l) for l in (tmp_path / "m.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if l["kind"] == "train"] == [2, 4, 6, 8, 10]


def _stopping_at(step: int):
  stop = StopFlag()

  def on_step(s):
    if s == step:
      stop.signal = "SIGTERM"
  return stop, on_step


def test_stop_request_checkpoints_the_step_reached(tmp_path):
  stop, on_step = _stopping_at(5)
  out, saved = _run(tmp_path, stop=stop, on_step=on_step)
  assert out.status == "interrupted" and out.signal == "SIGTERM" and out.state.step == 5
  assert [s for s, _ in saved] == [3, 5]


def test_a_resumed_loop_equals_an_uninterrupted_one(tmp_path):
  full, _ = _run(tmp_path)
  stop, on_step = _stopping_at(6)  # mid-epoch: the running epoch loss goes along
  half, _ = _run(tmp_path, stop=stop, on_step=on_step)
  resumed, _ = _run(tmp_path, start=half.state)
  assert resumed.state.phi == full.state.phi and resumed.state.history == full.state.history


def test_a_non_finite_step_stops_without_saving_it(tmp_path):
  out, saved = _run(tmp_path, diverge_at=7)
  assert out.status == "diverged" and out.diverged["step"] == 7
  assert out.state.step == 6 and [s for s, _ in saved] == [3, 6]  # the last good state
  last = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
  assert last["kind"] == "diverged" and last["step"] == 7
