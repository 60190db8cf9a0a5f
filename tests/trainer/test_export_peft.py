"""PEFT export from the run's config (issue 16): the trainer hands save_peft_adapter the
methods' reparam (their registry configs) and the base, so every method peft can represent
is written with its own settings, and what it cannot is skipped with save_peft_adapter's
reason. Checked against an independent reference: the folder imported with
interop.peft.load_peft_adapter gives the same adapted BERT (weights and hidden states) as
the trained phi.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import lazy
from lowrank_jax import tree as tree_lib
from lowrank_jax import checkpoint
from lowrank_jax.interop import peft
from lowrank_jax.models import bert
from lowrank_jax.trainer import cli, export
from lowrank_jax.trainer import config as C
from lowrank_jax.trainer.run import prepare
from tests.trainer.conftest import tiny_config, write_config

QV = "(query|value)/kernel"


def _config(tmp_path, methods, **sections):
  raw = tiny_config("peft", methods=methods, training={"epochs": 1, "batch_size": 4, "log_every": 1},
                    **sections)
  return write_config(tmp_path, raw)


def _trained(phi, key=1):
  """``phi`` moved away from its initialisation (as training does), every array leaf."""
  keys = iter(jax.random.split(jax.random.key(key), 10_000))
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, phi)


def _bert_of(theta) -> dict[str, np.ndarray]:
  return {p: np.asarray(lazy.materialize(w), np.float64)
          for p, w in tree_lib.flatten_with_paths(theta["bert"])}


def _check_import(folder, problem, ours_theta, bcfg: bert.BertConfig) -> peft.PeftAdapter:
  """The folder imported onto the pretrained BERT equals ``ours_theta``'s BERT: every
  weight, and the hidden states of a batch."""
  base = problem.theta0["bert"]
  imported = peft.load_peft_adapter(folder, base)
  theirs = imported.reparam.apply(base, imported.phi)
  ours = _bert_of(ours_theta)
  got = {p: np.asarray(lazy.materialize(w), np.float64) for p, w in tree_lib.flatten_with_paths(theirs)}
  assert sorted(got) == sorted(ours)
  changed = [p for p in ours if np.abs(ours[p] - np.asarray(lazy.materialize(
      dict(tree_lib.flatten_with_paths(base))[p]), np.float64)).max() > 1e-4]
  assert changed, "the trained adapter should change some weights"
  for p in ours:
    np.testing.assert_allclose(got[p], ours[p], rtol=1e-5, atol=1e-6, err_msg=p)
  ids = jnp.asarray(np.arange(2 * 8).reshape(2, 8) % 300 + 5, jnp.int32)
  mask = jnp.ones_like(ids)
  h_theirs = bert.bert_forward(lazy.materialize(theirs), bcfg, ids, mask)
  h_ours = bert.bert_forward(lazy.materialize(ours_theta["bert"]), bcfg, ids, mask)
  np.testing.assert_allclose(np.asarray(h_theirs), np.asarray(h_ours), rtol=1e-5, atol=1e-5)
  return imported


def _adapter_config(folder) -> dict:
  return json.loads((folder / peft.CONFIG_NAME).read_text())


def _cli_export(tmp_path, methods):
  """Runs ``methods`` through the command; returns the adapter config it wrote and the folder
  imported onto the pretrained base, checked against the last checkpoint's trained model."""
  path = _config(tmp_path, methods)
  out = tmp_path / "out"
  assert cli.main([str(path), "--out", str(out), "--inline", "--quiet"]) == 0
  result = json.loads((out / "peft.json").read_text())
  folder = out / "peft" / "adapter"
  assert result["exports"]["peft"] == str(folder) and "peft_skipped" not in result["exports"]
  p = prepare(C.load(str(path)))
  steps = sorted((out / "peft" / "checkpoints").iterdir())
  ck = checkpoint.restore(steps[-1], p.setup.phi, p.setup.optimizer.init(p.setup.phi))
  theta = p.setup.reparam.apply(p.setup.theta0, ck.phi)
  return _adapter_config(folder), _check_import(folder, p.problem, theta, p.config.model.random)


def test_cli_run_exports_rslora_with_trained_biases(tmp_path):
  """End to end through the command: rsLoRA with bias='lora_only' trained a few steps; the
  adapter folder says so and imports to the trained model (the last checkpoint's phi)."""
  methods = [{"name": "lora", "where": QV, "rank": 2, "alpha": 4, "rslora": True, "bias": "lora_only"}]
  cfg, imported = _cli_export(tmp_path, methods)
  assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["bias"]) == ("LORA", 2, 4, True,
                                                                                             "lora_only")
  assert sorted(cfg["target_modules"]) == ["encoder.layer.0.attention.self.query",
                                           "encoder.layer.0.attention.self.value"]
  assert isinstance(imported.phi, tuple) and len(imported.phi) == 2  # (LoRA, trained biases)


