"""Streamed merged export (trainer.export.write_merged): the folder equals the dense merge
tensor for tensor (LoRA and QLoRA on a tiny decoder, on an 8-device mesh and on one
device), the host never holds more than one merged leaf, and two processes of 4 devices
write the same folder as one process.

Run alone as ``python tests/trainer/test_export_merged.py OUT PORT PROCESS_ID``: one
process of the two-process export (see :func:`test_two_processes_write_the_one_process_folder`).
"""

from __future__ import annotations

import functools
import pathlib
import re
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import lazy
from lowrank_jax import tree as tree_lib
from lowrank_jax.io import safetensors as st
from lowrank_jax.methods import registry
from lowrank_jax.models import hf_decoder
from lowrank_jax.quant.qlora import quantize
from lowrank_jax.reparam import Reparam, initialize, merge
from lowrank_jax.trainer import export
from lowrank_jax.trainer.config import MeshConfig
from lowrank_jax.trainer.placement import Placement

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "decoders"
ADAPTED = r"(q_proj|v_proj|down_proj)/kernel"
MESH = "data:2,fsdp:2,tensor:2"


def _model(name: str, quantized: bool):
  """``(config, reparam, pretrained theta0, theta0 as trained (NF4 or not), phi)`` with a
  non-zero LoRA update (rank 2, alpha 4) on q/v/down projections (q/v only on expert
  models; their expert stacks are quantized but not adapted)."""
  config, params = hf_decoder.load_pretrained(GOLDEN / name)
  base = quantize(params, ADAPTED, block_size=16) if quantized else params
  where = ADAPTED if not config.num_experts else r"attention/(q_proj|v_proj)/kernel"
  reparam = registry.build("lora", where=where, rank=2, alpha=4)
  theta0, phi = initialize(reparam, jax.random.key(0), base)
  noise = iter(jax.random.split(jax.random.key(1), 1000))
  phi = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(noise), x.shape, x.dtype), phi)
  return config, reparam, params, theta0, phi


def _dense_reference(theta0, phi) -> dict[str, np.ndarray]:
  """``W0 + (alpha / r) A B`` per leaf in float64 numpy (``W0`` dequantised for NF4 leaves)."""
  out = {p: np.asarray(lazy.materialize(w), np.float64) for p, w in tree_lib.flatten_with_paths(theta0)}
  for p, leaf in tree_lib.flatten_with_paths(phi):
    if p.endswith("/a"):
      a, b = np.asarray(leaf, np.float64), np.asarray(dict(tree_lib.flatten_with_paths(phi))[p[:-1] + "b"],
                                                       np.float64)
      out[p[:-2]] = out[p[:-2]] + 2.0 * (a @ b).reshape(out[p[:-2]].shape)
  return out


def _save(config, **kw):
  return lambda folder, abstract, dtype, fetch: hf_decoder.save_pretrained(
      folder, config, abstract, dtype=dtype, fetch=fetch, **kw)


def _placed(config, theta0, phi, mesh: str | None):
  placement = Placement.from_config(MeshConfig(mesh=mesh), config.family)
  theta0_p, specs = placement.place_theta0(theta0)
  phi_p, _ = placement.place_phi(phi, theta0_p, specs)
  return placement.mesh, theta0_p, phi_p


def _folder(folder) -> dict[str, np.ndarray]:
  return {p: np.asarray(w) for p, w in tree_lib.flatten_with_paths(hf_decoder.load_pretrained(folder)[1])}


