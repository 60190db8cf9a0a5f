"""Causal-LM SFT on a tiny random decoder: the packed, masked loss equals the loss of each
example run alone; a run end to end (eval loss and perplexity, PEFT adapter, merged
Hugging Face folder equal to base + the adapter's LoRA update)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lowrank_jax.data import sft as sft_data
from lowrank_jax.interop import peft
from lowrank_jax.models import decoder, hf_decoder
from lowrank_jax.trainer import cli
from lowrank_jax.trainer.tasks import FolderTokenizer, Keys, sft_loss
from tests.trainer.conftest import DATA, write_config

TINY = {"vocab_size": 103, "hidden_size": 16, "intermediate_size": 32, "num_layers": 2, "num_heads": 2,
        "num_kv_heads": 1, "max_seq_len": 128}


def test_packed_loss_equals_each_example_alone():
  config = decoder.DecoderConfig(**TINY)
  params = decoder.init_decoder(jax.random.key(0), config)
  tok = FolderTokenizer(str(DATA / "chat_tokenizer"))
  examples = [sft_data.tokenize_record(r, tok, w) for w, r in sft_data.read_jsonl(DATA / "sft_train.jsonl")[:9]]
  rows = sft_data.pack(examples, 64)
  assert rows.rows < len(examples)  # several examples share rows
  batch = {k: jnp.asarray(v) for k, v in rows.arrays.items()}
  logits = jax.jit(lambda p, b: decoder.decoder_forward(p, config, b["input_ids"], segment_ids=b["segment_ids"],
                                                        positions=b["positions"]))(params, batch)
  total, count = sft_loss(logits, batch)
  # reference: the examples unpacked, one per row of an ordinary batch (right-padded; the
  # model is causal, so padding after an example cannot change its logits), no segment ids,
  # cross-entropy in float64 numpy
  width = max(len(ex.tokens) for ex in examples)
  ids = np.zeros((len(examples), width), np.int32)
  for i, ex in enumerate(examples):
    ids[i, :len(ex.tokens)] = ex.tokens
  all_logits = np.asarray(jax.jit(lambda p, x: decoder.decoder_forward(p, config, x))(params, ids), np.float64)
  ref_total, ref_count = 0.0, 0
  for ex, lg in zip(examples, all_logits):
    lg = lg[:len(ex.tokens)]
    logp = lg - lg.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    targets, weight = ex.tokens[1:], ex.in_loss[1:]
    ref_total -= float((logp[np.arange(len(targets)), targets] * weight).sum())
    ref_count += int(weight.sum())
  assert int(count) == ref_count == rows.loss_tokens
  np.testing.assert_allclose(float(total), ref_total, rtol=2e-5)


def _sft_config(tmp_path, **extra):
  cfg = {"name": "sft", "task": "sft",
         "model": {"kind": "decoder", "random": TINY, "tokenizer": str(DATA / "chat_tokenizer")},
         "data": {"train": str(DATA / "sft_train.jsonl"), "eval": str(DATA / "sft_eval.jsonl"), "seq_len": 64},
         "methods": [{"name": "lora", "where": "attention/(q_proj|v_proj)/kernel", "rank": 2, "alpha": 4}],
         "optimizer": {"lr": 0.02}, "training": {"epochs": 2, "batch_size": 2, "log_every": 1},
         "checkpointing": {"every": 0}, "export": {"peft": True, "merged": True}, **extra}
  return write_config(tmp_path, cfg)


def test_sft_run_end_to_end_with_peft_and_merged_exports(tmp_path):
  out = tmp_path / "out"
  assert cli.main([str(_sft_config(tmp_path)), "--out", str(out), "--inline", "--quiet"]) == 0
  r = json.loads((out / "sft.json").read_text())
  assert r["status"] == "completed" and r["task"] == "sft"
  assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
  assert [h["epoch"] for h in r["history"]] == [1, 2] and all("eval_loss" in h for h in r["history"])
  assert r["sizes"]["train"]["examples"] == 48 and r["sizes"]["eval"]["examples"] == 12
  assert "| sft |" in (out / "results.md").read_text() and "eval perplexity" in (out / "results.md").read_text()
  lines = [json.loads(l) for l in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
  assert all(l["tokens_per_s"] > 0 for l in lines if l["kind"] == "train")

  # the PEFT adapter under Hugging Face decoder module names
  adapter = out / "sft" / "adapter"
  cfg = json.loads((adapter / peft.CONFIG_NAME).read_text())
  assert sorted(cfg["target_modules"]) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
  tensors = load_file(adapter / peft.WEIGHTS_NAME)

  # the merged folder is the random base plus (alpha / r) B A of the adapter, and nothing else
  dcfg = decoder.DecoderConfig(**TINY)
  base = decoder.init_decoder(Keys.from_seed(0).model, dcfg)
  merged_cfg, merged = hf_decoder.load_pretrained(out / "sft" / "merged")
  assert merged_cfg.hidden_size == 16 and merged_cfg.num_layers == 2
  scale = cfg["lora_alpha"] / cfg["r"]
  for i in range(2):
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
      got = np.asarray(merged["layers"][f"layer_{i}"]["attention"][p]["kernel"])
      want = np.asarray(base["layers"][f"layer_{i}"]["attention"][p]["kernel"])
      key = f"base_model.model.model.layers.{i}.self_attn.{p}"
      if p in ("q_proj", "v_proj"):
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        want = want + scale * (b @ a).T
        assert np.abs(b).max() > 0
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(merged["embed_tokens"]["embedding"]),
                                np.asarray(base["embed_tokens"]["embedding"]))
