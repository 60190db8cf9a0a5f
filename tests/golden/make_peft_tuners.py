"""Regenerates the single-layer peft reference files ``tests/golden/peft_<tuner>.{npz,json}``
(optional extra; CI never runs it).

    pip install torch==2.13.0 peft==0.21.2
    python tests/golden/make_peft_tuners.py [--out DIR] [NAME ...]

One ``nn.Linear(64, 48)`` named ``lin`` is adapted by peft (LoRA, rsLoRA, DoRA, LoKr plain and
decomposed, LoHa, AdaLoRA, VeRA, GLoRA, IA3). Every parameter we draw (the base weight and bias,
and every trainable adapter parameter) is set to seeded random values, then ``x [5, 64]`` and
``G [5, 48]`` are drawn. Stored: ``param/<name>`` for every parameter and buffer of the peft
model, ``x``, ``y``, ``G``, ``grad/<name>`` of ``sum(y * G)`` for every trainable parameter, and
``merge_and_unload``'s ``merged_weight`` / ``merged_bias``.

Every array is copied out of torch (``.clone()`` then ``np.array(copy=True)``) *before* the next
torch operation: ``merge_and_unload`` writes the merged weight into the base layer's tensor in
place, and a numpy view taken earlier would show it (the bug of the first shared copies of
these files, README.md, 2026-12-03).

Random draws. The reference run drew every value from one ``torch.Generator`` seeded 0, starting
with bnb_codecs' inputs and then these files in the order of ``TUNERS``; when peft_lora began the
stream had advanced ``SKIP`` 32-bit draws (found by locating the stored arrays in that stream;
all our draws are ``randn``, whose position in the stream is exact). The values are
``0.1·N(0,1)`` for the base weight and bias, ``1 + 0.2·N(0,1)`` for IA3's scaling,
``0.5·N(0,1)`` for other 1-d parameters (DoRA's magnitude, VeRA's ``lambda_b`` / ``lambda_d``,
GLoRA's constant D and E), ``0.2·N(0,1)`` for any other trainable parameter, drawn in ``named_parameters`` order (frozen non-base parameters such as AdaLoRA's
``ranknum`` keep peft's value); then ``x`` and ``G`` are ``N(0,1)``. With torch 2.13.0 CPU and
peft 0.21.2 (2026-12-03) this reproduces the stored files: every ``param/``, ``x`` and ``G``
bit for bit, the configs exactly, ``y``, gradients and merges to float32 rounding (largest
``|ours - stored| / max(1, |stored|)`` 4e-7, over all ten files). Check a rerun by writing to a
temporary folder (``--out``) and comparing the arrays.
VeRA's frozen projections ``vera_A`` / ``vera_B`` come from peft's own generator
(``projection_prng_key`` 0), not from ours.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import peft
import torch

HERE = pathlib.Path(__file__).parent
SKIP = 148471  # 32-bit draws of the reference stream before peft_lora (bnb_codecs' inputs and more)
PFX = "base_model.model.lin."
KEYS = "param/<peft name>, grad/<peft name>, x, y, G, merged_weight, merged_bias"

# name -> peft config, in the order the reference run drew them.
TUNERS = {
    "peft_lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]),
    "peft_lora_rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["lin"]),
    "peft_dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["lin"]),
    "peft_lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["lin"]),
    "peft_lokr_decomposed": lambda: peft.LoKrConfig(r=2, alpha=4, decompose_both=True, target_modules=["lin"]),
    "peft_loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["lin"]),
    "peft_adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=100,
                                               target_modules=["lin"]),
    "peft_vera": lambda: peft.VeraConfig(r=4, save_projection=True, target_modules=["lin"]),
    "peft_glora": lambda: peft.GloraConfig(r=4, config_A_B="lora", config_C="lora", config_D_E="constant",
                                           target_modules=["lin"]),
    "peft_ia3": lambda: peft.IA3Config(target_modules=["lin"], feedforward_modules=[]),
}


class _Model(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.lin = torch.nn.Linear(64, 48)

  def forward(self, x):
    return self.lin(x)


def _np(t: torch.Tensor) -> np.ndarray:
  """A copy that no later in-place torch operation can change."""
  return np.array(t.detach().clone().cpu().numpy(), copy=True)


def _value(name: str, shape, g: torch.Generator) -> torch.Tensor | None:
  """The seeded value of peft parameter ``name`` (see the module docstring), or None to keep it."""
  z = lambda: torch.randn(shape, generator=g)
  if "base_layer." in name:
    return 0.1 * z()
  if "ia3_l" in name:
    return 1.0 + 0.2 * z()
  return (0.5 if len(shape) == 1 else 0.2) * z()


def _config_json(cfg) -> dict:
  """peft's config as the reference files store it (sets and enums as strings)."""
  out = {}
  for k, v in cfg.to_dict().items():
    if isinstance(v, set):
      v = str(v)
    elif hasattr(v, "value"):
      v = v.value
    out[k] = v
  return out


def make(name: str, g: torch.Generator) -> tuple[dict, dict]:
  """``(arrays, meta)`` of one file, drawing from ``g``."""
  cfg = TUNERS[name]()
  model = peft.get_peft_model(_Model(), cfg)
  with torch.no_grad():
    for k, p in model.named_parameters():
      if "base_layer." in k or p.requires_grad:
        p.copy_(_value(k, p.shape, g))
  x = torch.randn(5, 64, generator=g)
  G = torch.randn(5, 48, generator=g)
  arrays = {"param/" + k: _np(v) for k, v in list(model.named_parameters()) + list(model.named_buffers())}
  y = model(x)
  (y * G).sum().backward()
  arrays.update({"x": _np(x), "y": _np(y), "G": _np(G)})
  for k, p in model.named_parameters():
    if p.grad is not None:
      arrays["grad/" + k] = _np(p.grad)
  merged = model.merge_and_unload().lin  # changes the base layer's tensors in place
  arrays["merged_weight"], arrays["merged_bias"] = _np(merged.weight), _np(merged.bias)
  meta = {"config": _config_json(cfg), "keys": KEYS, "loss": "sum(y * G)", "peft": peft.__version__}
  return arrays, meta


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=str(HERE))
  ap.add_argument("names", nargs="*", help=f"a subset of {list(TUNERS)} (default: all)")
  a = ap.parse_args()
  unknown = set(a.names) - set(TUNERS)
  if unknown:
    ap.error(f"unknown names {sorted(unknown)}; choose from {list(TUNERS)}")
  torch.set_num_threads(1)
  torch.manual_seed(0)  # module inits (all overwritten except VeRA's, which peft seeds itself)
  g = torch.Generator().manual_seed(0)
  torch.rand(SKIP, generator=g)  # one 32-bit draw each: the reference stream's position
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  for name in TUNERS:  # every file draws, so that the later ones find the stream where it was
    arrays, meta = make(name, g)
    if not a.names or name in a.names:
      np.savez(out / f"{name}.npz", **arrays)
      (out / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
      print("wrote", out / f"{name}.npz")


if __name__ == "__main__":
  main()
