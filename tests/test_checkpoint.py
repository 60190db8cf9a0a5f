"""Checkpoint round trips (phi with None holes + optax adamw state + step + metadata),
atomicity of the Orbax save, and clear errors on mismatched templates."""

import os

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax import checkpoint as ckpt


def _setup():
  k = jax.random.split(jax.random.key(0), 3)
  theta0 = {"dense": {"kernel": jax.random.normal(k[0], (8, 6)), "bias": jnp.zeros(6)},
            "out": {"kernel": jax.random.normal(k[1], (6, 3)), "bias": jnp.zeros(3)}}
  reparam = lj.lora(r"kernel", rank=2, alpha=4)
  phi = reparam.init(k[2], theta0)
  opt = optax.adamw(1e-2, weight_decay=0.01)
  x = jax.random.normal(jax.random.key(5), (16, 8))
  y = jax.random.normal(jax.random.key(6), (16, 3))

  def loss(phi):
    th = reparam.apply(theta0, phi)
    h = jnp.tanh(lj.dot(x, th["dense"]["kernel"]) + th["dense"]["bias"])
    return jnp.mean((lj.dot(h, th["out"]["kernel"]) + th["out"]["bias"] - y) ** 2)

  @jax.jit
  def step(phi, opt_state):
    l, g = jax.value_and_grad(loss)(phi)
    upd, opt_state = opt.update(g, opt_state, phi)
    return optax.apply_updates(phi, upd), opt_state, l

  return phi, opt, step


def test_round_trip_and_resume_is_exact(tmp_path):
  phi, opt, step = _setup()
  assert phi["dense"]["bias"] is None  # None holes
  opt_state = opt.init(phi)
  for _ in range(3):
    phi, opt_state, _ = step(phi, opt_state)
  path = tmp_path / "ckpt_3"
  ckpt.save(path, phi, opt_state, step=3, metadata={"lr": 1e-2, "method": "lora"})
  assert sorted(os.listdir(tmp_path)) == ["ckpt_3"]  # no temporary folder left
  # continue training in memory
  phi_a, os_a = phi, opt_state
  for _ in range(2):
    phi_a, os_a, la = step(phi_a, os_a)
  # restore into fresh templates (abstract shapes) and continue the same way
  phi_like = jax.eval_shape(lambda: phi)
  os_like = jax.eval_shape(lambda: opt.init(phi))
  r = ckpt.restore(path, phi_like, os_like)
  assert r.step == 3 and r.metadata == {"lr": 1e-2, "method": "lora"}
  assert r.phi["dense"]["bias"] is None and r.phi["out"]["bias"] is None
  chex.assert_trees_all_equal(r.phi, phi)
  chex.assert_trees_all_equal(r.opt_state, opt_state)
  assert jax.tree_util.tree_structure(r.opt_state) == jax.tree_util.tree_structure(opt_state)
  phi_b, os_b = r.phi, r.opt_state
  for _ in range(2):
    phi_b, os_b, lb = step(phi_b, os_b)
  chex.assert_trees_all_equal(phi_b, phi_a)
  assert float(la) == float(lb)
  meta = ckpt.read_metadata(path)
  assert meta["format"] == ckpt.FORMAT
  assert meta["leaves"]["phi"]["dense/kernel/a"] == [[8, 2], "float32"]
  assert "0/count" in meta["leaves"]["opt_state"]  # adamw's ScaleByAdamState count


def test_phi_only_and_overwrite(tmp_path):
  phi, _, _ = _setup()
  path = tmp_path / "c"
  ckpt.save(path, phi)
  r = ckpt.restore(path, phi)
  chex.assert_trees_all_equal(r.phi, phi)
  assert r.opt_state is None and r.step is None and r.metadata == {}
  with pytest.raises(FileExistsError):
    ckpt.save(path, phi)
  phi2 = jax.tree.map(lambda x: x + 1, phi)
  ckpt.save(path, phi2, step=7, overwrite=True)
  r = ckpt.restore(path, phi)
  chex.assert_trees_all_equal(r.phi, phi2)
  assert r.step == 7


