"""peft LoRA folders on every decoder family (tests/golden/decoders/peft_*): imported with
equal logits, exported tensor for tensor, and (when torch and peft are installed) loaded by
peft from our export with equal logits, expert stacks included."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.interop import peft as peft_io
from lowrank_jax.io import safetensors as st
from lowrank_jax.methods.batched import batched_lora
from lowrank_jax.models import decoder, hf_decoder

GOLDEN = pathlib.Path(__file__).parents[1] / "golden" / "decoders"
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "qwen3_moe", "mixtral"]
fwd = jax.jit(decoder.decoder_forward, static_argnums=1)


def _import(family):
  config, params = hf_decoder.load_pretrained(GOLDEN / family)
  adapter = peft_io.load_peft_adapter(GOLDEN / f"peft_{family}", params,
                                      module_to_path=peft_io.decoder_module_to_path(config))
  return config, params, adapter


def _masked_diff(a, b, mask):
  return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


@pytest.mark.parametrize("family", FAMILIES)
def test_import_equals_peft_logits(family):
  config, params, adapter = _import(family)
  g = dict(np.load(GOLDEN / f"peft_{family}.npz"))
  out = fwd(adapter.reparam.apply(params, adapter.phi), config, g["input_ids"], attention_mask=g["attention_mask"])
  assert _masked_diff(out, g["logits"], g["attention_mask"]) < 1e-5
  base = fwd(params, config, g["input_ids"], attention_mask=g["attention_mask"])
  assert _masked_diff(base, g["logits"], g["attention_mask"]) > 0.1   # the adapter matters
  if family in ("qwen3_moe", "mixtral"):
    leaf = adapter.phi["layers"]["layer_1"]["mlp"]["experts"]["gate_proj"]["kernel"]
    assert leaf["a"].ndim == 3 and leaf["a"].shape[0] == config.num_experts


@pytest.mark.parametrize("family", FAMILIES)
def test_export_equals_the_stored_folder(family, tmp_path):
  config, _, adapter = _import(family)
  peft_io.save_peft_adapter(tmp_path / "out", adapter.phi, adapter.config,
                            path_to_module=peft_io.decoder_path_to_module(config))
  ref = st.load_file(GOLDEN / f"peft_{family}" / "adapter_model.safetensors")
  ours = st.load_file(tmp_path / "out" / "adapter_model.safetensors")
  assert sorted(ours) == sorted(ref)
  for k in ref:
    assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
    np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def test_module_names_both_ways():
  for family in FAMILIES:
    config = hf_decoder.read_config(GOLDEN / family)
    to_path, to_module = peft_io.decoder_module_to_path(config), peft_io.decoder_path_to_module(config)
    for path in decoder.param_shapes(config):
      if path.endswith("/kernel") and "/experts/" not in path and "/router/" not in path:
        assert to_path(to_module(path)) == path
    assert to_path("model.layers.3.self_attn.o_proj") == "layers/layer_3/attention/o_proj/kernel"
  assert to_path("model.layers.1.mlp.experts.base_layer") == "layers/layer_1/mlp/experts"
  with pytest.raises(KeyError, match="no module -> path mapping for 'model.layers.0.mlp.fc1'"):
    to_path("model.layers.0.mlp.fc1")


def _peft_logits(base_folder, adapter_folder, g):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  model = transformers.AutoModelForCausalLM.from_pretrained(base_folder, attn_implementation="eager")
  model = peft.PeftModel.from_pretrained(model, adapter_folder).eval()
  pos = np.maximum(np.cumsum(g["attention_mask"], 1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(g["input_ids"]), attention_mask=torch.tensor(g["attention_mask"]),
                 position_ids=torch.tensor(pos)).logits.numpy()


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3_moe", "mixtral"])
def test_peft_loads_our_export(family, tmp_path):
  """A LoRA trained from scratch here (q,k,v,o,gate,up,down and, for MoE, every expert of
  every stack with its own factors): peft's load of our folder gives our logits."""
  config, params = hf_decoder.load_pretrained(GOLDEN / family)
  where = r"(q|k|v|o|gate|up|down)_proj/kernel"
  if family == "qwen3_moe":
    # peft 0.21 rewrites gate/up/down targets of Qwen-MoE models to the fused expert stacks and
    # so drops them on the dense MLP of layer 0 (mlp_only_layers): leave that MLP out
    where = r"((q|k|v|o)_proj|experts/(gate|up|down)_proj)/kernel"
  reparam = batched_lora(where, rank=3, alpha=5.0)
  phi = reparam.init(jax.random.key(0), params)
  phi = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), phi)
  peft_io.save_peft_adapter(tmp_path / "a", phi, rank=3, alpha=5.0,
                            path_to_module=peft_io.decoder_path_to_module(config))
  cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  if config.num_experts:
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert cfg["rank_pattern"] == {".*\\.gate_up_proj": 6} and cfg["alpha_pattern"] == {".*\\.gate_up_proj": 10.0}
  g = dict(np.load(GOLDEN / f"{family}.npz"))
  ours = fwd(reparam.apply(params, phi), config, g["input_ids"], attention_mask=g["attention_mask"])
  theirs = _peft_logits(GOLDEN / family, tmp_path / "a", g)
  assert _masked_diff(ours, theirs, g["attention_mask"]) < 1e-5
  # and back: our import of our export is the same adapter
  back = peft_io.load_peft_adapter(tmp_path / "a", params, module_to_path=peft_io.decoder_module_to_path(config))
  again = fwd(back.reparam.apply(params, back.phi), config, g["input_ids"], attention_mask=g["attention_mask"])
  assert _masked_diff(again, ours, g["attention_mask"]) < 1e-5


def test_unsupported_expert_adapters(tmp_path):
  config, params = hf_decoder.load_pretrained(GOLDEN / "mixtral")
  phi = batched_lora(r"experts/gate_proj/kernel", rank=2).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match="gate_proj and up_proj are fused in peft"):
    peft_io.save_peft_adapter(tmp_path / "x", phi, path_to_module=peft_io.decoder_path_to_module(config))