needs_8 = pytest.mark.skipif("jax.device_count() < 8", reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("mesh", [pytest.param(MESH, marks=needs_8), None], ids=["mesh8", "one_device"])
def test_streamed_folder_equals_the_dense_merge(tmp_path, quantized, mesh):
  config, reparam, _, theta0, phi = _model("llama", quantized)
  ref = _dense_reference(theta0, phi)
  mesh_, theta0_p, phi_p = _placed(config, theta0, phi, mesh)
  export.write_merged(tmp_path / "merged", _save(config), reparam, theta0_p, phi_p, mesh=mesh_)
  got = _folder(tmp_path / "merged")
  assert sorted(got) == sorted(ref)
  adapted = [p for p in ref if p.endswith(("q_proj/kernel", "v_proj/kernel", "down_proj/kernel"))]
  assert len(adapted) == 6
  for p in ref:
    assert got[p].dtype == np.float32, p
    # float32 rounding of the same sum (one ulp: XLA fuses W0 + s A B differently per program)
    np.testing.assert_allclose(got[p], ref[p], rtol=1e-6, atol=1e-7, err_msg=p)
  for p in adapted:  # the update is really there
    assert np.abs(ref[p] - np.asarray(lazy.materialize(dict(tree_lib.flatten_with_paths(theta0))[p]))).max() > 1e-3
  for f in (tmp_path / "merged").iterdir():
    assert f.stat().st_mode & 0o777 == 0o644, f
  assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary folder left


@needs_8
def test_dtype_and_shards_and_expert_stacks_per_leaf(tmp_path):
  """bfloat16 output converted per leaf, several shard files, 3-d expert stacks (Mixtral)."""
  config, reparam, _, theta0, phi = _model("mixtral", False)
  ref = _dense_reference(theta0, phi)
  mesh, theta0_p, phi_p = _placed(config, theta0, phi, MESH)
  export.write_merged(tmp_path / "m", _save(config, max_shard_size="40KB"), reparam, theta0_p, phi_p, mesh=mesh,
                      dtype=jnp.bfloat16)
  names = sorted(f.name for f in (tmp_path / "m").iterdir())
  assert st.INDEX_FILE in names and sum(n.endswith(".safetensors") for n in names) > 2, names
  got = _folder(tmp_path / "m")
  assert sorted(got) == sorted(ref)
  for p in ref:
    assert got[p].dtype == jnp.bfloat16, p
    want = np.asarray(jnp.asarray(ref[p], jnp.float32).astype(jnp.bfloat16), np.float32)
    # the merge rounds to float32 first, then to bfloat16: at most one bfloat16 step apart
    np.testing.assert_allclose(np.asarray(got[p], np.float32), want, rtol=2 ** -7, atol=1e-6, err_msg=p)


def test_export_replaces_an_older_folder(tmp_path):
  config, reparam, _, theta0, phi = _model("llama", False)
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "stale.txt").write_text("old")
  export.write_merged(tmp_path / "m", _save(config), reparam, theta0, phi)
  assert not (tmp_path / "m" / "stale.txt").exists() and (tmp_path / "m" / "config.json").exists()


@pytest.mark.parametrize("mesh", [pytest.param(MESH, marks=needs_8), None], ids=["mesh8", "one_device"])
def test_the_host_holds_one_merged_leaf_at_a_time(tmp_path, mesh, capsys):
  """Every array the export fetches is tracked until it is freed: when each leaf is
  fetched, the fetched arrays still alive sum to at most the largest leaf (the old path,
  ``to_host(merge(...))``, held every leaf at once: the model's bytes)."""
  config, reparam, _, theta0, phi = _model("mixtral", True)
  mesh_, theta0_p, phi_p = _placed(config, theta0, phi, mesh)
  alive = {"bytes": 0, "peak": 0, "fetches": 0}

  def release(n):
    alive["bytes"] -= n

  def save(folder, abstract, dtype, fetch):
    def tracked(path):
      arr = fetch(path)
      alive["fetches"] += 1
      alive["bytes"] += arr.nbytes
      alive["peak"] = max(alive["peak"], alive["bytes"])
      weakref.finalize(arr, release, arr.nbytes)
      return arr
    return hf_decoder.save_pretrained(folder, config, abstract, dtype=dtype, fetch=tracked)

  export.write_merged(tmp_path / "m", save, reparam, theta0_p, phi_p, mesh=mesh_)
  merged = merge(reparam, theta0, phi)
  leaves = [np.asarray(x).nbytes for x in jax.tree.leaves(merged)]
  with capsys.disabled():
    print(f"\n[export {mesh or 'one device'}] peak host bytes of merged leaves alive {alive['peak']:,}; "
          f"largest leaf {max(leaves):,}; whole model (the old path) {sum(leaves):,} in {len(leaves)} leaves")
  assert alive["fetches"] == len(leaves)  # each leaf fetched once (expert stacks too)
  assert max(leaves) <= alive["peak"] <= max(leaves)
  assert sum(leaves) > 4 * max(leaves)  # the bound says something on this model


