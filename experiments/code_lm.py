"""Real data end to end: a small code LM pre-trained here, then fine-tuned with LoRA, DoRA,
QLoRA and in full on a package it never saw.

Nothing in the project downloads weights, so this experiment makes its own::

    nice -n 10 python -m experiments.code_lm [--out outputs/code_lm] [--results results/code_lm/DATE]

1. **Data** (:mod:`lowrank_jax.data.stdlib_code`): the installed Python standard library's
   sources; ``email``, ``http``, ``json``, ``unittest`` held out of pre-training; a byte-level
   BPE tokenizer (8192 tokens) trained on the pre-training split only; chunks of at most
   254 tokens written as SFT JSONL (``{"prompt": "", "response": chunk}``: loss on every
   token after ``<s>``) under ``OUT/data/``, the tokenizer under ``OUT/tokenizer/``.
2. **Pre-training** through the trainer's command (``lowrank-jax-train
   configs/code_lm/pretrain.json``): a randomly initialised Llama-family decoder
   (``model.random``) trained in full (method ``full`` on every leaf) on the pre-training
   split, exported merged as a Hugging Face folder, to which the tokenizer files are added:
   ``OUT/base/`` (git-ignored; never committed). The folder is read back with
   :func:`lowrank_jax.models.load_pretrained` (equal logits) and, when ``transformers`` is
   installed, loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer`` (equal token ids,
   logits within 1e-4 in float32).
3. **Fine-tuning** through the same command on the held-out package's training modules
   (``configs/code_lm/{lora,dora,qlora,full}.json``: LoRA and DoRA r=8 alpha=16 on every
   linear layer, QLoRA = the same LoRA over an NF4 base with double quantization and
   bfloat16 compute, full fine-tuning of every parameter; and a diagnostic row,
   ``full_blocks``: full fine-tuning of the transformer blocks only, embeddings and LM head
   frozen), one child process per config.
   "Before" is each method's model at initialisation (the quantized base for QLoRA)
   evaluated on the package's validation modules; "after" is the trainer's final eval.
4. **Report**: ``RESULTS/results.md`` (tables), ``results.json``, ``code_lm.png``
   (held-out perplexity before/after per method; the pre-training loss curve).

``--tiny`` runs the same pipeline on a few modules with a tiny decoder in seconds (what
``tests/test_code_lm.py`` runs); ``--set-pretrain`` / ``--set-finetune`` pass ``--set``
overrides to the trainer's configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import resource
import shutil
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench.sft_step import processor

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.data import stdlib_code
from lowrank_jax.models import decoder, hf_decoder
from lowrank_jax.trainer import cli, files, report
from lowrank_jax.trainer.config import load_all, to_dict
from lowrank_jax.trainer.run import prepare
from lowrank_jax.trainer.setup import build_setup
from lowrank_jax.trainer.tasks import FolderTokenizer, Keys

__all__ = ["Settings", "TINY", "prepare_data", "pretrain", "check_folder", "check_transformers",
           "finetune", "table", "plot", "run_all", "main"]

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "code_lm"
PRETRAIN = "pretrain"
METHODS = ("lora", "dora", "qlora", "full")
# a diagnostic row: full fine-tuning of the transformer blocks only (embeddings and LM head frozen)
EXTRA = ("full_blocks",)
LABELS = {"lora": "LoRA r8", "dora": "DoRA r8", "qlora": "QLoRA r8 (NF4+DQ, bf16)", "full": "full fine-tune",
          "full_blocks": "full fine-tune, blocks only"}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a run of the experiment does (validated in ``__post_init__``).

  Attributes:
    out: working folder (data, tokenizer, trainer runs, the base model folder).
    results: where the dated report goes (``None``: ``OUT/report``).
    methods: the fine-tune configs (``configs/code_lm/NAME.json``).
    vocab_size, seq_len: tokenizer size and the trainer's row length (chunks hold
      ``seq_len - 2`` tokens).
    held_out, finetune, packages, pretrain_fractions, salt:
      :func:`lowrank_jax.data.stdlib_code.build_corpus`.
    pretrain_set, finetune_set: ``--set key=value`` overrides of the trainer's configs.
    inline: run the trainer's configs in this process (no per-config peak memory).
    resume: the trainer's ``--resume`` (finished runs with the same config are reused,
      interrupted ones continue from their checkpoints).
    quiet: no progress bars.
    check_transformers: load the base folder with transformers when it is installed.
  """
  out: str = "outputs/code_lm"
  results: Optional[str] = None
  vocab_size: int = 8192
  seq_len: int = 256
  methods: tuple[str, ...] = METHODS + EXTRA
  held_out: tuple[str, ...] = stdlib_code.DEFAULT_HELD_OUT
  finetune: str = stdlib_code.DEFAULT_FINETUNE
  packages: Optional[tuple[str, ...]] = None
  pretrain_fractions: tuple[float, float] = (0.97, 0.03)
  salt: str = ""
  pretrain_set: tuple[str, ...] = ()
  finetune_set: tuple[str, ...] = ()
  inline: bool = False
  quiet: bool = False
  check_transformers: bool = True
  resume: bool = False

  def __post_init__(self):
    if self.seq_len < 8:
      raise ValueError(f"seq_len must be >= 8, got {self.seq_len}")
    if self.finetune not in self.held_out:
      raise ValueError(f"finetune package {self.finetune!r} must be held out ({list(self.held_out)})")

  @property
  def results_dir(self) -> pathlib.Path:
    return pathlib.Path(self.results) if self.results else pathlib.Path(self.out) / "report"


