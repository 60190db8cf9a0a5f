"""Hugging Face decoder folders: save_pretrained round trips (tensor for tensor, and through
transformers when it is installed), config mapping both ways, and clear errors for bad folders."""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.io import safetensors as st
from lowrank_jax.models import decoder, hf_decoder
from lowrank_jax.models.decoder import DecoderConfig

GOLDEN = pathlib.Path(__file__).parents[1] / "golden" / "decoders"
FOLDERS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "qwen3_moe", "mixtral",
           "llama_bf16"]


def _tensors(folder):
  files = st.checkpoint_files(folder)
  return {name: st.read_tensor(path, name) for name, path in files.items()}


@pytest.mark.parametrize("name", FOLDERS)
def test_save_pretrained_round_trips_the_folder(name, tmp_path):
  """Our save_pretrained of a loaded folder holds the same tensors (names, shapes, dtypes,
  values) and a config.json that reads back to the same DecoderConfig."""
  config, params = hf_decoder.load_pretrained(GOLDEN / name)
  written = hf_decoder.save_pretrained(tmp_path / "out", config, params)
  assert "config.json" in written
  ref, ours = _tensors(GOLDEN / name), _tensors(tmp_path / "out")
  if config.tie_word_embeddings:
    ref.pop("lm_head.weight", None)
  assert sorted(ours) == sorted(ref)
  for k in ref:
    assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
    np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
  assert hf_decoder.read_config(tmp_path / "out") == config
  with open(tmp_path / "out" / "config.json") as f:
    hf = json.load(f)
  with open(GOLDEN / name / "config.json") as f:
    ref_hf = json.load(f)
  assert hf["model_type"] == ref_hf["model_type"] and hf["architectures"] == ref_hf["architectures"]
  assert hf["dtype"] == ref_hf["dtype"]


def test_sharded_save_and_dtype(tmp_path):
  config, params = hf_decoder.load_pretrained(GOLDEN / "qwen3_moe")
  files = hf_decoder.save_pretrained(tmp_path / "s", config, params, dtype=jnp.bfloat16, max_shard_size="60KB")
  assert st.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 2
  index = json.loads((tmp_path / "s" / st.INDEX_FILE).read_text())
  assert index["metadata"]["total_size"] == sum(np.prod(x.shape) * 2 for x in jax.tree.leaves(params))
  config2, params2 = hf_decoder.load_pretrained(tmp_path / "s")
  assert config2 == config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a.astype(jnp.bfloat16)))
  # A later unsharded save into the same folder removes the old shards and index.
  hf_decoder.save_pretrained(tmp_path / "s", config, params)
  assert sorted(p for p in os.listdir(tmp_path / "s") if "safetensors" in p) == ["model.safetensors"]


def test_save_merges_lazy_weights_and_rejects_slots(tmp_path):
  import lowrank_jax as lj
  config, params = hf_decoder.load_pretrained(GOLDEN / "llama")
  r = lj.lora(r"(q_proj|down_proj)/kernel", rank=2)
  phi = jax.tree.map(lambda x: x + 0.01, r.init(jax.random.key(0), params))
  theta = r.apply(params, phi)
  hf_decoder.save_pretrained(tmp_path / "m", config, theta)
  _, merged = hf_decoder.load_pretrained(tmp_path / "m")
  for a, b in zip(jax.tree.leaves(lj.materialize(theta)), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  slotted = jax.tree.map(lambda x: x, params)
  slotted["layers"]["layer_0"]["prefix"] = {"key": jnp.zeros((2, 2, 16)), "value": jnp.zeros((2, 2, 16))}
  with pytest.raises(ValueError, match="not storable.*layer_0/prefix/key"):
    hf_decoder.save_pretrained(tmp_path / "x", config, slotted)
  wrong = jax.tree.map(lambda x: x, params)
  wrong["norm"]["scale"] = jnp.ones(3)
  with pytest.raises(ValueError, match="'norm/scale' has shape \\(3,\\)"):
    hf_decoder.save_pretrained(tmp_path / "x", config, wrong)


@pytest.mark.parametrize("name", FOLDERS[:-1])
def test_config_json_maps_both_ways(name):
  hf = json.loads((GOLDEN / name / "config.json").read_text())
  config = DecoderConfig.from_hf(hf)
  assert DecoderConfig.from_hf(config.to_hf()) == config
  assert config.num_layers == hf["num_hidden_layers"] and config.num_kv_heads == hf["num_key_value_heads"]


def test_legacy_config_keys():
  """Older config.json files: rope_theta + rope_scaling, rope_local_base_freq, no layer_types."""
  base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=6, num_attention_heads=2)
  c = DecoderConfig.from_hf({**base, "model_type": "llama", "rope_theta": 5e5,
                             "rope_scaling": {"type": "linear", "factor": 4.0}})
  assert c.rope_theta == 5e5 and c.rope_scaling.rope_type == "linear" and c.rope_scaling.factor == 4.0
  g3 = DecoderConfig.from_hf({**base, "model_type": "gemma3_text", "rope_theta": 1e6,
                              "rope_local_base_freq": 1e4, "sliding_window": 4, "sliding_window_pattern": 3})
  assert g3.rope_local_theta == 1e4 and g3.layer_types == ("sliding_attention", "sliding_attention",
                                                           "full_attention") * 2
  q2 = DecoderConfig.from_hf({**base, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 4})
  assert q2.sliding_window is None and q2.qkv_bias and not q2.o_bias
  g2 = DecoderConfig.from_hf({**base, "model_type": "gemma2", "sliding_window": 4})
  assert g2.layer_type(0) == "sliding_attention" and g2.layer_type(1) == "full_attention"