def test_cli_run_exports_pissa_against_the_pretrained_base(tmp_path):
  """PiSSA through the command (the step donates phi: the run keeps the initial factors for
  the conversion): written as rank 2r relative to the pretrained base, imports to the
  trained model."""
  cfg, _ = _cli_export(tmp_path, [{"name": "lora", "where": QV, "rank": 2, "alpha": 4, "init": "pissa"}])
  assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 8)


@pytest.mark.parametrize("methods,peft_type", [
    ([{"name": "dora", "where": QV, "rank": 2, "alpha": 4}], "LORA"),
    ([{"name": "lora", "where": QV, "rank": 2, "alpha": 4, "init": "pissa"}], "LORA"),
    ([{"name": "adalora", "where": QV, "init_r": 3, "alpha": 4}], "ADALORA"),
    ([{"name": "vera", "where": QV, "rank": 4}], "VERA"),
    ([{"name": "loha", "where": QV, "rank": 2, "alpha": 4}], "LOHA"),
    ([{"name": "lokr", "where": QV, "rank": 2, "alpha": 4}], "LOKR"),
    ([{"name": "ia3", "where": r"attention/(key|value)/kernel$|layer_\d+/output/kernel$",
       "feedforward": r"layer_\d+/output/kernel$"}], "IA3"),
    ([{"name": "lora", "where": QV, "rank": 2, "alpha": 4},
      {"name": "full", "where": r"attention/output/kernel$"}], "LORA"),
], ids=["dora", "pissa", "adalora", "vera", "loha", "lokr", "ia3", "lora+full"])
def test_every_method_peft_has_is_written_from_its_config(tmp_path, methods, peft_type):
  config = C.load(str(_config(tmp_path, methods)))
  p = prepare(config)
  phi = _trained(p.setup.phi)
  folder = tmp_path / "adapter"
  assert export.export_peft(folder, config, p.setup, jax.device_get(phi), p.problem) is None
  cfg = _adapter_config(folder)
  assert cfg["peft_type"] == peft_type
  for f in folder.iterdir():
    assert f.stat().st_mode & 0o777 == 0o644, f
  m = methods[0]
  if peft_type == "LORA":
    # PiSSA is written relative to the pretrained base: rank 2r, alpha 2 alpha (peft's conversion)
    k = 2 if m.get("init") == "pissa" else 1
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_dora"]) == (2 * k, 4 * k, m["name"] == "dora")
  if len(methods) == 2:
    assert cfg["modules_to_save"] == ["encoder.layer.0.attention.output.dense"]
  _check_import(folder, p.problem, p.setup.reparam.apply(p.setup.theta0, phi), config.model.random)


@pytest.mark.parametrize("methods,reason", [
    ([{"name": "glora", "where": QV, "rank": 2}], "no GLoRA tuner"),
    ([{"name": "lora", "where": QV, "rank": 2}, {"name": "dora", "where": r"key/kernel", "rank": 2}],
     "holds one method"),
])
def test_what_peft_cannot_represent_is_skipped_with_its_reason(tmp_path, methods, reason):
  config = C.load(str(_config(tmp_path, methods)))
  p = prepare(config)
  folder = tmp_path / "adapter"
  why = export.export_peft(folder, config, p.setup, jax.device_get(p.setup.phi), p.problem)
  assert why is not None and reason in why, why
  assert not folder.exists()


def test_peft_exportable_screens_runs_without_an_adapter(tmp_path):
  full = C.load(str(_config(tmp_path, [{"name": "full", "where": QV}])))
  assert "no adapter" in export.peft_exportable(full)
  assert export.peft_exportable(C.load(str(_config(tmp_path, [{"name": "glora", "where": QV, "rank": 2}])))) is None


def test_a_run_records_why_its_adapter_was_not_written(tmp_path):
  """Through the command: a GLoRA run finishes, its result says the PEFT folder was skipped
  and why (peft has no GLoRA tuner), and no adapter folder is left behind."""
  path = _config(tmp_path, [{"name": "glora", "where": QV, "rank": 2}])
  out = tmp_path / "out"
  assert cli.main([str(path), "--out", str(out), "--inline", "--quiet"]) == 0
  exports = json.loads((out / "peft.json").read_text())["exports"]
  assert exports["peft"] is None and "no GLoRA tuner" in exports["peft_skipped"], exports
  assert not (out / "peft" / "adapter").exists()
