"""bench.sft_step runs end to end on a tiny random decoder (one round, no torch)."""

import pytest

from bench import sft_step


@pytest.mark.slow  # three compiled training steps: about 25 s of CPU
def test_sft_step_smoke(capsys):
  out = sft_step.main(["--model", "random", "--tiny", "--batch", "2", "--seq", "16", "--rank", "4",
                       "--steps", "1", "--warmup", "1", "--no-torch"])
  rows = out["rows"]
  assert list(rows) == [sft_step.OURS_FP32, sft_step.OURS_BF16, sft_step.OURS_QLORA]
  # LoRA r=4 on all 7 projections of DecoderConfig.tiny(num_layers=1) (D=64, 2 KV heads of 16, F=176)
  per_layer = 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 176) * 2 + (176 + 64))
  assert all(r["trainable_params"] == per_layer for r in rows.values())
  assert all(r["step_s"] > 0 and r["flops"] > 0 for r in rows.values())
  # the same model and batch: the first losses agree across fp32, bf16 and NF4 bases (about ln 256)
  losses = [r["first_loss"] for r in rows.values()]
  assert abs(losses[0] - 5.545) < 0.3 and max(losses) - min(losses) < 0.1
  printed = capsys.readouterr().out
  assert "| ours QLoRA (NF4+DQ, bf16 compute) |" in printed and "processor:" in printed
