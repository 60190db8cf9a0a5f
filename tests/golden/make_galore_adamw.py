"""Regenerates tests/golden/galore_adamw_steps.{npz,json} from galore-torch (optional extra; CI never runs it).

Why a second file: the shared ``galore_adamw.npz`` stores the parameters *after* every step
equal to its ``init`` arrays (snapshots taken without a copy alias the tensors that the
optimizer updates in place), so it cannot be followed step by step. This script takes its
initial values and gradients as inputs (any values would do) and records copies.

Two runs: ``main/`` is the shared file's config (rank 8, gap 3, scale 0.25, std, lr 0.01,
eps 1e-6, wd 0); ``alt/`` uses proj_type reverse_std, gap 2, weight decay 0.1 (decay after the
update is then visible).

    /work/venv/bin/python tests/golden/make_galore_adamw.py
"""

import json
import pathlib
import warnings

import numpy as np
import torch
from galore_torch import GaLoreAdamW

HERE = pathlib.Path(__file__).parent
torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)


def run(src, steps, rank, gap, scale, proj_type, lr, eps, wd):
  params = {n: torch.nn.Parameter(torch.tensor(src[f"init/{n}"]).clone()) for n in ("W1", "W2", "b")}
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
      out[f"step{k}/param/{n}"] = p.detach().clone().numpy().copy()
      if n != "b":
        out[f"step{k}/projector/{n}"] = opt.state[p]["projector"].ortho_matrix.detach().clone().numpy()
  return out


def main():
  src = dict(np.load(HERE / "galore_adamw.npz"))
  base = {k: v for k, v in src.items() if k.startswith("init/") or "/grad/" in k}
  cfgs = {"main": dict(rank=8, gap=3, scale=0.25, proj_type="std", lr=0.01, eps=1e-6, wd=0.0),
          "alt": dict(rank=8, gap=2, scale=0.25, proj_type="reverse_std", lr=0.01, eps=1e-6, wd=0.1)}
  arrays = dict(base)
  for name, cfg in cfgs.items():
    for k, v in run(src, 7, **cfg).items():
      arrays[f"{name}/{k}"] = v
  np.savez(HERE / "galore_adamw_steps.npz", **arrays)
  meta = {"optimizer": "galore_torch.GaLoreAdamW", "galore_torch": "1.0", "torch": torch.__version__,
          "steps": 7, "betas": [0.9, 0.999], "correct_bias": True, "galore_params": ["W1", "W2"],
          "plain_adamw_params": ["b"], "configs": cfgs,
          "keys": "init/{W1,W2,b}; step<k>/grad/<p> given before step k; <cfg>/step<k>/param/<p> after it; <cfg>/step<k>/projector/<p> used in it"}
  (HERE / "galore_adamw_steps.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
  main()