# The pipeline in seconds: a few modules, a tiny decoder, a few steps (tests/test_code_lm.py).
TINY = dict(
  methods=METHODS, vocab_size=320, seq_len=64, held_out=("json",), finetune="json",
  packages=("bisect", "colorsys", "fnmatch", "shlex", "textwrap", "json"), pretrain_fractions=(0.75, 0.25),
  pretrain_set=("model.random.vocab_size=320", "model.random.hidden_size=64",
                "model.random.intermediate_size=128", "model.random.num_layers=1",
                "model.random.num_heads=2", "model.random.num_kv_heads=2", "model.random.max_seq_len=64",
                "training.max_steps=30", "training.batch_size=8", "optimizer.lr=0.01",
                "checkpointing.every=0"),
  finetune_set=("training.max_steps=3", "training.batch_size=4", "optimizer.lr=0.005"),
  inline=True, quiet=True, check_transformers=False)


def _paths(out: pathlib.Path) -> dict[str, pathlib.Path]:
  return {"data": out / "data", "tokenizer": out / "tokenizer", "base": out / "base",
          "pretrain": out / "pretrain", "finetune": out / "finetune"}


# ------------------------------------------------------------------------------------ data


def prepare_data(s: Settings) -> dict:
  """Builds the corpus, writes the tokenizer folder and the four JSONL splits; returns the
  corpus facts (sizes, modules per split, fingerprint, Python version)."""
  p = _paths(pathlib.Path(s.out))
  corpus = stdlib_code.build_corpus(max_tokens=s.seq_len - 2, vocab_size=s.vocab_size, held_out=s.held_out,
                                    finetune=s.finetune, packages=s.packages,
                                    pretrain_fractions=s.pretrain_fractions, salt=s.salt)
  stdlib_code.save_tokenizer(p["tokenizer"], corpus.tokenizer, model_max_length=s.seq_len)
  for split in stdlib_code.SPLITS:
    stdlib_code.write_jsonl(p["data"] / f"{split}.jsonl", corpus[split])
  info = {"python": corpus.python_version, "fingerprint": corpus.fingerprint, "held_out": list(corpus.held_out),
          "finetune": corpus.finetune, "vocab_size": corpus.tokenizer.get_vocab_size(), "sizes": corpus.sizes(),
          "modules": {k: list(v) for k, v in corpus.modules.items()}}
  files.write_json(p["data"] / "corpus.json", info)
  return info


