"""Sanity of the golden data itself, independent of lowrank_jax.

The first copies of these files were recorded from numpy views of torch tensors that peft
(``merge_and_unload``) and galore-torch (``opt.step``) later changed in place, so the stored
base weight was already merged and every GaLore snapshot was the final parameters (README.md,
2026-12-03). These checks would have caught that: a merged ``nn.Linear`` reproduces the stored
output, the adapter changes it, and optimizer snapshots move from step to step.
"""

import json

import numpy as np
import pytest

from tests.conftest import GOLDEN, load_golden

PFX = "param/base_model.model.lin."
# Every single-layer tuner file peft could merge (tests/methods use all of them).
MERGED = ("peft_lora", "peft_lora_rslora", "peft_dora", "peft_lokr", "peft_lokr_decomposed", "peft_loha",
          "peft_vera", "peft_adalora", "peft_ia3", "peft_glora")


def test_every_merged_tuner_file_is_listed():
  found = sorted(p.stem for p in GOLDEN.glob("peft_*.npz") if "merged_weight" in np.load(p).files)
  assert found == sorted(MERGED)


@pytest.mark.parametrize("name", MERGED)
def test_merged_linear_reproduces_y(name):
  """``x @ merged_weight.T + merged_bias == y``, and the adapter is really in ``y`` and the merge."""
  g, _ = load_golden(name)
  f64 = lambda k: np.asarray(g[k], np.float64)
  x, y, w, b = f64("x"), f64("y"), f64(PFX + "base_layer.weight"), f64(PFX + "base_layer.bias")
  np.testing.assert_allclose(x @ f64("merged_weight").T + f64("merged_bias"), y,
                             rtol=1e-5, atol=1e-5 * np.abs(y).max())
  assert np.abs(f64("merged_weight") - w).max() > 1e-2, "merged weight equals the base weight"
  assert np.abs(y - (x @ w.T + b)).max() > 1e-2, "stored y is the base layer's output"
  for k in g:  # a gradient for every trainable parameter, of the parameter's shape
    if k.startswith("grad/"):
      assert g["param/" + k[len("grad/"):]].shape == g[k].shape, k


def test_galore_snapshots_move_every_step():
  g, meta = load_golden("galore_adamw")
  for n in ("W1", "W2", "b"):
    prev = g[f"init/{n}"]
    for k in range(meta["steps"]):
      cur = g[f"step{k}/param/{n}"]
      assert np.abs(cur - prev).max() > 1e-4, f"step{k}/param/{n} equals the previous snapshot"
      prev = cur


DECODER_PEFT = sorted(p.stem for p in (GOLDEN / "peft_folders" / "decoders").glob("*.npz"))


@pytest.mark.parametrize("case", DECODER_PEFT)
def test_decoder_peft_logits_are_not_the_base_logits(case):
  """Each stored peft folder changes its base's logits (same batch as the base's own file),
  and its config names the base by family, not by a machine's path."""
  g = np.load(GOLDEN / "peft_folders" / "decoders" / f"{case}.npz")
  family = case.split("_")[0]
  base = np.load(GOLDEN / "decoders" / f"{family}.npz")
  np.testing.assert_array_equal(g["input_ids"], base["input_ids"])
  np.testing.assert_array_equal(g["attention_mask"], base["attention_mask"])
  keep = g["attention_mask"].astype(bool)
  assert np.isfinite(g["logits"]).all()
  assert np.abs(g["logits"] - base["logits"])[keep].max() > 1e-2, "stored logits are the base model's"
  cfg = json.loads((GOLDEN / "peft_folders" / "decoders" / case / "adapter_config.json").read_text())
  assert cfg["base_model_name_or_path"] == family and cfg["peft_version"] == "0.21.2"
