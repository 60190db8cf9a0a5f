"""The main job: fine-tune all-MiniLM-L6-v2 to classify Python stdlib docstrings by package.

    python -m experiments.docstrings --configs configs/minilm_frozen.json \
        configs/minilm_lora.json configs/minilm_full.json --out outputs/docstrings

Each config runs in its own process (so its peak memory is its own), prints per-epoch
loss and validation accuracy with a progress bar, and writes ``NAME.json``; the parent
then writes ``results.json``, ``results.md`` (the table) and ``accuracy_vs_params.png``.
``--resume`` reuses ``NAME.json`` of a config that already ran with identical settings, so
a long sweep can be run in parts and tabulated at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np


def _atomic_write(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def evaluate_split(logits_fn, split: dict, batch_size: int) -> tuple[float, float]:
  """(accuracy, mean cross-entropy) of ``logits_fn(batch)`` over a whole split; the last
  batch is padded to ``batch_size`` so that a jitted ``logits_fn`` compiles once."""
  from lowrank_jax import train
  correct, loss_sum, n = 0, 0.0, 0
  for b in train.batches(split, batch_size, drop_last=False):
    m = len(b["labels"])
    padded = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - m, 0)]) for k, v in b.items()}
    logits = np.asarray(logits_fn(padded), np.float64)[:m]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    correct += int((logits.argmax(-1) == b["labels"]).sum())
    loss_sum -= float(logp[np.arange(m), b["labels"]].sum())
    n += m
  return correct / n, loss_sum / n


def load_problem(cfg: dict):
  """``(task, bert_config, theta0, (k_method, k_train))``: the docstring task at the config's
  ``max_len`` / ``data``, MiniLM with a fresh classifier head (keys from ``seed``)."""
  import jax
  from lowrank_jax.data import docstrings
  from lowrank_jax.models import bert
  task = docstrings.load_docstring_task(max_len=cfg.get("max_len", 64), **cfg.get("data", {}))
  config, bert_params = bert.load_minilm()
  k_head, k_method, k_train = jax.random.split(jax.random.key(cfg.get("seed", 0)), 3)
  theta0 = {"bert": bert_params,
            "head": bert.init_classifier(k_head, config.hidden_size, len(task.label_names))}
  return task, config, theta0, (k_method, k_train)


def model_fns(cfg: dict, config):
  """``(loss_fn(theta, batch, rng), logits_fn(theta, batch))`` of the classifier, with the
  config's ``pooling`` and ``dropout`` (dropout is on when ``rng`` is given)."""
  from lowrank_jax import train
  from lowrank_jax.models import bert
  pooling, dropout = cfg.get("pooling", "mean"), cfg.get("dropout", 0.1)

  def logits_fn(theta, batch, rng=None):
    h = bert.bert_forward(theta["bert"], config, batch["input_ids"], batch["attention_mask"],
                          deterministic=rng is None or dropout == 0.0, rng=rng)
    return bert.classifier_logits(theta["head"], h, batch["attention_mask"], pooling)

  def loss_fn(theta, batch, rng):
    return train.softmax_cross_entropy(logits_fn(theta, batch, rng), batch["labels"])
  return loss_fn, logits_fn