def test_leaves_alike_but_for_their_constants_are_not_confused(tmp_path):
  """Programs are shared between leaves whose pruned programs print alike (the layers);
  a method whose update is a constant per leaf (captured numpy arrays: the program's
  constants, named by position only in its text) still gets each leaf's own."""
  config, params = hf_decoder.load_pretrained(GOLDEN / "llama")
  rng = np.random.default_rng(0)
  const = {p: rng.standard_normal(w.shape).astype(np.float32) for p, w in tree_lib.flatten_with_paths(params)}

  def apply(theta0, phi, rng=None):
    flat = tree_lib.flatten_with_paths(theta0)
    return jax.tree.unflatten(jax.tree.structure(theta0), [w + const[p] for p, w in flat])

  reparam = Reparam(init=lambda key, t: None, apply=apply, init_with_base=lambda key, t: (t, None))
  _, fetch = export.merged_leaves(reparam, params, None)
  for p, w in tree_lib.flatten_with_paths(params):
    np.testing.assert_array_equal(fetch(p), np.asarray(w) + const[p], err_msg=p)


def test_a_path_outside_the_model_is_named(tmp_path):
  config, reparam, _, theta0, phi = _model("llama", False)
  _, fetch = export.merged_leaves(reparam, theta0, phi)
  with pytest.raises(KeyError, match="layers/layer_9/mlp/nope"):
    fetch("layers/layer_9/mlp/nope")


# ----------------------------------------------------------------------- two processes


def _worker(out: str, port: int, process_id: int) -> None:
  """One of two processes (4 CPU devices each): the LoRA model placed on the 8-device mesh
  across both, exported merged into ``out``."""
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  config, reparam, _, theta0, phi = _model("llama", False)
  mesh, theta0_p, phi_p = _placed(config, theta0, phi, MESH)
  spans = [x for x in jax.tree.leaves(theta0_p) if not x.is_fully_addressable]
  assert spans, "the base should span both processes"
  host = {"leaves": 0, "bytes": 0}

  def save(folder, abstract, dtype, fetch):
    def counted(path):  # what each leaf brought to this process's host
      arr = fetch(path)
      host["leaves"] += 1
      host["bytes"] += 0 if arr is None else arr.nbytes
      return arr
    return hf_decoder.save_pretrained(folder, config, abstract, dtype=dtype, fetch=counted)

  export.write_merged(pathlib.Path(out), save, reparam, theta0_p, phi_p, mesh=mesh)
  print(f"process {process_id}: fetched {host['leaves']} leaves, {host['bytes']} bytes to its host "
        f"({len(spans)} base leaves span both processes)", flush=True)
  jax.distributed.shutdown()