# ------------------------------------------------------------------------------ trainer


def _train(configs: Sequence[pathlib.Path], overrides: Sequence[str], out: pathlib.Path, s: Settings) -> list[dict]:
  """Runs the trainer's command; returns its result rows (raises on a non-zero status)."""
  argv = [str(c) for c in configs] + [a for o in overrides for a in ("--set", o)] + ["--out", str(out)]
  argv += ["--inline"] * s.inline + ["--quiet"] * s.quiet + ["--resume"] * s.resume
  status = cli.main(argv)
  if status != cli.EXIT_OK:
    raise RuntimeError(f"lowrank-jax-train {' '.join(argv)} exited with status {status}")
  return json.loads((out / "results.json").read_text())


def _initial_eval(configs: Sequence[pathlib.Path], overrides: Sequence[str]) -> dict[str, dict]:
  """``{name: eval metrics}`` of each config's model at initialisation: the methods'
  ``apply`` at their initial ``phi`` over the (possibly quantized) base, evaluated by the
  trainer's own evaluation of the task.

  Configs with the same ``model`` and ``data`` share one task (data and base loaded once);
  a model without lazy leaves left after :func:`lowrank_jax.lazy.materialize` (every
  method over a float base) is evaluated dense, so those share one compiled evaluation;
  a quantized base stays lazy (its forward decodes in its compute dtype, as in training).
  """
  out: dict[str, dict] = {}
  problems: dict[str, Any] = {}
  for config in load_all(configs, overrides):
    key = json.dumps({k: v for k, v in to_dict(config).items() if k in ("model", "data")}, sort_keys=True)
    if key not in problems:
      p = prepare(config)
      problems[key] = (p.problem, p.total_steps)
    problem, total = problems[key]
    setup = build_setup(config, problem, Keys.from_seed(config.training.seed).method, total)
    theta = setup.reparam.apply(setup.theta0, setup.phi)
    if config.quantize is None:
      theta = lazy.materialize(theta)
    out[config.name] = problem.evaluate(theta, "eval")
  return out


def _children_cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _self_cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _pretrain_overrides(s: Settings) -> list[str]:
  p = _paths(pathlib.Path(s.out))
  return [f"model.tokenizer={p['tokenizer']}", f"data.train={p['data'] / 'pretrain_train.jsonl'}",
          f"data.eval={p['data'] / 'pretrain_validation.jsonl'}", f"data.seq_len={s.seq_len}", *s.pretrain_set]


def _finetune_overrides(s: Settings) -> list[str]:
  p = _paths(pathlib.Path(s.out))
  return [f"model.path={p['base']}", f"data.train={p['data'] / 'finetune_train.jsonl'}",
          f"data.eval={p['data'] / 'finetune_validation.jsonl'}", f"data.seq_len={s.seq_len}", *s.finetune_set]


def pretrain(s: Settings) -> dict:
  """Pre-trains through the trainer's command and assembles ``OUT/base`` (the merged model
  + the tokenizer files); returns the trainer's row, the wall and CPU seconds and the loss
  curve."""
  p = _paths(pathlib.Path(s.out))
  overrides = _pretrain_overrides(s)
  config = CONFIGS / f"{PRETRAIN}.json"
  cpu0, t0 = _children_cpu_s() + _self_cpu_s(), time.perf_counter()
  (row,) = _train([config], overrides, p["pretrain"], s)
  timing = {"wall_s": time.perf_counter() - t0, "cpu_s": _children_cpu_s() + _self_cpu_s() - cpu0,
            "state_sha256": row.get("state_sha256")}
  timing_path = p["pretrain"] / "timing.json"
  if s.resume and timing_path.exists():  # a reused run: its own timing, not the reuse's
    prev = json.loads(timing_path.read_text())
    if prev.get("state_sha256") == timing["state_sha256"]:
      timing = prev
  files.write_json(timing_path, timing)
  merged = pathlib.Path(row["exports"]["merged"])
  tmp = p["base"].with_name(".base.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(merged, tmp)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy2(p["tokenizer"] / name, tmp / name)
  shutil.rmtree(p["base"], ignore_errors=True)
  os.replace(tmp, p["base"])
  curve = _train_lines(p["pretrain"] / PRETRAIN / "metrics.jsonl")
  return {"row": row, "wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"], "curve": curve,
          "folder": str(p["base"])}


