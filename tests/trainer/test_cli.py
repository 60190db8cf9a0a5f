"""``lowrank-jax-train`` end to end in this process on the tiny BERT: the files of a
two-config run (table, plot, strict JSON, metrics lines, checkpoints, PEFT adapter), a
diverged run, validation of every config before any training, the console script."""

import contextlib
import importlib
import io
import importlib.metadata
import json
import math
import stat

import numpy as np
import pytest
from safetensors.numpy import load_file

from lowrank_jax.interop import peft
from lowrank_jax.trainer import cli
from tests.trainer.conftest import ROOT, tiny_config, write_config


def _files(folder):
  return [p for p in folder.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """One command, three configs, inline: a head-only run, a LoRA run at lr 1e30 (it
  diverges) and a LoRA run; ``(exit status, output folder, stderr)``."""
  tmp = tmp_path_factory.mktemp("cli")
  frozen = write_config(tmp / "cfg", tiny_config("frozen", methods=[], model={"dropout": 0.0}))
  blowup = write_config(tmp / "cfg", tiny_config("blowup", optimizer={"lr": 1e30, "clip": None}))
  lora = write_config(tmp / "cfg", tiny_config("lora"))
  out = tmp / "out"
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    rc = cli.main([str(frozen), str(blowup), str(lora), "--out", str(out), "--inline", "--quiet",
                   "--set", "training.epochs=1"])
  return rc, out, err.getvalue()


def test_multi_config_run_writes_results_table_plot_and_run_folders(two_runs):
  rc, out, _ = two_runs
  assert rc == cli.EXIT_DIVERGED  # blowup (below); the configs after it still ran
  results = json.loads((out / "results.json").read_text())
  assert [r["name"] for r in results] == ["frozen", "blowup", "lora"]
  frozen, _, lora = results
  results = [frozen, lora]
  assert frozen["trainable_params"] == 16 * 3 + 3  # the head: D x classes + bias
  # LoRA r=2 on query and value of one layer (16 x 16): 2 x (16*2 + 2*16)
  assert lora["trainable_params"] == frozen["trainable_params"] + 2 * (16 * 2 + 2 * 16)
  for r in results:
    assert r["status"] == "completed" and r["steps"] == 6 and r["config"]["training"]["epochs"] == 1
    assert 0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["test_loss"])
    assert [h["epoch"] for h in r["history"]] == [1] and "val_accuracy" in r["history"][0]
    assert r == json.loads((out / f"{r['name']}.json").read_text())
  md = (out / "results.md").read_text()
  assert "| lora | 179 | " in md and "| completed |" in md
  assert (out / "accuracy_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # metrics: one train line per step (log_every 1), an epoch line with the validation metrics
  lines = [json.loads(l) for l in (out / "lora" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if l["kind"] == "train"] == list(range(1, 7))
  assert all(l["tokens_per_s"] > 0 and l["lr"] >= 0 for l in lines if l["kind"] == "train")
  (epoch,) = [l for l in lines if l["kind"] == "epoch"]
  assert epoch["val_accuracy"] == lora["history"][0]["val_accuracy"]
  # checkpoints every 2 steps, the last 2 kept; the config beside them
  assert sorted(p.name for p in (out / "lora" / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
  assert json.loads((out / "lora" / "config.json").read_text()) == lora["config"]


def test_lora_run_exports_a_peft_adapter_of_the_trained_factors(two_runs):
  _, out, _ = two_runs
  lora = json.loads((out / "lora.json").read_text())
  assert lora["exports"]["peft"] == str(out / "lora" / "adapter")
  config = json.loads((out / "lora" / "adapter" / peft.CONFIG_NAME).read_text())
  assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4
  assert sorted(config["target_modules"]) == ["encoder.layer.0.attention.self.query",
                                              "encoder.layer.0.attention.self.value"]
  tensors = load_file(out / "lora" / "adapter" / peft.WEIGHTS_NAME)
  b = tensors["base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"]
  assert b.shape == (16, 2) and np.abs(b).max() > 0  # B starts at zero: it was trained
  frozen = json.loads((out / "frozen.json").read_text())
  assert frozen["exports"]["peft"] is None and "exactly one method" in frozen["exports"]["peft_skipped"]


def test_outputs_are_atomic_0644_and_leave_no_temporaries(two_runs):
  _, out, _ = two_runs
  files = _files(out)
  assert files
  hidden = [p for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
  assert hidden == []
  written = [p for p in files if "checkpoints" not in p.parts]  # orbax owns its files' modes
  assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in written), [
      (str(p), oct(stat.S_IMODE(p.stat().st_mode))) for p in written]


def test_diverged_run_exits_nonzero_with_strict_json_and_a_marked_row(two_runs):
  rc, out, err = two_runs
  assert rc == cli.EXIT_DIVERGED and "diverged: blowup" in err
  text = (out / "results.json").read_text()
  assert "NaN" not in text and "Infinity" not in text
  blowup = json.loads(text)[1]
  assert blowup["status"] == "diverged" and blowup == json.loads((out / "blowup.json").read_text())
  assert blowup["diverged"]["step"] < 6 and "test_accuracy" not in blowup and "state_sha256" not in blowup
  assert all(int(p.name[5:]) < blowup["diverged"]["step"] for p in (out / "blowup" / "checkpoints").iterdir())
  line = json.loads((out / "blowup" / "metrics.jsonl").read_text().splitlines()[-1])
  assert line["kind"] == "diverged" and line["step"] == blowup["diverged"]["step"]
  assert "| blowup | 179 | 2.075 | diverged | - | " in (out / "results.md").read_text()


def test_every_config_is_validated_before_any_training(tmp_path, capsys):
  good = write_config(tmp_path, tiny_config("good"))
  bad = write_config(tmp_path, {**tiny_config("bad"), "training": {"batchsize": 4}})
  out = tmp_path / "out"
  assert cli.main([str(good), str(bad), "--out", str(out), "--inline"]) == cli.EXIT_CONFIG
  err = capsys.readouterr().err
  assert f"{bad}: unknown key 'training.batchsize'; did you mean 'batch_size'?" in err
  assert not out.exists()  # nothing trained, nothing written
  # a typo in an override is caught the same way, for every config
  assert cli.main([str(good), "--out", str(out), "--set", "data.max_length=8"]) == cli.EXIT_CONFIG
  assert "unknown key 'data.max_length'; did you mean 'max_len'?" in capsys.readouterr().err
  # and two configs may not write the same files
  assert cli.main([str(good), str(good), "--out", str(out)]) == cli.EXIT_CONFIG
  assert "names must differ" in capsys.readouterr().err


def test_console_script_is_the_cli():
  tomllib = pytest.importorskip("tomllib")  # Python 3.11+
  scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
  module, _, name = scripts["lowrank-jax-train"].partition(":")
  assert getattr(importlib.import_module(module), name) is cli.main
  installed = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "lowrank-jax-train"]
  assert all(e.value == scripts["lowrank-jax-train"] for e in installed)  # an install made from this pyproject


def test_a_failing_training_process_fails_the_command(tmp_path, monkeypatch, capsys):
  class Crashed:
    """A child that died of an exception (its traceback went to the terminal)."""
    def __init__(self, cmd, **kw):
      assert cmd[1:4] == ["-m", "lowrank_jax.trainer.cli", "--child"] and kw["start_new_session"]
    def wait(self):
      return 1
    def poll(self):
      return 1
  monkeypatch.setattr(cli.subprocess, "Popen", Crashed)
  path = write_config(tmp_path, tiny_config("crash"))
  assert cli.main([str(path), "--out", str(tmp_path / "out")]) == cli.EXIT_FAILED
  assert "error: crash: the training process exited with status 1" in capsys.readouterr().err
  assert not (tmp_path / "out" / "results.json").exists()
