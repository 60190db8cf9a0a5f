"""The trainer on a device mesh, one process with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``): the base read slice by slice onto
the family's layout (config rules first), adapters and optimizer state placed from their
base's specs, and a mesh run that follows the one-device run step for step (1e-6) and
compiles its step once. The two-process run is tests/test_multihost_trainer.py."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lowrank_jax import checkpoint, tree as tree_lib
from lowrank_jax.io import hf as hf_io
from lowrank_jax.models import decoder, hf_decoder
from lowrank_jax.trainer import cli, config as C
from lowrank_jax.trainer.placement import Placement, load_decoder
from lowrank_jax.trainer.run import prepare
from tests.trainer.conftest import ROOT

MESH = "data:2,fsdp:2,tensor:2"
CONFIG = ROOT / "configs" / "sft_tiny_mesh.json"
needs_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices "
                             "(XLA_FLAGS=--xla_force_host_platform_device_count=8)")


@pytest.fixture(autouse=True)
def _at_the_repository_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # the config names its data files relative to the repository


# ------------------------------------------------------------------------- helpers

def base_folder(folder):
  """configs/sft_tiny_mesh.json's random decoder saved as a Hugging Face folder (read by slices)."""
  raw = json.loads(CONFIG.read_text())
  dcfg = decoder.DecoderConfig(**raw["model"]["random"])
  params = decoder.init_decoder(jax.random.key(7), dcfg, jnp.float32)
  hf_decoder.save_pretrained(folder, dcfg, params)
  return folder


def mesh_config(tmp_path, **sections) -> str:
  """configs/sft_tiny_mesh.json on a Hugging Face folder base, ``sections`` merged in."""
  raw = json.loads(CONFIG.read_text())
  raw["model"] = {"kind": "decoder", "path": str(base_folder(tmp_path / "base")),
                  "tokenizer": raw["model"]["tokenizer"]}
  for k, v in sections.items():
    raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
  path = tmp_path / f"{raw['name']}.json"
  path.write_text(json.dumps(raw))
  return str(path)


def checkpoint_arrays(path) -> dict:
  """``{"phi/<leaf>": array, "opt_state/<leaf>": array}`` of a checkpoint, restored onto one
  device from its own leaf table (any mesh or process count wrote it)."""
  leaves = checkpoint.read_metadata(path)["leaves"]
  like = {part: hf_io.unflatten({k: jax.ShapeDtypeStruct(tuple(s), np.dtype(d)) for k, (s, d) in table.items()})
          for part, table in leaves.items()}
  ck = checkpoint.restore(path, like["phi"], like["opt_state"] or None)
  out = {f"phi/{k}": np.asarray(v) for k, v in hf_io.flatten(ck.phi).items()}
  out.update({f"opt_state/{k}": np.asarray(v) for k, v in hf_io.flatten(ck.opt_state or {}).items()})
  return out


def assert_same_state(a: dict, b: dict, atol: float = 1e-6) -> float:
  """Both checkpoints hold the same leaves, equal to ``atol``; returns the largest difference."""
  assert sorted(a) == sorted(b)
  worst = 0.0
  for k in a:
    assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)
    worst = max(worst, float(np.max(np.abs(a[k].astype(np.float64) - b[k]), initial=0.0)))
  return worst


# --------------------------------------------------------------------------- tests

@needs_8
def test_base_is_read_by_slices_onto_the_family_layout_with_the_config_rules_first(tmp_path):
  folder = base_folder(tmp_path / "base")
  mc = C.MeshConfig(mesh=MESH, rules=(("lm_head/kernel$", ("fsdp", None)),))
  placement = Placement.from_config(mc, "llama")
  _, params, report = load_decoder(str(folder), jnp.float32, placement)
  _, ref = hf_decoder.load_pretrained(folder, dtype=jnp.float32)
  mesh = placement.mesh
  want = {"layers/layer_0/attention/q_proj/kernel": P("fsdp", "tensor"),  # column parallel
          "layers/layer_1/attention/o_proj/kernel": P("tensor", "fsdp"),  # row parallel
          "layers/layer_0/mlp/down_proj/kernel": P("tensor", "fsdp"),
          "embed_tokens/embedding": P("tensor", "fsdp"),  # vocab parallel
          "lm_head/kernel": P("fsdp", None),  # the config's rule, not the family's P(fsdp, tensor)
          "norm/scale": P()}
  got = dict(tree_lib.flatten_with_paths(params))
  for path, x in tree_lib.flatten_with_paths(ref):
    y = got[path]
    assert y.shape == x.shape and y.dtype == x.dtype, path
    for shard in y.addressable_shards:  # every device holds exactly its slice of the file's tensor
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(x)[shard.index], err_msg=path)
    if path in want:
      assert y.sharding == NamedSharding(mesh, want[path]), (path, y.sharding.spec)
  assert set(want) <= set(got)
  # one process holds every device: it reads every byte once (two processes: half, see
  # tests/test_multihost_trainer.py)
  assert report.bytes_read == report.bytes_total == tree_lib.count_bytes(ref)


