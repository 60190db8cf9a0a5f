"""Re-runs peft on the golden ``peft_<tuner>`` single-layer files (optional; not run by CI).

Loads every stored parameter of ``tests/golden/NAME.npz`` into a fresh peft model of
``nn.Linear(64, 48)`` built from ``NAME.json``'s config, recomputes ``y``, the gradients
of ``sum(y * G)`` and ``merge_and_unload``, and prints the largest differences from the
stored arrays, and how far the stored ``y`` is from the base layer's output.

    python tests/golden/check_peft_linear.py peft_lokr peft_loha peft_vera ...

With peft 0.21.2 / torch 2.13.0 and the corrected golden files (2026-12-03, see README.md)
``y``, the gradients and the merged weight and bias of every file listed by default agree
with the stored arrays to <= 8e-6 (float32), and the stored ``y`` differs from the base layer's output
(the adapter is in it). Regenerating the files: make_peft_tuners.py.
"""

import inspect
import json
import pathlib
import sys

import numpy as np
import peft
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from make_peft_tuners import _Model  # noqa: E402  (the one-layer model both scripts use)

HERE = pathlib.Path(__file__).parent
CONFIGS = {"LORA": peft.LoraConfig, "LOKR": peft.LoKrConfig, "LOHA": peft.LoHaConfig,
           "VERA": peft.VeraConfig, "IA3": peft.IA3Config, "GLORA": peft.GloraConfig}


def check(name: str) -> None:
  d = np.load(HERE / f"{name}.npz")
  cfg = dict(json.loads((HERE / f"{name}.json").read_text())["config"])
  cls = CONFIGS[cfg.pop("peft_type")]
  params = inspect.signature(cls).parameters
  kw = {k: v for k, v in cfg.items()
        if k in params and k not in ("peft_version", "auto_mapping", "feedforward_modules", "target_modules")}
  if cls is peft.IA3Config:
    kw["feedforward_modules"] = []
  model = peft.get_peft_model(_Model(), cls(target_modules=["lin"], **kw))
  with torch.no_grad():
    for k, v in list(model.named_parameters()) + list(model.named_buffers()):
      if "param/" + k in d:
        v.copy_(torch.tensor(d["param/" + k]))
  y = model(torch.tensor(d["x"]))
  (y * torch.tensor(d["G"])).sum().backward()
  pfx = "param/base_model.model.lin."
  base = d["x"] @ d[pfx + "base_layer.weight"].T + d[pfx + "base_layer.bias"]
  grad = max(float(np.abs(v.grad.numpy() - d["grad/" + k]).max())
             for k, v in model.named_parameters() if v.grad is not None)
  merged = model.merge_and_unload().lin
  print(f"{name}: y {np.abs(y.detach().numpy() - d['y']).max():.2e} "
        f"(stored y vs base output {np.abs(d['y'] - base).max():.2e}), grads {grad:.2e}, "
        f"merged weight {np.abs(merged.weight.detach().numpy() - d['merged_weight']).max():.2e}, "
        f"bias {np.abs(merged.bias.detach().numpy() - d['merged_bias']).max():.2e}")


if __name__ == "__main__":
  for n in sys.argv[1:] or ["peft_lora", "peft_lora_rslora", "peft_dora", "peft_lokr", "peft_lokr_decomposed", "peft_loha", "peft_glora",
                            "peft_ia3", "peft_vera"]:
    check(n)