def _train_lines(path: pathlib.Path) -> list[dict]:
  """The ``train`` lines of a run's ``metrics.jsonl`` (step, mean loss, lr, tokens/s)."""
  return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
          if r.get("kind") == "train"]


# ------------------------------------------------------------------------- folder checks


def _sample_ids(s: Settings, n: int = 2) -> np.ndarray:
  """``[n, seq_len]`` token ids: ``<s>`` + the first validation chunks of the fine-tuning package."""
  tok = FolderTokenizer(str(_paths(pathlib.Path(s.out))["base"]))
  p = _paths(pathlib.Path(s.out))["data"] / "finetune_validation.jsonl"
  rows = []
  for line in p.read_text().splitlines()[:n]:
    ids = [tok.bos_id] + tok.encode(json.loads(line)["response"])
    ids = (ids + [tok.eos_id] * s.seq_len)[:s.seq_len]
    rows.append(ids)
  return np.asarray(rows, np.int32)


def check_folder(folder: str | os.PathLike, params: Any, config: decoder.DecoderConfig, ids: np.ndarray) -> dict:
  """Reads ``folder`` back with :func:`load_pretrained`: the parameters and the logits on
  ``ids`` against the in-memory model's."""
  cfg2, params2 = hf_decoder.load_pretrained(folder, dtype=jnp.float32)
  a = dict(tree_lib.flatten_with_paths(params))
  b = dict(tree_lib.flatten_with_paths(params2))
  if set(a) != set(b):
    raise AssertionError(f"{folder}: leaves differ: {sorted(set(a) ^ set(b))[:6]}")
  max_param = max(float(np.max(np.abs(np.asarray(a[k], np.float32) - np.asarray(b[k], np.float32)))) for k in a)
  forward = jax.jit(decoder.decoder_forward, static_argnums=1)
  la = forward(params, config, jnp.asarray(ids))
  lb = forward(params2, cfg2, jnp.asarray(ids))
  return {"same_config": cfg2 == config, "max_abs_param_diff": max_param,
          "max_abs_logit_diff": float(jnp.max(jnp.abs(la - lb)))}


def check_transformers(folder: str | os.PathLike, ids: np.ndarray, texts: Sequence[str] = ()) -> Optional[dict]:
  """``AutoModelForCausalLM`` / ``AutoTokenizer`` on ``folder`` against ours: max |logit
  difference| on ``ids`` (float32) and whether the token ids of ``texts`` agree; ``None``
  when transformers or torch is not installed."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  folder = os.fspath(folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(np.asarray(ids, np.int64))).logits.numpy()
  config, params = hf_decoder.load_pretrained(folder, dtype=jnp.float32)
  ours = np.asarray(jax.jit(decoder.decoder_forward, static_argnums=1)(params, config, jnp.asarray(ids)))
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  mine = FolderTokenizer(folder)
  same_ids = all(tok(t, add_special_tokens=False)["input_ids"] == mine.encode(t) for t in texts)
  return {"transformers": transformers.__version__, "torch": torch.__version__,
          "max_abs_logit_diff": float(np.max(np.abs(ours - ref))), "tokenizer_ids_equal": same_ids,
          "model_class": type(model).__name__}


# ----------------------------------------------------------------------------- fine-tune


def finetune(s: Settings) -> list[dict]:
  """The fine-tunes of ``s.methods`` through the trainer's command (their result rows)."""
  configs = [CONFIGS / f"{m}.json" for m in s.methods]
  return _train(configs, _finetune_overrides(s), _paths(pathlib.Path(s.out))["finetune"], s)