@needs_8
def test_setup_places_adapters_and_optimizer_state_from_the_base_specs(tmp_path):
  config = C.load(mesh_config(tmp_path))
  p = prepare(config)
  placement, setup = p.problem.placement, p.setup
  assert placement.batch_spec == P(("data", "fsdp")) and placement.batch_shards == 4
  q = setup.theta0["layers"]["layer_0"]["attention"]["q_proj"]["kernel"]
  assert q.sharding.spec == P("fsdp", "tensor")
  lora = setup.phi[0]["layers"]["layer_0"]
  # a [in, r] of a P(fsdp, tensor) base: its input entry is the FSDP axis, which small
  # factors are not split along; b [r, out] takes the output entry
  assert lora["attention"]["q_proj"]["kernel"]["a"].sharding.spec == P()
  assert lora["attention"]["q_proj"]["kernel"]["b"].sharding.spec == P(None, "tensor")
  assert lora["mlp"]["down_proj"]["kernel"]["a"].sharding.spec == P("tensor", None)  # row parallel base
  state = placement.place_opt_state(setup.optimizer.init(setup.phi), setup.phi, setup.phi_specs)
  moments = [(path, x) for path, x in tree_lib.flatten_with_paths(state)
             if "q_proj/kernel/b" in path and x.ndim == 2]
  assert moments and all(x.sharding.spec == P(None, "tensor") for _, x in moments)  # Adam's mu, nu
  # the global batch from this process's rows (all of them in one process)
  assert placement.local_rows(4) == slice(0, 4)
  batch = placement.batch({k: v[:4] for k, v in p.problem.train_rows.items()})
  assert batch["input_ids"].sharding == NamedSharding(placement.mesh, P(("data", "fsdp")))
  np.testing.assert_array_equal(np.asarray(batch["input_ids"]), p.problem.train_rows["input_ids"][:4])
  with pytest.raises(ValueError, match=r"training.batch_size 6 is not divisible by the 4 batch shards"):
    placement.check_batch(6)


