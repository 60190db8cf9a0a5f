"""What a finished run leaves for other tools: the adapter as a PEFT folder and, on request,
the merged model as a Hugging Face folder.

The PEFT folder goes through :func:`lowrank_jax.interop.peft.save_peft_adapter` (LoRA, DoRA
and per-expert LoRA chains of one method with ``bias="none"`` and a base that stays the pretrained one,
i.e. not PiSSA/OLoRA-initialised); other chains are skipped with a note saying why. The
merged folder is written by the task's ``save_merged`` into a temporary folder beside the
target and renamed into place.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Any, Optional

import jax.numpy as jnp

from lowrank_jax.interop import peft
from lowrank_jax.reparam import merge
from lowrank_jax.trainer.config import RunConfig
from lowrank_jax.trainer.processes import is_primary
from lowrank_jax.trainer.setup import Setup
from lowrank_jax.trainer.tasks import Problem

__all__ = ["peft_exportable", "export_peft", "export_merged"]

PyTree = Any


def peft_exportable(config: RunConfig) -> Optional[str]:
  """``None`` when the method chain has a PEFT adapter layout here, else the reason it has not."""
  names = config.method_names
  if len(names) != 1:
    return f"PEFT export needs exactly one method, the chain has {list(names) or 'none'}"
  m = config.methods[0]
  if m.method_name not in ("lora", "dora", "batched_lora"):
    return f"PEFT export of {m.method_name!r} is not supported (LoRA, DoRA and batched LoRA are)"
  if getattr(m, "bias", "none") != "none":
    return f"PEFT export of LoRA with bias={m.bias!r} is not supported"
  if getattr(m, "init", "kaiming") in ("pissa", "olora"):
    return f"init={m.init!r} rewrites the base weights; the adapter alone is not the model"
  return None


def export_peft(folder: pathlib.Path, config: RunConfig, setup: Setup, phi: PyTree, problem: Problem) -> Optional[str]:
  """Writes the adapter to ``folder``; returns ``None`` or the reason it was skipped."""
  why = peft_exportable(config)
  if why is not None:
    return why
  (index, m), = setup.method_parts
  peft.save_peft_adapter(folder, phi[index], rank=m.rank, alpha=m.alpha if m.alpha is not None else m.rank,
                         use_rslora=bool(getattr(m, "rslora", False)), path_to_module=problem.path_to_module,
                         base_model_name_or_path=problem.base["path"], overwrite=True)
  _readable(folder)
  return None


def _readable(folder) -> None:
  """Folders 0755, files 0644 (temporary folders are created 0700)."""
  for root, _, names in os.walk(folder):
    os.chmod(root, 0o755)
    for n in names:
      os.chmod(os.path.join(root, n), 0o644)


def export_merged(folder: pathlib.Path, config: RunConfig, setup: Setup, phi: PyTree, problem: Problem) -> None:
  """The merged model (``theta0`` + the trained methods) as a Hugging Face folder (every
  process calls it; process 0 writes)."""
  if problem.save_merged is None:
    raise ValueError(f"{config.name}: the {config.task} task cannot write a merged model folder")
  # gathered on every process (a collective when the weights span processes), written by process 0
  merged = problem.placement.to_host(merge(setup.reparam, setup.theta0, phi))
  if not is_primary():
    return
  dtype = jnp.dtype(config.export.merged_dtype) if config.export.merged_dtype else None
  folder = pathlib.Path(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{folder.name}.tmp_", dir=folder.parent)
  try:
    problem.save_merged(tmp, merged, dtype)
    _readable(tmp)
    old = None
    if folder.exists():
      old = folder.with_name(f".{folder.name}.old")
      shutil.rmtree(old, ignore_errors=True)
      os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