def test_mismatched_template_errors_name_the_path(tmp_path):
  phi, opt, _ = _setup()
  path = tmp_path / "c"
  ckpt.save(path, phi, opt.init(phi))
  os_like = opt.init(phi)
  # wrong rank
  wrong = jax.tree.map(lambda x: x, phi)
  wrong["out"]["kernel"] = {"a": jnp.zeros((6, 4)), "b": jnp.zeros((4, 3))}
  with pytest.raises(ValueError, match=r"phi: leaf 'out/kernel/a' is \(6, 2\) float32 in the checkpoint "
                                       r"but \(6, 4\) float32"):
    ckpt.restore(path, wrong, os_like)
  # wrong dtype
  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), phi)
  with pytest.raises(ValueError, match="bfloat16"):
    ckpt.restore(path, bf, os_like)
  # a template with a leaf the checkpoint lacks / lacking a leaf the checkpoint has
  more = jax.tree.map(lambda x: x, phi)
  more["dense"]["bias"] = jnp.zeros(6)
  with pytest.raises(ValueError, match="no leaf 'dense/bias'"):
    ckpt.restore(path, more, os_like)
  less = jax.tree.map(lambda x: x, phi)
  less["out"]["kernel"] = None
  with pytest.raises(ValueError, match=r"lacks: \['out/kernel/a', 'out/kernel/b'\]"):
    ckpt.restore(path, less, os_like)
  with pytest.raises(ValueError, match="opt_state"):
    ckpt.restore(path, phi, optax.sgd(0.1).init(phi))
  with pytest.raises(FileNotFoundError):
    ckpt.restore(tmp_path / "missing", phi)


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
  """Orbax writes to a temporary folder and renames it at the end: fail the rename."""
  from orbax.checkpoint._src.path import atomicity

  async def boom(self, *a, **k):
    raise RuntimeError("simulated crash before the final rename")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", boom)
  phi, _, _ = _setup()
  with pytest.raises(RuntimeError, match="simulated crash"):
    ckpt.save(tmp_path / "c", phi, step=1)
  assert not (tmp_path / "c").exists()
  leftovers = os.listdir(tmp_path)
  assert leftovers and all(".orbax-checkpoint-tmp" in n for n in leftovers), leftovers
  with pytest.raises(FileNotFoundError):
    ckpt.restore(tmp_path / "c", phi)


def test_tuple_phi_and_nested_optax_states(tmp_path):
  """Non-dict phi (tuples from chain, NamedTuple states) round-trip too."""
  phi = ({"w": {"a": jnp.ones((3, 1)), "b": jnp.zeros((1, 2))}, "v": None}, {"z": jnp.arange(4.0)})
  opt_state = optax.chain(optax.clip(1.0), optax.adam(1e-3)).init(phi)
  ckpt.save(tmp_path / "c", phi, opt_state, step=0)
  r = ckpt.restore(tmp_path / "c", phi, opt_state)
  chex.assert_trees_all_equal(r.phi, phi)
  chex.assert_trees_all_equal(r.opt_state, opt_state)


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity
  phi, _, _ = _setup()
  ckpt.save(tmp_path / "c", phi, step=1)

  async def boom(self, *a, **k):
    raise RuntimeError("simulated crash")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", boom)
  with pytest.raises(RuntimeError):
    ckpt.save(tmp_path / "c", jax.tree.map(lambda x: x + 1, phi), step=2, overwrite=True)
  monkeypatch.undo()
  r = ckpt.restore(tmp_path / "c", phi)
  assert r.step == 1
  chex.assert_trees_all_equal(r.phi, phi)


needs_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices "
                             "(XLA_FLAGS=--xla_force_host_platform_device_count=8)")


@needs_8
def test_restore_onto_other_meshes(tmp_path):
  """Saved on 8 devices as fsdp x tensor, restored on 4, 2, 1 device(s) and replicated."""
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from lowrank_jax import sharding
  k = jax.random.split(jax.random.key(3), 2)
  phi = {"q": {"a": jax.random.normal(k[0], (16, 4)), "b": jax.random.normal(k[1], (4, 32))},
         "bias": jnp.arange(32.0)}
  specs = {"q": {"a": P("fsdp", None), "b": P(None, "tensor")}, "bias": P("tensor")}
  mesh8 = sharding.make_mesh("fsdp:4,tensor:2")
  opt = optax.adam(1e-2)
  sphi = sharding.shard(phi, specs, mesh8)
  sstate = sharding.like(opt.init(sphi), sphi, specs, mesh8)
  assert sstate[0].mu["q"]["b"].sharding.spec == P(None, "tensor")
  ckpt.save(tmp_path / "c", sphi, sstate, step=5)
  want_state = jax.tree.map(np.asarray, sstate)
  for devices, spec in [(jax.devices()[:4], "fsdp:2,tensor:2"), (jax.devices()[2:4], "fsdp:2,tensor:1"),
                        (jax.devices()[7:], "fsdp:1,tensor:1"), (jax.devices(), "fsdp:1,tensor:8")]:
    mesh = sharding.make_mesh(spec, devices)
    phi_like = sharding.shape_structs(phi, specs, mesh)
    state_like = jax.eval_shape(opt.init, phi)
    r = ckpt.restore(tmp_path / "c", phi_like, state_like,
                     shardings=(None, NamedSharding(mesh, P())))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, r.phi), jax.tree.map(np.asarray, phi))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, r.opt_state), want_state)
    assert r.phi["q"]["b"].sharding == NamedSharding(mesh, P(None, "tensor"))
    assert r.opt_state[0].mu["q"]["a"].sharding == NamedSharding(mesh, P())
    assert r.step == 5
  # no sharding anywhere: the first local device
  r = ckpt.restore(tmp_path / "c", jax.tree.map(np.asarray, phi))
  assert r.phi["bias"].sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def test_restore_phi_alone_and_error_lists_both_sides(tmp_path):
  phi, opt, step = _setup()
  opt_state = opt.init(phi)
  phi, opt_state, _ = step(phi, opt_state)
  ckpt.save(tmp_path / "c", phi, opt_state, step=1, metadata={"rng": [0, 42]})
  r = ckpt.restore(tmp_path / "c", jax.eval_shape(lambda: phi))
  chex.assert_trees_all_equal(r.phi, phi)
  assert r.opt_state is None and r.metadata == {"rng": [0, 42]}
  wrong = jax.tree.map(lambda x: x, phi)
  wrong["dense"]["kernel"]["a"] = jnp.zeros((8, 3))
  with pytest.raises(ValueError) as e:
    ckpt.restore(tmp_path / "c", wrong)
  msg = str(e.value)
  assert "leaf 'dense/kernel/a' is (8, 2) float32 in the checkpoint but (8, 3) float32" in msg
  assert "holds (phi):\n    dense/kernel/a  (8, 2) float32\n    dense/kernel/b  (2, 6) float32" in msg
  assert "the template asks for:\n    dense/kernel/a  (8, 3) float32" in msg
  with pytest.raises(TypeError, match="shardings must be a jax.sharding.Sharding or a pair"):
    ckpt.restore(tmp_path / "c", phi, shardings="cpu")


