"""Checkpoint folders of a run: step naming, keep-last-K, latest complete, leftovers of
interrupted saves and deletions cleaned, a round trip through lowrank_jax.checkpoint."""

import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.trainer.rundir import RunDir


def test_save_keeps_the_last_k_and_restores(tmp_path):
  rd = RunDir(tmp_path / "run")
  assert rd.latest() is None and rd.steps() == []
  phi = {"a": jnp.arange(6.0).reshape(2, 3), "b": None}
  opt = optax.adam(0.1).init(phi)
  for step in (2, 4, 6, 8):
    rd.save(step, {"a": phi["a"] + step, "b": None}, opt, {"note": step}, keep=2)
  assert rd.steps() == [6, 8] and rd.latest() == 8
  assert sorted(p.name for p in rd.checkpoints.iterdir()) == ["step_00000006", "step_00000008"]
  ck = rd.restore(6, phi, opt)
  np.testing.assert_array_equal(ck.phi["a"], np.arange(6.0).reshape(2, 3) + 6)
  assert ck.phi["b"] is None
  meta = rd.metadata(6)
  assert meta["step"] == 6 and meta["note"] == 6


def test_clean_removes_unfinished_saves_and_deletions_only(tmp_path):
  rd = RunDir(tmp_path / "run")
  rd.save(3, {"a": jnp.ones(2)}, None, {}, keep=3)
  leftovers = ["step_00000005.orbax-checkpoint-tmp-1", ".deleting-step_00000001", ".step_00000003.staging"]
  for name in leftovers:
    (rd.checkpoints / name).mkdir()
    (rd.checkpoints / name / "junk").write_text("x")
  (rd.checkpoints / "notes.txt").write_text("the user's")
  assert sorted(rd.clean()) == sorted(leftovers)
  assert sorted(p.name for p in rd.checkpoints.iterdir()) == ["notes.txt", "step_00000003"]
  assert rd.latest() == 3
  rd.remove_all()
  assert not rd.checkpoints.exists() and rd.latest() is None