def initial_evals(s: Settings) -> dict[str, dict]:
  """``{config name: eval metrics}`` at initialisation: the random pre-training model on
  the pre-training validation modules, each fine-tune's starting model on the held-out
  package's validation modules."""
  out = _initial_eval([CONFIGS / f"{PRETRAIN}.json"], _pretrain_overrides(s))
  out.update(_initial_eval([CONFIGS / f"{m}.json" for m in s.methods], _finetune_overrides(s)))
  return out


# -------------------------------------------------------------------------------- report


def _fmt(v, spec: str) -> str:
  return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _state_mib(row: dict) -> float:
  total = row.get("memory", {}).get("total", {})
  return sum(total.values()) / 2**20


def table(rows: Sequence[dict]) -> str:
  """The fine-tune table (markdown): held-out perplexity before/after, parameters, speed, memory."""
  head = ["method", "trainable params", "% of total", "held-out ppl before", "held-out ppl after",
          "step time (s)", "peak RSS (GiB)", "weights + grads + opt. state (MiB)"]
  out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
  for r in rows:
    after = "diverged" if r.get("status") == "diverged" else _fmt(r.get("eval_perplexity"), ".3f")
    out.append("| " + " | ".join([
        LABELS.get(r["name"], r["name"]), f"{r['trainable_params']:,}", _fmt(r.get("trainable_percent"), ".2f"),
        _fmt(r["before"]["perplexity"], ".3f"), after, _fmt(r.get("step_time_s"), ".3f"),
        _fmt((r.get("peak_rss_bytes") or 0) / 2**30, ".2f"), _fmt(_state_mib(r), ".1f")]) + " |")
  return "\n".join(out)