def run_one(cfg: dict, out_dir: pathlib.Path, quiet: bool = False) -> dict:
  """Trains one configuration in this process and returns its metrics."""
  import jax
  from tqdm import tqdm

  import lowrank_jax as lj
  from lowrank_jax import train
  from lowrank_jax.optim import memory
  from experiments import recipes

  seed = cfg.get("seed", 0)
  task, config, theta0, (k_method, k_train) = load_problem(cfg)
  splits, label_names = task.splits, task.label_names
  n_total = lj.count_params(theta0)
  bs = cfg.get("batch_size", 32)
  epochs = cfg.get("epochs", 3)
  steps_per_epoch = len(splits["train"]["labels"]) // bs
  total_steps = epochs * steps_per_epoch
  setup = recipes.build(cfg["method"], theta0, k_method, total_steps)
  theta0, reparam, phi = setup.theta0, setup.reparam, setup.phi
  loss_fn, logits_fn = model_fns(cfg, config)

  optimizer = setup.wrap_optimizer(recipes.build_optimizer(cfg.get("optimizer", {}), total_steps))
  opt_state = optimizer.init(phi)
  step = train.make_train_step(reparam, optimizer, loss_fn, regularizer=setup.regularizer)
  # label by the first path component that is not a chain index: bert / head
  mem = memory.memory_report(theta0, phi, opt_state, partition=lambda path: next(
      (c for c in path.split("/") if not c.isdigit()), "(root)"))
  if not quiet:
    print(f"[{cfg['name']}] {lj.count_params(phi):,} trainable of {n_total:,} parameters\n{mem}", flush=True)

  predict_theta = jax.jit(logits_fn)

  def predict(phi, theta0, batch):
    return predict_theta(reparam.apply(theta0, phi), batch)

  def evaluate(split, predict=predict):
    return evaluate_split(lambda b: predict(phi, theta0, b), splits[split], bs)

  rng = np.random.default_rng(seed)
  timer = train.StepTimer(warmup=3)
  history = []
  t_start = time.perf_counter()
  for epoch in range(epochs):
    losses = []
    bar = tqdm(train.batches(splits["train"], bs, rng=rng), total=steps_per_epoch,
               desc=f"{cfg['name']} epoch {epoch + 1}/{epochs}", disable=quiet, file=sys.stderr,
               mininterval=2.0)
    for i, b in enumerate(bar):
      k = jax.random.fold_in(k_train, epoch * steps_per_epoch + i)
      phi, opt_state, metrics = timer.time(step, phi, opt_state, theta0, b, k)
      losses.append(float(metrics["loss"]))
      if i % 10 == 0:
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    val_acc, val_loss = evaluate("validation")
    history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                    "val_loss": val_loss, "val_accuracy": val_acc})
    print(f"[{cfg['name']}] epoch {epoch + 1}: train loss {np.mean(losses):.4f}  "
          f"val loss {val_loss:.4f}  val acc {val_acc:.4f}", flush=True)
  test_acc, test_loss = evaluate("test")
  deployed = None
  if cfg.get("deploy"):
    theta_dep = recipes.deploy(cfg["deploy"], reparam, theta0, phi)
    deployed, _ = evaluate("test", lambda p, t, b: predict_theta(theta_dep, b))
    print(f"[{cfg['name']}] deployed ({cfg['deploy']['kind']}) test accuracy {deployed:.4f} "
          f"(unmerged {test_acc:.4f})", flush=True)
  n_train = lj.count_params(phi)
  result = {
    "name": cfg["name"], "method": cfg["method"]["kind"], "config": cfg,
    "trainable_params": n_train, "total_params": n_total,
    "trainable_percent": 100.0 * n_train / n_total,
    "test_accuracy": test_acc, "test_loss": test_loss, "deployed_test_accuracy": deployed,
    "step_time_s": timer.median, "train_time_s": time.perf_counter() - t_start,
    "peak_rss_bytes": train.peak_rss_bytes(), "memory": mem.as_dict(), "history": history,
    "n_train": len(splits["train"]["labels"]), "labels": list(label_names),
    "data_fingerprint": task.fingerprint, "python": task.python_version,
  }
  _atomic_write(out_dir / f"{cfg['name']}.json", json.dumps(result, indent=1, default=float))
  return result


