"""Tiny runs of the trainer: a random 1-layer BERT (D=16) on a 3-package slice of the
docstring task with the committed WordPiece tokenizer (no weights package, no download),
and helpers to run the command in a real subprocess."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = pathlib.Path(__file__).parent / "data"

TINY_BERT = {"vocab_size": 344, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32, "max_position_embeddings": 32}


def merge(base: dict, extra: dict) -> dict:
  """``base`` with ``extra`` merged in, section by section."""
  out = copy.deepcopy(base)
  for k, v in extra.items():
    out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def tiny_config(name: str = "tiny", **sections) -> dict:
  """LoRA (with dropout) on a tiny random BERT: 24 training rows, batch 4 (6 steps an epoch)."""
  base = {
      "name": name,
      "model": {"random": TINY_BERT, "tokenizer": str(DATA / "bert_tokenizer"), "dropout": 0.1},
      "data": {"packages": ["html", "http", "json"], "max_len": 16, "max_per_class": 8},
      "methods": [{"name": "lora", "where": "(query|value)/kernel", "rank": 2, "alpha": 4, "dropout": 0.1}],
      "optimizer": {"lr": 0.01},
      "training": {"epochs": 2, "batch_size": 4, "log_every": 1},
      "checkpointing": {"every": 2, "keep": 2},
  }
  return merge(base, sections)


def write_config(folder: pathlib.Path, config: dict) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"{config['name']}.json"
  path.write_text(json.dumps(config))
  return path


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory) -> dict:
  """The environment of trainer subprocesses: a compilation cache shared by all of them
  (the same programs compile once per test session)."""
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def start(args, env: dict, **kw) -> subprocess.Popen:
  """``lowrank-jax-train ARGS`` in a subprocess (stdout and stderr to one pipe)."""
  return subprocess.Popen([sys.executable, "-m", "lowrank_jax.trainer.cli", *map(str, args)], env=env,
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def train_steps(metrics: pathlib.Path) -> int:
  """The last step of a ``train`` line in a metrics file (0 if none yet)."""
  if not metrics.exists():
    return 0
  step = 0
  for line in metrics.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if rec.get("kind") == "train":
      step = max(step, rec["step"])
  return step


def wait_for(predicate, timeout: float = 180, what: str = "a condition", proc=None):
  t0 = time.monotonic()
  while time.monotonic() - t0 < timeout:
    value = predicate()
    if value:
      return value
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"the process exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
    time.sleep(0.01)
  raise AssertionError(f"timed out waiting for {what}")
