"""Multi-process set-up, per-process data and collective checkpoints.

The two-process tests start this file twice as a worker (``python tests/test_distributed.py
worker <port> <pid> <folder>``): ``jax.distributed`` on localhost, 4 fake CPU devices per
process, 8 in all. Each worker has a timeout, so a deadlock fails instead of hanging.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lowrank_jax import distributed, sharding

_WORKER = __name__ == "__main__"  # a worker must not touch the backend before initialize()
needs_8 = pytest.mark.skipif(not _WORKER and len(jax.devices()) < 8, reason="needs 8 devices "
                             "(XLA_FLAGS=--xla_force_host_platform_device_count=8)")


@pytest.fixture
def no_cluster(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed, "_cluster_detected", lambda: False)


def test_initialize_single_process_is_a_no_op(no_cluster):
  info = distributed.initialize()
  assert info == distributed.ProcessInfo(0, 1, jax.local_device_count(), jax.device_count())
  assert not jax.distributed.is_initialized()
  assert distributed.initialize() == info  # idempotent


def test_initialize_half_the_arguments_is_an_error(no_cluster, monkeypatch):
  with pytest.raises(ValueError, match=r"not num_processes \(JAX_NUM_PROCESSES\), process_id"):
    distributed.initialize("localhost:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match=r"got \{'num_processes': 2\} but not coordinator"):
    distributed.initialize()
  monkeypatch.setenv("JAX_PROCESS_ID", "x")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='x' is not an integer"):
    distributed.initialize()
  with pytest.raises(ValueError, match="process_id 2 is not below num_processes 2"):
    distributed.DistributedConfig("localhost:1", 2, 2)
  with pytest.raises(ValueError, match="'host:port'"):
    distributed.DistributedConfig("localhost", 2, 0)
  with pytest.raises(ValueError, match="either config= or the arguments"):
    distributed.initialize("localhost:1", config=distributed.DistributedConfig())


@needs_8
def test_make_mesh_topology_aware_and_auto():
  mesh = distributed.make_mesh("data:2,fsdp:2,tensor:2")
  assert mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  sub = sharding.make_mesh("fsdp:2", jax.devices()[4:])
  assert [d.id for d in sub.devices.flat] == [4, 5]
  with pytest.raises(ValueError, match="names axis 'a' twice"):
    sharding.make_mesh("a:2,a:2")


@needs_8
def test_host_local_batch_single_process():
  mesh = sharding.make_mesh("data:4,tensor:2")
  batch = {"x": np.arange(32.0).reshape(8, 4), "y": np.arange(8)}
  rows = distributed.process_batch_rows(8, mesh, P("data"))
  assert rows == slice(0, 8)
  g = distributed.host_local_batch_to_global(batch, mesh, P("data"))
  assert g["x"].sharding == NamedSharding(mesh, P("data"))
  np.testing.assert_array_equal(np.asarray(g["x"]), batch["x"])
  assert g["x"].addressable_shards[0].data.shape == (2, 4)
  with pytest.raises(ValueError, match=r"batch leaf 'y' has 6 local rows .* 4 batch shards"):
    distributed.host_local_batch_to_global({"y": np.arange(6)}, mesh, P("data"))
  with pytest.raises(ValueError, match="not divisible by the batch axis 'data' of size 4"):
    distributed.process_batch_rows(6, mesh, P("data"))


# ----------------------------------------------------------------- two processes

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_workers(tmp_path, timeout: float = 240.0) -> list[dict]:
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(var, None)
  procs = [subprocess.Popen([sys.executable, __file__, "worker", str(port), str(pid), str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for pid in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      outs.append((p.returncode, out, err))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    for p in procs:
      p.communicate()
    pytest.fail(f"two-process run did not finish in {timeout} s (deadlock?)")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for pid, (rc, out, err) in enumerate(outs):
    assert rc == 0, f"worker {pid} failed (rc {rc}):\n{err[-4000:]}"
  return [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outs]


def _phi(seed: float):
  base = np.arange(16 * 8, dtype=np.float32).reshape(16, 8) / 7
  return {"w": {"a": base + seed, "b": (base[:8] * 2 - seed)}, "v": np.arange(8, dtype=np.float32) + seed}


def _worker(port: int, pid: int, folder: str) -> None:
  from lowrank_jax import checkpoint
  info = distributed.initialize(f"localhost:{port}", 2, pid)
  assert info.num_processes == 2 and info.device_count == 8 and info.local_device_count == 4
  assert distributed.initialize(f"localhost:{port}", 2, pid) == info  # idempotent
  mesh = distributed.make_mesh("fsdp:4,tensor:2")
  specs = {"w": {"a": P("fsdp", "tensor"), "b": P("tensor", "fsdp")}, "v": P("fsdp")}

  def place(tree):
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(
        x.shape, NamedSharding(mesh, s), lambda idx: x[idx]), tree, specs)

  # per-process data: each process passes only its rows
  rows = distributed.process_batch_rows(16, mesh, P("fsdp"))
  full = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = distributed.host_local_batch_to_global({"x": full[rows]}, mesh, P("fsdp"))
  total = float(jax.jit(lambda b: jnp.sum(b["x"] * jnp.arange(16.0)[:, None]))(g))
  try:  # shard() takes global values: a process's rows are refused with a pointer
    sharding.shard({"x": full[rows]}, {"x": P("fsdp")}, mesh)
    shard_err = ""
  except ValueError as e:
    shard_err = str(e)
  # checkpoint: save, overwrite twice, restore on the same 8 devices
  path = os.path.join(folder, "ckpt")
  checkpoint.save(path, place(_phi(0.0)), step=0, metadata={"pid_count": 2})
  checkpoint.save(path, place(_phi(1.0)), step=1, overwrite=True)
  checkpoint.save(path, place(_phi(2.0)), step=2, overwrite=True, metadata={"rng": [1, 2]})
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                      _phi(0.0), specs)
  r = checkpoint.restore(path, like)
  local = {k: [np.asarray(s.data).tolist() for s in x.addressable_shards]
           for k, x in [("a", r.phi["w"]["a"]), ("v", r.phi["v"])]}
  ok = all(np.array_equal(np.asarray(s.data), _phi(2.0)["w"]["a"][s.index])
           for s in r.phi["w"]["a"].addressable_shards)
  leftovers = sorted(n for n in os.listdir(folder) if n != "bert")
  print(json.dumps({"pid": jax.process_index(), "rows": [rows.start, rows.stop], "total": total,
                    "step": r.step, "metadata": r.metadata, "shards_ok": ok, "leftovers": leftovers,
                    "n_local": len(local["a"]), "shard_err": shard_err, **_hosts_checks(folder)}))
  jax.distributed.shutdown()


def _hosts_checks(folder: str) -> dict:
  """A hybrid (multislice) mesh, the base's fingerprint and a sliced BERT load in two processes."""
  from lowrank_jax.models import bert
  from lowrank_jax.trainer import base as base_lib
  from lowrank_jax.trainer.config import MeshConfig
  from lowrank_jax.trainer.placement import Placement, load_bert
  # data spans the two processes (each process is a slice: CPU devices have no slice_index)
  hybrid = sharding.make_mesh("data:2,fsdp:2,tensor:2", dcn="data:2")
  x = jax.make_array_from_callback((8, 4), NamedSharding(hybrid, P(("data", "fsdp"), "tensor")),
                                   lambda idx: np.arange(32.0, dtype=np.float32).reshape(8, 4)[idx])
  # the base's fingerprint: process 0 reads the files, the others get it broadcast
  bert_dir = os.path.join(folder, "bert")
  digest, hash_read = base_lib.shared_folder_hash(bert_dir)
  # a BERT base on fsdp:4 (across the processes) x tensor:2: each process reads its slices
  placement = Placement.from_config(MeshConfig(mesh="fsdp:4,tensor:2"), "bert")
  _, sliced, report = load_bert(bert_dir, np.float32, placement)
  whole = bert.load_bert(bert_dir)[1]
  diff = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in
             zip(jax.tree.leaves(placement.to_host(sliced)), jax.tree.leaves(whole)))
  across = sum(np.asarray(w).nbytes // (2 if any(e is not None and "fsdp" in (e if isinstance(e, tuple) else (e,))
                                                for e in s.sharding.spec) else 1)
               for s, w in zip(jax.tree.leaves(sliced), jax.tree.leaves(whole)))
  return {"hybrid_processes": [[d.process_index for d in row.flat] for row in hybrid.devices],
          "hybrid_sum": float(jax.jit(jnp.sum)(x)), "digest": digest, "hash_read": hash_read,
          "bert_read": report.bytes_read, "bert_total": report.bytes_total, "bert_share": across,
          "bert_diff": diff}