def plot(rows: Sequence[dict], curve: Sequence[dict], path: pathlib.Path) -> None:
  """Two panels: held-out perplexity before/after per method (bars), pre-training loss."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
  x = np.arange(len(rows))
  before = [r["before"]["perplexity"] for r in rows]
  after = [r.get("eval_perplexity") or np.nan for r in rows]
  ax.bar(x - 0.2, before, 0.4, label="before (at initialisation)", color="0.7", edgecolor="k", lw=0.4)
  ax.bar(x + 0.2, after, 0.4, label="after fine-tuning", color="tab:blue", edgecolor="k", lw=0.4)
  for xi, r, a in zip(x, rows, after):
    ax.annotate(f"{r['trainable_params']:,} trainable\n{r.get('step_time_s') or float('nan'):.2f} s/step",
                (xi + 0.2, a), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
  ax.set_xticks(x, [LABELS.get(r["name"], r["name"]) for r in rows], fontsize=8)
  ax.set_ylabel("held-out perplexity (validation modules)")
  ax.set_ylim(0, max(before + [a for a in after if np.isfinite(a)]) * 1.3)
  ax.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
  ax.grid(axis="y", alpha=0.3)
  ax.set_title("fine-tuning on the held-out package", fontsize=10)
  if curve:
    bx.plot([c["step"] for c in curve], [c["loss"] for c in curve], color="tab:orange")
  bx.set_xlabel("pre-training step")
  bx.set_ylabel("training loss (nats/token)")
  bx.set_title("pre-training", fontsize=10)
  bx.grid(alpha=0.3)
  report.save_figure(fig, path)


def _markdown(s: Settings, data: dict, pre: dict, checks: dict, rows: Sequence[dict], command: str,
              parent_rss: Optional[int]) -> str:
  row = pre["row"]
  cfg = row["config"]["model"]["random"]
  train, val = data["sizes"]["pretrain_train"], data["sizes"]["pretrain_validation"]
  ft_train, ft_val = data["sizes"]["finetune_train"], data["sizes"]["finetune_validation"]
  tr = row["config"]["training"]
  tokens = (tr.get("max_steps") or row["steps"]) * tr["batch_size"] * s.seq_len
  hf = checks.get("transformers")
  lines = [
    f"# Code LM: pre-trained here, fine-tuned on a held-out package ({datetime.date.today().isoformat()})",
    "",
    f"Command: `{command}`. Processor: {processor()} ({os.cpu_count()} cores, shared); "
    f"Python {data['python']} standard library; jax {jax.__version__}.",
    "",
    "## Data",
    "",
    f"Held out of pre-training (and of the tokenizer): {', '.join(data['held_out'])}; fine-tuning package: "
    f"`{data['finetune']}`. Byte-level BPE, {data['vocab_size']} tokens, trained on the pre-training split. "
    f"Corpus fingerprint `{data['fingerprint'][:16]}`.",
    "",
    "| split | modules | chunks | tokens | characters |",
    "|---|---:|---:|---:|---:|",
  ]
  for name, v in data["sizes"].items():
    lines.append(f"| {name} | {v['modules']:,} | {v['chunks']:,} | {v['tokens']:,} | {v['chars']:,} |")
  lines += [
    "",
    "## Pre-training (through `lowrank-jax-train configs/code_lm/pretrain.json`, method `full`)",
    "",
    f"Llama-family decoder: vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}, "
    f"{cfg['num_layers']} layers, {cfg['num_heads']} heads ({cfg['num_kv_heads']} KV), untied head: "
    f"**{row['total_params']:,} parameters**. {row['steps']} steps of {tr['batch_size']} packed rows x "
    f"{s.seq_len} tokens (about {tokens / 1e6:.2f}M token positions, "
    f"{tokens / max(train['tokens'], 1):.2f} epochs of {train['tokens']:,} training tokens), AdamW "
    f"lr {row['config']['optimizer']['lr']:g}, warm-up + cosine. Wall {pre['wall_s'] / 60:.1f} min, "
    f"CPU {pre['cpu_s'] / 60:.1f} min (all processes), median step {row['step_time_s']:.2f} s.",
    "",
    f"Validation perplexity ({val['modules']} pre-training modules held out of the training split): "
    f"{pre['before']['perplexity']:.1f} at initialisation -> **{row['eval_perplexity']:.2f}** after "
    f"(loss {row['eval_loss']:.3f} nats/token).",
    "",
    f"The Hugging Face folder (`{pre['folder']}`, git-ignored): read back by `load_pretrained`, max |logit "
    f"difference| {checks['roundtrip']['max_abs_logit_diff']:.2e}, max |parameter difference| "
    f"{checks['roundtrip']['max_abs_param_diff']:.2e}; "
    + (f"transformers {hf['transformers']} `{hf['model_class']}` on the same ids: max |logit difference| "
       f"{hf['max_abs_logit_diff']:.2e} (float32), `AutoTokenizer` ids equal to ours: {hf['tokenizer_ids_equal']}."
       if hf else "transformers not checked (not installed or not asked)."),
    "",
    f"## Fine-tuning on `{data['finetune']}` (through `lowrank-jax-train configs/code_lm/{{{','.join(s.methods)}}}.json`)",
    "",
    f"Training: {ft_train['modules']} modules ({ft_train['tokens']:,} tokens); held-out perplexity on the other "
    f"{ft_val['modules']} modules ({ft_val['tokens']:,} tokens), never trained on. "
    "\"before\": each method's model at initialisation (QLoRA: the NF4 base). Step time: the trainer's median "
    "step after warm-up (batch 8 x 256). Peak RSS: the config's own process (`ru_maxrss`, which on Linux "
    "starts from the high-water mark of the process that started it: "
    + (f"{parent_rss / 2**30:.2f} GiB here, " if parent_rss else "")
    + "below every row). The last column: the trainer's memory report (frozen weights, trainable weights, "
    "gradients, optimizer state). \"blocks only\" is a diagnostic: full fine-tuning of the transformer "
    "blocks with the embeddings and the LM head frozen.",
    "",
    table(rows),
    "",
  ]
  return "\n".join(lines)


def _vm_hwm_bytes() -> Optional[int]:
  """This process's peak resident set (``VmHWM`` of ``/proc/self/status``; ``None`` elsewhere)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def run_all(s: Settings, command: str = "python -m experiments.code_lm") -> dict:
  """The whole experiment; returns what ``results.json`` holds.

  All training comes first, so that this process is still small when it starts the
  trainer's processes: their peak RSS (``ru_maxrss``) starts from the high-water mark of
  the process that starts them (Linux keeps it across ``exec``). The evaluations at
  initialisation and the folder checks run afterwards.
  """
  t0 = time.perf_counter()
  data = prepare_data(s)
  parent_rss = _vm_hwm_bytes()
  pre = pretrain(s)
  rows = finetune(s)
  before = initial_evals(s)
  pre["before"] = before[PRETRAIN]
  for r in rows:
    r["before"] = before[r["name"]]
  base = _paths(pathlib.Path(s.out))["base"]
  ids = _sample_ids(s)
  config, params = hf_decoder.load_pretrained(pre["row"]["exports"]["merged"], dtype=jnp.float32)
  checks = {"roundtrip": check_folder(base, params, config, ids)}
  if s.check_transformers:
    texts = [json.loads(line)["response"] for line in
             (_paths(pathlib.Path(s.out))["data"] / "finetune_validation.jsonl").read_text().splitlines()[:8]]
    checks["transformers"] = check_transformers(base, ids, texts)
  out = {"date": datetime.date.today().isoformat(), "command": command, "processor": processor(),
         "settings": dataclasses.asdict(s), "data": data, "parent_peak_rss_bytes_before_training": parent_rss,
         "pretrain": pre, "checks": checks, "finetune": rows,
         "total_wall_s": time.perf_counter() - t0}
  d = s.results_dir
  files.write_json(d / "results.json", out)
  files.write_text(d / "results.md", _markdown(s, data, pre, checks, rows, command, parent_rss))
  plot(rows, pre["curve"], d / "code_lm.png")
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.code_lm", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=Settings.out)
  p.add_argument("--results", default=None,
                 help=f"report folder (default: results/code_lm/{datetime.date.today().isoformat()})")
  p.add_argument("--tiny", action="store_true", help="the pipeline on a few modules with a tiny decoder")
  p.add_argument("--set-pretrain", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--set-finetune", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--inline", action="store_true")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--no-transformers", action="store_true")
  p.add_argument("--resume", action="store_true", help="the trainer's --resume (reuse finished runs)")
  a = p.parse_args(argv)
  kw: dict = dict(TINY) if a.tiny else {}
  kw["pretrain_set"] = tuple(kw.get("pretrain_set", ())) + tuple(a.set_pretrain)
  kw["finetune_set"] = tuple(kw.get("finetune_set", ())) + tuple(a.set_finetune)
  kw["inline"] = kw.get("inline", False) or a.inline
  kw["quiet"] = kw.get("quiet", False) or a.quiet
  kw["resume"] = a.resume
  if a.no_transformers:
    kw["check_transformers"] = False
  results = a.results or (str(pathlib.Path(a.out) / "report") if a.tiny
                          else f"results/code_lm/{datetime.date.today().isoformat()}")
  s = Settings(out=a.out, results=results, **kw)
  command = "python -m experiments.code_lm " + " ".join(sys.argv[1:] if argv is None else argv)
  out = run_all(s, command.strip())
  print((s.results_dir / "results.md").read_text())
  print(f"wrote {s.results_dir / 'results.md'}, results.json, code_lm.png; total {out['total_wall_s'] / 60:.1f} min")
  return 0


if __name__ == "__main__":
  sys.exit(main())