def test_metadata_must_be_json(tmp_path):
  phi, _, _ = _setup()
  with pytest.raises(TypeError, match=r"metadata\['rng'\] is a ArrayImpl"):
    ckpt.save(tmp_path / "c", phi, metadata={"rng": jax.random.key_data(jax.random.key(0))})
  with pytest.raises(TypeError, match=r"metadata\['data'\]\[1\] is a set"):
    ckpt.save(tmp_path / "c", phi, metadata={"data": [1, {2}]})
  assert not (tmp_path / "c").exists()


def test_remote_paths_reach_orbax_unchanged(monkeypatch):
  """A ``gs://`` (any ``scheme://``) path is given to Orbax as is, not made a local path."""
  seen = []

  class Recorder:
    def save(self, path, args):
      seen.append(("save", path))

    def restore(self, path, args):
      seen.append(("restore", path))
      return {"meta": {"format": ckpt.FORMAT, "step": 3, "metadata": {},
                       "leaves": {"phi": {"w": [[2], "float32"]}, "opt_state": {}}},
              "phi": {"w": jnp.ones(2)}}

  monkeypatch.setattr(ckpt, "_checkpointer", Recorder)
  monkeypatch.setattr(ckpt, "_exists", lambda p: p in [s[1] for s in seen])
  url = "gs://bucket/run/step_3"
  ckpt.save(url, {"w": jnp.ones(2)}, step=3)
  r = ckpt.restore(url, {"w": jnp.zeros(2)})
  assert seen == [("save", url), ("restore", url), ("restore", url)]
  assert r.step == 3
  assert ckpt._resolve("s3://b/x") == "s3://b/x" and ckpt._resolve("rel/x") == os.path.abspath("rel/x")


def test_interrupted_swap_is_named_and_completed(tmp_path, monkeypatch):
  """A crash between the overwrite's two renames leaves no checkpoint at the path: restore
  says where the complete one is, and the next save completes the swap first."""
  phi, _, _ = _setup()
  ckpt.save(tmp_path / "c", phi, step=1)
  real_rename, calls = ckpt._rename, []

  def crash_on_second(src, dst):
    calls.append(dst)
    if len(calls) == 2:
      raise RuntimeError("killed between the renames")
    real_rename(src, dst)

  monkeypatch.setattr(ckpt, "_rename", crash_on_second)
  with pytest.raises(RuntimeError, match="between the renames"):
    ckpt.save(tmp_path / "c", jax.tree.map(lambda x: x + 1, phi), step=2, overwrite=True)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == [".c.old", ".c.staging"]
  with pytest.raises(FileNotFoundError, match=r"an overwrite was interrupted: .*\.c\.staging holds a complete"):
    ckpt.restore(tmp_path / "c", phi)
  ckpt.save(tmp_path / "c", jax.tree.map(lambda x: x + 2, phi), step=3, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["c"]
  r = ckpt.restore(tmp_path / "c", phi)
  assert r.step == 3
  chex.assert_trees_all_equal(r.phi, jax.tree.map(lambda x: x + 2, phi))