@needs_8
@pytest.mark.slow
def test_two_processes_data_and_checkpoint_overwrite(tmp_path):
  from lowrank_jax import checkpoint
  from lowrank_jax.trainer import base as base_lib
  from tests.trainer.test_base_load import save_tiny_bert
  save_tiny_bert(tmp_path / "bert")
  res = _run_workers(tmp_path)
  # a hybrid mesh (dcn data:2): each data index is one process's 4 devices
  assert all(r["hybrid_processes"] == [[0] * 4, [1] * 4] for r in res)
  assert all(r["hybrid_sum"] == float(np.arange(32.0).sum()) for r in res)
  # the fingerprint: read by process 0 alone, the same on both
  size = sum(os.path.getsize(tmp_path / "bert" / n) for n in ("config.json", "model.safetensors"))
  assert [r["hash_read"] for r in res] == [size, 0]
  assert all(r["digest"] == base_lib.folder_hash(tmp_path / "bert") for r in res)
  # the sliced BERT load: equal to the whole load, each process read its share (half of the
  # fsdp-split leaves, the rest whole), not the whole model
  for r in res:
    assert r["bert_diff"] == 0.0 and r["bert_read"] == r["bert_share"] < r["bert_total"]
    assert r["bert_read"] <= 0.6 * r["bert_total"]
  assert [r["pid"] for r in res] == [0, 1]
  assert [r["rows"] for r in res] == [[0, 8], [8, 16]]
  full = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  expected = float(np.sum(full * np.arange(16.0)[:, None]))
  assert all(r["total"] == expected for r in res)
  assert all(r["step"] == 2 and r["metadata"] == {"rng": [1, 2]} and r["shards_ok"] for r in res)
  assert all(r["n_local"] == 4 for r in res)
  assert all("not the same on each process" in r["shard_err"] and
             "host_local_batch_to_global" in r["shard_err"] for r in res), res[0]["shard_err"]
  assert res[0]["leftovers"] == ["ckpt"]  # no staging or old folder left
  # written by 2 processes on 8 devices, restored by 1 process on 8, 2 and 1 device(s)
  for spec in ("fsdp:4,tensor:2", "fsdp:2", "fsdp:1"):
    mesh = sharding.make_mesh(spec)
    ax = mesh.axis_names[0]
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        mesh, P(ax))), _phi(0.0))
    r = checkpoint.restore(tmp_path / "ckpt", like)
    for got, want in zip(jax.tree.leaves(r.phi), jax.tree.leaves(_phi(2.0))):
      np.testing.assert_array_equal(np.asarray(got), want)
      assert got.sharding.mesh.shape == mesh.shape


if _WORKER and len(sys.argv) == 5 and sys.argv[1] == "worker":
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
