"""experiments.code_lm end to end, tiny: a few stdlib modules, a tiny Llama pre-trained
through the trainer's command (method full), written as a Hugging Face folder with its
tokenizer, then fine-tuned with LoRA, DoRA, QLoRA and in full through the same command."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import code_lm
from lowrank_jax.data import chat
from lowrank_jax.models import decoder, hf_decoder

# about a minute of CPU (five trainer runs, each compiling its step and evaluation)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("code_lm")
  tiny = dict(code_lm.TINY)
  # the pre-training's eval split is its own training data: perplexity must fall there
  tiny["pretrain_set"] = tiny["pretrain_set"] + (f"data.eval={out / 'data' / 'pretrain_train.jsonl'}",)
  s = code_lm.Settings(out=str(out), results=str(out / "report"), **tiny)
  return s, code_lm.run_all(s, "pytest")


def test_pretraining_lowers_the_training_perplexity(run):
  _, res = run
  pre = res["pretrain"]
  row = pre["row"]
  assert row["status"] == "completed" and row["method"] == "full"
  assert row["trainable_params"] == row["total_params"]
  # a random model is about uniform over the 320 tokens; 30 steps must beat it clearly
  assert pre["before"]["perplexity"] > 200
  assert row["eval_perplexity"] < 0.5 * pre["before"]["perplexity"]
  assert math.isclose(row["eval_perplexity"], math.exp(row["eval_loss"]), rel_tol=1e-9)
  assert pre["curve"][-1]["loss"] < pre["curve"][0]["loss"]


def test_hf_folder_round_trips_with_its_tokenizer(run):
  s, res = run
  base = pathlib.Path(s.out) / "base"
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
      p.name for p in base.iterdir()}
  rt = res["checks"]["roundtrip"]
  assert rt["same_config"] and rt["max_abs_param_diff"] == 0.0 and rt["max_abs_logit_diff"] == 0.0
  # the folder is the trained model (the merged export of the pre-training run), with the
  # special token ids of its tokenizer
  config, params = hf_decoder.load_pretrained(base, dtype=jnp.float32)
  assert config.vocab_size == 320 and config.num_layers == 1
  assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
  merged = hf_decoder.load_pretrained(res["pretrain"]["row"]["exports"]["merged"], dtype=jnp.float32)[1]
  init = decoder.init_decoder(jax.random.key(0), config)
  emb = np.asarray(params["embed_tokens"]["embedding"])
  assert np.array_equal(emb, np.asarray(merged["embed_tokens"]["embedding"]))
  assert not np.allclose(emb, np.asarray(init["embed_tokens"]["embedding"]))
  tok = chat.load_tokenizer(base)
  assert [tok.encode(t)[0] for t in ("<s>", "</s>", "<pad>")] == [1, 2, 0]


def test_every_method_fine_tunes_and_is_in_the_table(run):
  s, res = run
  rows = {r["name"]: r for r in res["finetune"]}
  assert list(rows) == list(code_lm.METHODS)
  for r in rows.values():
    assert r["status"] == "completed" and math.isfinite(r["eval_perplexity"]) and r["steps"] == 3
  # LoRA / DoRA start at the base (B = 0, magnitude = column norms), full starts as a copy
  lora = rows["lora"]["before"]["perplexity"]
  assert rows["dora"]["before"]["perplexity"] == pytest.approx(lora, rel=1e-5)
  assert rows["full"]["before"]["perplexity"] == pytest.approx(lora, rel=1e-5)
  # QLoRA starts at the NF4 base: near the float base, not equal to it
  q = rows["qlora"]["before"]["perplexity"]
  assert q != lora and q == pytest.approx(lora, rel=0.05)
  assert rows["qlora"]["config"]["quantize"]["double_quant"] is True
  assert rows["lora"]["trainable_params"] == rows["qlora"]["trainable_params"] < rows["dora"]["trainable_params"]
  assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
  md = (pathlib.Path(s.results_dir) / "results.md").read_text()
  for name in code_lm.METHODS:
    assert f"| {code_lm.LABELS[name]} | {rows[name]['trainable_params']:,} |" in md
  saved = json.loads((pathlib.Path(s.results_dir) / "results.json").read_text())
  assert [r["name"] for r in saved["finetune"]] == list(code_lm.METHODS)
  png = (pathlib.Path(s.results_dir) / "code_lm.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_finetuning_package_is_held_out_of_pretraining(run):
  s, res = run
  data = res["data"]
  assert all(not m.startswith("json/") for k in ("pretrain_train", "pretrain_validation")
             for m in data["modules"][k])
  assert set(data["modules"]["finetune_train"]).isdisjoint(data["modules"]["finetune_validation"])
  assert data["held_out"] == ["json"] and data["sizes"]["finetune_train"]["chunks"] > 0


def test_settings_reject_a_finetune_package_that_is_not_held_out():
  with pytest.raises(ValueError, match="held out"):
    code_lm.Settings(held_out=("json",), finetune="email")