def table(results: list[dict]) -> str:
  rows = ["| method | trainable params | % of total | test accuracy | deployed acc. | step time (s) "
          "| peak RSS (GiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    dep = r.get("deployed_test_accuracy")
    rows.append(f"| {r['name']} | {r['trainable_params']:,} | {r['trainable_percent']:.3f} | "
                f"{r['test_accuracy']:.4f} | {'-' if dep is None else f'{dep:.4f}'} | "
                f"{r['step_time_s']:.3f} | {r['peak_rss_bytes'] / 2**30:.2f} |")
  return "\n".join(rows)


def plot(results: list[dict], path: pathlib.Path) -> None:
  """Test accuracy vs trainable parameters (log scale); colour = median step time,
  marker area = peak RSS, the LoRA rank sweep on q,v joined by a line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.6, 4.8))
  x = np.array([r["trainable_params"] for r in results], float)
  y = np.array([100 * r["test_accuracy"] for r in results])
  t = np.array([r["step_time_s"] for r in results])
  rss = np.array([r["peak_rss_bytes"] / 2**30 for r in results])
  sweep = sorted((r["config"]["method"].get("rank", 0), i) for i, r in enumerate(results)
                 if r["method"] == "lora" and r["config"]["method"].get("where") == "(query|value)/kernel"
                 and r["config"].get("optimizer", {}).get("kind", "adamw") == "adamw")
  if len(sweep) > 1:
    idx = [i for _, i in sweep]
    ax.plot(x[idx], y[idx], color="0.6", lw=1, zorder=1, label="LoRA q,v, r = "
            + ", ".join(str(r) for r, _ in sweep))
    ax.legend(loc="lower right", fontsize=8)
  sc = ax.scatter(x, y, c=t, s=30 + 60 * rss, cmap="viridis", edgecolors="k", linewidths=0.4, zorder=2)
  for r, xi, yi in zip(results, x, y):
    ax.annotate(r["name"], (xi, yi), fontsize=7, xytext=(4, 4), textcoords="offset points")
  fig.colorbar(sc, ax=ax, label="step time (s)")
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("MiniLM-L6 on stdlib docstrings (marker area: peak RSS)", fontsize=10)
  ax.grid(alpha=0.3)
  save_figure(fig, path)


def save_figure(fig, path: pathlib.Path) -> None:
  """Writes a matplotlib figure as PNG atomically (temp name, then rename) and closes it."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  tmp = path.with_name(f".{path.stem}.tmp.png")
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", nargs="+", required=True, help="config JSON files")
  p.add_argument("--out", default="outputs/docstrings", help="output folder")
  p.add_argument("--epochs", type=int, default=None, help="override every config's epochs")
  p.add_argument("--max-per-class", type=int, default=None, help="cap examples per class (quick runs)")
  p.add_argument("--inline", action="store_true", help="run configs in this process (no per-config RSS)")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--resume", action="store_true",
                 help="reuse OUT/NAME.json of a config already run with the same settings")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results = []
  for path in args.configs:
    cfg = json.loads(pathlib.Path(path).read_text())
    cfg.setdefault("name", pathlib.Path(path).stem)
    if args.epochs is not None:
      cfg["epochs"] = args.epochs
    if args.max_per_class is not None:
      cfg.setdefault("data", {})["max_per_class"] = args.max_per_class
    done = out / f"{cfg['name']}.json"
    if args.resume and done.exists():
      prev = json.loads(done.read_text())
      if prev.get("config") == cfg:
        print(f"[{cfg['name']}] reusing {done}", flush=True)
        results.append(prev)
        continue
    if args.inline:
      results.append(run_one(cfg, out, args.quiet))
      continue
    cfg_path = out / f".{cfg['name']}.config.json"
    _atomic_write(cfg_path, json.dumps(cfg))
    cmd = [sys.executable, "-m", "experiments.docstrings", "--child", str(cfg_path), "--out", str(out)]
    if args.quiet:
      cmd.append("--quiet")
    subprocess.run(cmd, check=True)
    results.append(json.loads((out / f"{cfg['name']}.json").read_text()))
  _atomic_write(out / "results.json", json.dumps(results, indent=1, default=float))
  md = table(results)
  _atomic_write(out / "results.md", md + "\n")
  plot(results, out / "accuracy_vs_params.png")
  print("\n" + md)
  print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy_vs_params.png'}")
  return 0


def _child(argv) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--child", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--quiet", action="store_true")
  a = p.parse_args(argv)
  run_one(json.loads(pathlib.Path(a.child).read_text()), pathlib.Path(a.out), a.quiet)
  return 0


if __name__ == "__main__":
  sys.exit(_child(sys.argv[1:]) if "--child" in sys.argv else main())
