"""The main job: fine-tune all-MiniLM-L6-v2 to classify Python stdlib docstrings by package.

An alias of the trainer's command (:mod:`lowrank_jax.trainer.cli`)::

    python -m experiments.docstrings --configs configs/minilm_frozen.json \\
        configs/minilm_lora.json configs/minilm_full.json --out outputs/docstrings

is ``lowrank-jax-train configs/minilm_frozen.json configs/minilm_lora.json
configs/minilm_full.json --out outputs/docstrings``; ``--epochs N`` and ``--max-per-class N``
are ``--set training.epochs=N`` and ``--set data.max_per_class=N``; ``--inline``, ``--quiet``,
``--resume`` and ``--set`` pass through.

The other names here keep the experiments that build on the main job working
(``experiments/glora_search.py``): :func:`run_one` trains a config written in the earlier
flat format (``{"method": {"kind": ...}, "epochs": ..., "max_len": ...}``, converted by
:func:`legacy_config`), :func:`load_problem` / :func:`model_fns` / :func:`evaluate_split`
give the task, the classifier and its evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Optional, Sequence

from lowrank_jax.data import docstrings
from lowrank_jax.models import bert
from lowrank_jax.trainer import cli, files, report
from lowrank_jax.trainer.config import from_dict
from lowrank_jax.trainer.run import run
from lowrank_jax.trainer.tasks import Keys, classifier_fns, evaluate_classifier

__all__ = ["main", "legacy_config", "run_one", "load_problem", "model_fns", "evaluate_split",
           "save_figure", "table", "plot"]

evaluate_split = evaluate_classifier
save_figure = report.save_figure
table = report.table
plot = report.plot


def _atomic_write(path: pathlib.Path, text: str) -> None:
  files.write_text(path, text)


# the earlier flat format -> the trainer's sections
_RENAMED = {"said": "intrinsic_said", "adapters": "bottleneck_adapters", "prefix": "prefix_tuning"}
_QLORA_QUANT = {"codec": "nf4", "block_size": 64, "double_quant": True}
_QUANT_KEYS = ("codec", "where", "block_size", "double_quant", "compute_dtype")
_ALLOCATOR_KEYS = ("target_r", "orth_reg_weight", "tinit_frac", "tfinal_frac", "deltaT")


def _quantize(spec: dict) -> dict:
  spec = dict(spec)
  out = {k: spec.pop(k) for k in _QUANT_KEYS if k in spec}
  if spec:
    out["options"] = spec
  return out


def _chain_regex(regex: str) -> str:
  """A regex anchored at the top of ``phi`` (``^bert/...``) as one on a chain's ``phi``
  (``^<index>/bert/...``)."""
  return r"^\d+/" + regex[1:] if regex.startswith("^") else regex


def legacy_config(cfg: dict) -> dict:
  """A config of the earlier flat format as the trainer's (:mod:`lowrank_jax.trainer.config`)."""
  cfg = dict(cfg)
  method = dict(cfg.pop("method"))
  kind = method.pop("kind")
  out: dict = {"name": cfg.pop("name"), "task": "classification"}
  model = {k: cfg.pop(k) for k in ("pooling", "dropout") if k in cfg}
  if model:
    out["model"] = model
  data = dict(cfg.pop("data", {}))
  if "max_len" in cfg:
    data["max_len"] = cfg.pop("max_len")
  if data:
    out["data"] = data
  training = {k: cfg.pop(k) for k in ("epochs", "batch_size", "seed") if k in cfg}
  if training:
    out["training"] = training
  quant = method.pop("quant", _QLORA_QUANT if kind == "qlora" else None)
  if quant is not None:
    out["quantize"] = _quantize(quant)
  if kind == "frozen":
    out["methods"] = []
  elif kind == "full":
    out["methods"] = [{"name": "full", "where": method.pop("where", "^bert/")}]
  else:
    if kind == "adalora":
      alloc = {k: method.pop(k) for k in _ALLOCATOR_KEYS if k in method}
      if alloc:
        out["rank_allocator"] = alloc
    out["methods"] = [{"name": _RENAMED.get(kind, "lora" if kind == "qlora" else kind), **method}]
  opt = dict(cfg.pop("optimizer", {}))
  if "warmup_frac" in opt:
    out["schedule"] = {"warmup_frac": opt.pop("warmup_frac")}
  for k in ("where", "where_b"):
    if k in opt:
      opt[k] = _chain_regex(opt[k])
  if opt:
    out["optimizer"] = opt
  deploy = cfg.pop("deploy", None)
  if deploy:
    deploy = dict(deploy)
    dk = deploy.pop("kind")
    out["deploy"] = {"kind": dk, **({"quantize": _quantize(deploy)} if dk == "merge_quantize" else {})}
  if cfg:
    raise ValueError(f"legacy config {out['name']!r}: keys without a new place: {sorted(cfg)}")
  return out


def run_one(cfg: dict, out_dir: pathlib.Path, quiet: bool = False) -> dict:
  """Trains one config of the earlier flat format in this process; returns its result row."""
  return run(from_dict(legacy_config(cfg), f"<{cfg.get('name')}>"), out_dir, quiet=quiet)


def load_problem(cfg: dict):
  """``(task, bert_config, theta0, (k_method, k_train))``: the docstring task at the config's
  ``max_len`` / ``data``, MiniLM with a fresh classifier head (keys from ``seed``)."""
  task = docstrings.load_docstring_task(max_len=cfg.get("max_len", 64), **cfg.get("data", {}))
  config, bert_params = bert.load_minilm()
  keys = Keys.from_seed(cfg.get("seed", 0))
  theta0 = {"bert": bert_params,
            "head": bert.init_classifier(keys.head, config.hidden_size, len(task.label_names))}
  return task, config, theta0, (keys.method, keys.train)


def model_fns(cfg: dict, config):
  """``(loss_fn(theta, batch, rng), logits_fn(theta, batch))`` of the classifier with the
  config's ``pooling`` and ``dropout`` (dropout is on when ``rng`` is given)."""
  rate = cfg.get("dropout", 0.1)
  config = dataclasses.replace(config, hidden_dropout_prob=rate, attention_probs_dropout_prob=rate)
  return classifier_fns(config, cfg.get("pooling", "mean"))


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", nargs="+", required=True, help="config JSON files")
  p.add_argument("--out", default="outputs/docstrings", help="output folder")
  p.add_argument("--epochs", type=int, default=None, help="override every config's training.epochs")
  p.add_argument("--max-per-class", type=int, default=None, help="cap examples per class (quick runs)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--inline", action="store_true", help="run configs in this process (no per-config RSS)")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--resume", action="store_true")
  a = p.parse_args(argv)
  args = [*a.configs, "--out", a.out]
  if a.epochs is not None:
    args += ["--set", f"training.epochs={a.epochs}"]
  if a.max_per_class is not None:
    args += ["--set", f"data.max_per_class={a.max_per_class}"]
  for s in a.overrides:
    args += ["--set", s]
  args += ["--inline"] * a.inline + ["--quiet"] * a.quiet + ["--resume"] * a.resume
  return cli.main(args)


if __name__ == "__main__":
  sys.exit(main())