def test_two_processes_write_the_one_process_folder(tmp_path):
  """The model sharded over 2 processes x 4 devices, exported merged: the folder (written
  by process 0 alone) equals the one-process export tensor for tensor; transformers loads it."""
  from tests.test_multihost_trainer import _env, _free_port
  env = _env(tmp_path / "jax_cache")
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path / "two"), str(port), str(i)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=180)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
  config, reparam, _, theta0, phi = _model("llama", False)
  # both processes ran every leaf's program; only process 0's host received the model
  model_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(merge(reparam, theta0, phi)))
  fetched = [re.search(r"process \d: fetched (\d+) leaves, (\d+) bytes", o) for o in outs]
  assert all(fetched), outs
  (n0, b0), (n1, b1) = [(int(m.group(1)), int(m.group(2))) for m in fetched]
  assert n0 == n1 == len(jax.tree.leaves(theta0)) and b0 == model_bytes and b1 == 0, (n0, n1, b0, b1)
  export.write_merged(tmp_path / "one", _save(config), reparam, theta0, phi)
  two, one = _folder(tmp_path / "two"), _folder(tmp_path / "one")
  assert sorted(two) == sorted(one)
  for p in one:  # one ulp: the programs (sharded or not) fuse W0 + s A B differently
    np.testing.assert_allclose(two[p], one[p], rtol=1e-6, atol=1e-7, err_msg=p)
  ref = _dense_reference(theta0, phi)
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two")
  state = model.state_dict()
  w = state["model.layers.0.self_attn.q_proj.weight"].to(torch.float32).numpy()
  np.testing.assert_allclose(w.T, ref["layers/layer_0/attention/q_proj/kernel"], rtol=1e-6, atol=1e-7)


if __name__ == "__main__":
  _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))


# ------------------------------------------------------------------------- through the trainer


def _sft_raw(**export) -> dict:
  from tests.trainer.conftest import DATA
  return {"name": "sft", "task": "sft",
          "model": {"kind": "decoder", "tokenizer": str(DATA / "chat_tokenizer"),
                    "random": {"family": "llama", "vocab_size": 104, "hidden_size": 16, "intermediate_size": 32,
                               "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "max_seq_len": 128}},
          "data": {"train": str(DATA / "sft_train.jsonl"), "seq_len": 64},
          "methods": [{"name": "lora", "where": "attention/(q_proj|v_proj)/kernel", "rank": 2, "alpha": 4}],
          "optimizer": {"lr": 0.02}, "training": {"max_steps": 2, "batch_size": 2},
          "checkpointing": {"every": 0}, "export": {"peft": False, "merged": True, **export}}


def test_a_run_exports_bfloat16_shards(tmp_path):
  """export.merged_dtype and export.merged_max_shard_size through the CLI: shards + index
  in bfloat16; the leaves no method touches are the random base's, rounded to bfloat16."""
  from lowrank_jax.models import decoder
  from lowrank_jax.trainer import cli
  from lowrank_jax.trainer.tasks import Keys
  from tests.trainer.conftest import write_config
  raw = _sft_raw(merged_dtype="bfloat16", merged_max_shard_size="4KB")
  out = tmp_path / "out"
  assert cli.main([str(write_config(tmp_path, raw)), "--out", str(out), "--inline", "--quiet"]) == 0
  folder = out / "sft" / "merged"
  names = sorted(f.name for f in folder.iterdir())
  assert st.INDEX_FILE in names and sum(n.endswith(".safetensors") for n in names) > 2, names
  _, merged = hf_decoder.load_pretrained(folder)
  base = decoder.init_decoder(Keys.from_seed(0).model, decoder.DecoderConfig(**raw["model"]["random"]))
  got, want = dict(tree_lib.flatten_with_paths(merged)), dict(tree_lib.flatten_with_paths(base))
  assert sorted(got) == sorted(want)
  for p in want:
    assert got[p].dtype == jnp.bfloat16, p
    if not p.endswith(("q_proj/kernel", "v_proj/kernel")):
      np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p].astype(jnp.bfloat16)), err_msg=p)


def test_a_bad_shard_size_is_named():
  from lowrank_jax.trainer import config as config_lib
  with pytest.raises(config_lib.ConfigError, match="merged_max_shard_size: size 'lots'"):
    config_lib.from_dict(_sft_raw(merged_max_shard_size="lots"))
