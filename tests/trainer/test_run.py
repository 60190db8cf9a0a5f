"""Resuming refuses a checkpoint written with another config or another frozen base, naming
what changed (the base is referenced by path and content hash, never stored)."""

import json

import jax
import numpy as np

from lowrank_jax.models import decoder, hf_decoder
from lowrank_jax.trainer import cli
from lowrank_jax.trainer.base import folder_hash
from tests.trainer.conftest import DATA, write_config

TINY = decoder.DecoderConfig(vocab_size=103, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                             num_kv_heads=1, max_seq_len=128)


def test_resume_refuses_another_config_or_a_changed_base(tmp_path, capsys):
  base = tmp_path / "base"
  params = decoder.init_decoder(jax.random.key(0), TINY)
  hf_decoder.save_pretrained(base, TINY, params)
  path = write_config(tmp_path, {
      "name": "sft", "task": "sft", "model": {"kind": "decoder", "path": str(base), "tokenizer": str(DATA / "chat_tokenizer")},
      "data": {"train": str(DATA / "sft_train.jsonl"), "seq_len": 64},
      "methods": [{"name": "lora", "where": "q_proj/kernel", "rank": 2}],
      "optimizer": {"lr": 0.02}, "training": {"max_steps": 2, "batch_size": 2},
      "checkpointing": {"every": 1}, "export": {"peft": False}})
  out = tmp_path / "out"
  args = [str(path), "--out", str(out), "--inline", "--quiet"]
  assert cli.main(args) == 0
  result = json.loads((out / "sft.json").read_text())
  assert result["base"] == {"path": str(base), "sha256": folder_hash(base)}
  assert cli.main(args + ["--resume"]) == 0 and "reusing" in capsys.readouterr().out  # same run: reused

  # another learning rate: not the run the checkpoint belongs to
  assert cli.main(args + ["--resume", "--set", "optimizer.lr=0.5"]) == cli.EXIT_CONFIG
  err = capsys.readouterr().err
  assert "the config differs from the one checkpoint" in err and "optimizer.lr: 0.02 -> 0.5" in err
  # checkpointing and export may change
  assert cli.main(args + ["--resume", "--set", "checkpointing.keep=1"]) == 0

  # the same config on a base whose weights changed
  hf_decoder.save_pretrained(base, TINY, jax.tree.map(lambda x: x + np.float32(0.01), params))
  assert cli.main(args + ["--resume"]) == cli.EXIT_CONFIG
  err = capsys.readouterr().err
  assert f"the frozen base changed since checkpoint {out / 'sft' / 'checkpoints' / 'step_00000002'}" in err
  assert str(base) in err and result["base"]["sha256"] in err