@needs_8
def test_a_quantized_base_keeps_its_codes_sharded_like_its_weight(tmp_path):
  """QLoRA on the mesh: the NF4 codes ``[in, out/2]`` and block scales take the weight's
  spec ``P(fsdp, tensor)`` and are gathered along FSDP only inside the matmul; the
  weights they decode to are the one-device run's, bit for bit."""
  cfg = mesh_config(tmp_path, quantize={"codec": "nf4", "block_size": 16})
  sharded = prepare(C.load(cfg)).setup.theta0
  one = prepare(C.load(cfg, ["mesh.mesh=null"])).setup.theta0
  w = sharded["layers"]["layer_0"]["attention"]["q_proj"]["kernel"]
  placed = {tuple(x.shape): x.sharding.spec for x in jax.tree.leaves(w) if x.ndim == 2}
  assert placed == {(16, 8): P("fsdp", "tensor"), (16, 1): P("fsdp", None)}  # codes, scales
  assert w.compute_sharding.spec == P(None, "tensor")
  ref = one["layers"]["layer_0"]["attention"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(np.asarray(w.materialize()), np.asarray(ref.materialize()))


@needs_8
@pytest.mark.slow
def test_mesh_run_equals_the_one_device_run_and_compiles_its_step_once(tmp_path, capsys):
  cfg = mesh_config(tmp_path, training={"max_steps": 3})
  assert cli.main([cfg, "--out", str(tmp_path / "one"), "--inline", "--quiet", "--mesh", "none"]) == 0
  assert cli.main([cfg, "--out", str(tmp_path / "mesh"), "--inline", "--quiet"]) == 0
  assert "read 34,112 of the base's 34,112 bytes" in capsys.readouterr().err
  one, mesh = (json.loads((tmp_path / d / "sft_tiny_mesh.json").read_text()) for d in ("one", "mesh"))
  assert one["placement"] == "one device"
  assert mesh["placement"].startswith("mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 devices")
  # three steps, one compilation: the outputs keep the inputs' placements
  assert one["step_compilations"] == mesh["step_compilations"] == 1
  worst = 0.0
  for step in (1, 2, 3):
    path = f"sft_tiny_mesh/checkpoints/step_{step:08d}"
    worst = max(worst, assert_same_state(checkpoint_arrays(tmp_path / "one" / path),
                                         checkpoint_arrays(tmp_path / "mesh" / path)))
  print(f"largest difference mesh vs one device over 3 steps: {worst:.3g}")
  assert mesh["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6, abs=1e-6)
  # the exported adapters too (gathered from the mesh, written once)
  a = hf_io.load_safetensors(tmp_path / "one/sft_tiny_mesh/adapter/adapter_model.safetensors")
  b = hf_io.load_safetensors(tmp_path / "mesh/sft_tiny_mesh/adapter/adapter_model.safetensors")
  assert sorted(a) == sorted(b) and all(np.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_mesh_section_errors_name_the_key(tmp_path, capsys):
  def err(raw):
    with pytest.raises(C.ConfigError) as e:
      C.from_dict({"name": "x", **raw}, "f.json")
    return str(e.value)

  # without a mesh the layout keys are unused (one config runs on a mesh or, --mesh none, on one device)
  assert C.from_dict({"name": "x", "mesh": {"rules": [["q_proj", ["fsdp"]]], "tensor": "t"}}).mesh.mesh is None
  assert "f.json: mesh.rules[0][0]: '((' is not a valid regex" in err({"mesh": {"rules": [["((", []]]}})
  assert "mesh.mesh: bad mesh spec part 'data'" in err({"mesh": {"mesh": "data"}})
  assert "mesh.batch[0]: the mesh 'data:2,fsdp:2' has no axis 'dta'; did you mean 'data'?" in err(
      {"mesh": {"mesh": "data:2,fsdp:2", "batch": ["dta"]}})
  assert "distributed: process_id 2 is not below num_processes 2" in err(
      {"distributed": {"coordinator": "h:1", "num_processes": 2, "process_id": 2}})
  # the command line: --mesh fills mesh.mesh, a bad --coordinator is a config error (exit 2)
  cfg = mesh_config(tmp_path)
  out = str(tmp_path / "out")
  assert cli.main([cfg, "--out", out, "--mesh", "data:2", "--set", 'mesh.rules=[["q", ["tensor"]]]']) == cli.EXIT_CONFIG
  assert "mesh.rules[0][1][0]: the mesh 'data:2' has no axis 'tensor'" in capsys.readouterr().err
  assert cli.main([cfg, "--out", out, "--coordinator", "localhost", "--num-processes", "2",
                   "--process-id", "0"]) == cli.EXIT_CONFIG
  assert "command line: distributed: coordinator must be 'host:port', got 'localhost'" in capsys.readouterr().err


@needs_8
@pytest.mark.slow
def test_an_8bit_adam_state_written_on_the_mesh_resumes_on_one_device(tmp_path):
  """8-bit Adam's moments are codec nodes stored in their row layout on a mesh and on one
  device alike, so the checkpoint of a mesh run continues on one device (and ends where
  the mesh run ended, to 1e-6)."""
  cfg = mesh_config(tmp_path, training={"max_steps": 2},
                    optimizer={"kind": "adamw_8bit", "min_8bit_size": 0, "block_size": 8})
  mesh, one = tmp_path / "mesh", tmp_path / "one"
  assert cli.main([cfg, "--out", str(mesh), "--inline", "--quiet"]) == 0
  last = "sft_tiny_mesh/checkpoints/step_00000002"
  leaves = checkpoint.read_metadata(mesh / last)["leaves"]["opt_state"]
  assert any(k.endswith("/codes") and len(s) == 2 for k, (s, _) in leaves.items())  # [in, r] codes
  shutil.copytree(mesh / "sft_tiny_mesh", one / "sft_tiny_mesh", ignore=shutil.ignore_patterns("step_00000002"))
  assert cli.main([cfg, "--out", str(one), "--inline", "--quiet", "--resume", "--mesh", "none"]) == 0
  a, b = checkpoint_arrays(mesh / last), checkpoint_arrays(one / last)
  assert_same_state({k: v for k, v in a.items() if k.startswith("phi/")},
                    {k: v for k, v in b.items() if k.startswith("phi/")})
