"""Regenerates tests/golden/galore_adamw_extra.{npz,json} from galore-torch (optional extra; CI never runs it).

``galore_adamw.npz`` (copied from the shared reference data) holds galore-torch's trajectory
for one config: initial parameters, the gradient given before each of 7 steps and the
parameters after each. This script adds what that file does not have, from the same inputs:

- ``main/step<k>/projector/<p>``: the projector galore-torch used in step k of that same run.
  SVD singular vectors are defined up to sign and two LAPACKs choose differently, so a
  step-by-step comparison after a projector refresh needs torch's choice.
  The run's parameters are not stored again: the script asserts they equal
  ``galore_adamw.npz``'s snapshots (so it also re-checks that file).
- ``alt/step<k>/{param,projector}/<p>``: a second config, proj_type reverse_std, gap 2, weight
  decay 0.1 (decay after the update is then visible), on the same inputs.

Every array is copied out of torch (``.clone()`` then ``np.array(copy=True)``): the optimizer
updates its tensors in place, and a numpy view would later show the final values (the bug of
the first shared galore_adamw.npz, README.md).

    pip install torch==2.13.0 galore-torch==1.0 bitsandbytes transformers
    python tests/golden/make_galore_adamw.py
"""

import json
import pathlib
import warnings

import numpy as np
import torch
from galore_torch import GaLoreAdamW

HERE = pathlib.Path(__file__).parent
NAMES = ("W1", "W2", "b")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)


def _np(t: torch.Tensor) -> np.ndarray:
  return np.array(t.detach().clone().cpu().numpy(), copy=True)


def run(src, steps, rank, gap, scale, proj_type, lr, eps, wd):
  """galore-torch on ``src``'s inputs: ``{step<k>/param/<p>, step<k>/projector/<p>}``."""
  params = {n: torch.nn.Parameter(torch.tensor(src[f"init/{n}"]).clone()) for n in NAMES}
  opt = GaLoreAdamW([
      {"params": [params["W1"], params["W2"]], "rank": rank, "update_proj_gap": gap,
       "scale": scale, "proj_type": proj_type},
      {"params": [params["b"]]}], lr=lr, eps=eps, weight_decay=wd)
  out = {}
  for k in range(steps):
    for n, p in params.items():
      p.grad = torch.tensor(src[f"step{k}/grad/{n}"]).clone()
    opt.step()
    for n, p in params.items():
      out[f"step{k}/param/{n}"] = _np(p)
      if n != "b":
        out[f"step{k}/projector/{n}"] = _np(opt.state[p]["projector"].ortho_matrix)
  return out


def main():
  src = dict(np.load(HERE / "galore_adamw.npz"))
  meta_src = json.loads((HERE / "galore_adamw.json").read_text())
  g = meta_src["galore"]
  steps = meta_src["steps"]
  cfgs = {"main": dict(rank=g["rank"], gap=g["update_proj_gap"], scale=g["scale"], proj_type=g["proj_type"],
                       lr=meta_src["lr"], eps=meta_src["eps"], wd=meta_src["weight_decay"]),
          "alt": dict(rank=8, gap=2, scale=0.25, proj_type="reverse_std", lr=0.01, eps=1e-6, wd=0.1)}
  arrays = {}
  for name, cfg in cfgs.items():
    out = run(src, steps, **cfg)
    for k, v in out.items():
      if name == "main" and "/param/" in k:
        np.testing.assert_allclose(v, src[k], rtol=0, atol=1e-6, err_msg=f"galore_adamw.npz {k}")
        continue
      arrays[f"{name}/{k}"] = v
  np.savez(HERE / "galore_adamw_extra.npz", **arrays)
  meta = {"optimizer": "galore_torch.GaLoreAdamW", "galore_torch": "1.0", "torch": torch.__version__,
          "inputs": "galore_adamw.npz (init/<p>, step<k>/grad/<p>)", "steps": steps, "betas": [0.9, 0.999],
          "correct_bias": True, "galore_params": ["W1", "W2"], "plain_adamw_params": ["b"], "configs": cfgs,
          "keys": "main/step<k>/projector/<p> used in step k of galore_adamw.npz's run (its params are "
                  "galore_adamw.npz's step<k>/param/<p>); alt/step<k>/param/<p> after step k; "
                  "alt/step<k>/projector/<p> used in it"}
  (HERE / "galore_adamw_extra.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
  main()