# --------------------------------------------------------------------------- errors


def _copy(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(GOLDEN / name, dst)
  return dst


def test_missing_config_and_unknown_model_type(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_decoder.load_pretrained(tmp_path)
  folder = _copy("llama", tmp_path)
  cfg = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
  with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'; supported: .*'gemma3_text'.*'qwen3_moe'"):
    hf_decoder.load_pretrained(folder)
  (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
  with pytest.raises(ValueError, match="config.json.*has no 'hidden_size'"):
    hf_decoder.load_pretrained(folder)
  (folder / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    hf_decoder.load_pretrained(folder)


def _rewrite(folder, fn):
  path = folder / "model.safetensors"
  tensors = st.load_file(path)
  st.save_file(fn(tensors), path, {"format": "pt"})


def test_missing_tensor_names_file_and_tensor(tmp_path):
  folder = _copy("llama", tmp_path)
  _rewrite(folder, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
  with pytest.raises(KeyError, match="'model.layers.1.mlp.up_proj.weight' \\(our 'layers/layer_1/mlp/up_proj/kernel'\\) is missing"):
    hf_decoder.load_pretrained(folder)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
  folder = _copy("mistral", tmp_path)
  _rewrite(folder, lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)})
  with pytest.raises(ValueError, match="model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has "
                                       "shape \\[16, 64\\], but config.json \\(mistral\\) implies \\[32, 64\\]"):
    hf_decoder.load_pretrained(folder)


def test_unexplained_tensor_and_bad_shards(tmp_path):
  folder = _copy("gemma", tmp_path)
  _rewrite(folder, lambda t: {**t, "model.layers.0.mlp.extra.weight": np.zeros(2, np.float32),
                              "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(2, np.float32)})
  with pytest.raises(ValueError, match="\\['model.layers.0.mlp.extra.weight'\\] \\(in \\['model.safetensors'\\]\\) "
                                       "are not parameters of a gemma model"):
    hf_decoder.load_pretrained(folder)
  sharded = _copy("qwen2", tmp_path)
  shard = sorted(p for p in os.listdir(sharded) if p.startswith("model-"))[-1]
  os.remove(sharded / shard)
  with pytest.raises(st.SafetensorsError, match=f"is in shard '{shard}', which is missing"):
    hf_decoder.load_pretrained(sharded)
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(GOLDEN / "llama" / "config.json", empty)
  (empty / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json.*pytorch_model.bin"):
    hf_decoder.load_pretrained(empty)


# --------------------------------------------------------------------------- transformers (optional)


@pytest.mark.parametrize("name", FOLDERS[:-1])
def test_transformers_loads_our_folder(name, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config, params = hf_decoder.load_pretrained(GOLDEN / name)
  hf_decoder.save_pretrained(tmp_path / "out", config, params, max_shard_size="120KB")
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
  g = dict(np.load(GOLDEN / f"{name}.npz"))
  pos = np.maximum(np.cumsum(g["attention_mask"], 1) - 1, 0)
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(g["input_ids"]), attention_mask=torch.tensor(g["attention_mask"]),
                   position_ids=torch.tensor(pos)).logits.numpy()
  m = g["attention_mask"].astype(bool)
  assert np.abs(logits - g["logits"])[m].max() < 1e-5
  ours = decoder.decoder_forward(params, config, g["input_ids"], attention_mask=g["attention_mask"])
  assert np.abs(logits - np.asarray(ours))[m].max() < 1e-5
