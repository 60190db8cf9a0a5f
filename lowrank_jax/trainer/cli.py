"""``lowrank-jax-train``: the main job, one or more configs in one command.

    lowrank-jax-train configs/minilm_frozen.json configs/minilm_lora.json configs/minilm_full.json \\
        --out outputs/docstrings [--set training.epochs=1 --set data.max_per_class=8] [--resume]

Every config (with the ``--set`` overrides) is validated before the first one trains. Each
config then runs in its own child process (so its peak memory is its own; ``--inline``
runs them in this process), prints a progress bar with the loss and tokens/s and one line
per epoch, and writes ``OUT/NAME.json`` and ``OUT/NAME/`` (metrics, checkpoints, adapter;
:mod:`lowrank_jax.trainer.run`). At the end ``OUT/results.json``, ``results.md`` (the table)
and ``accuracy_vs_params.png`` are written and the table printed.

``--resume``: a config whose ``OUT/NAME.json`` was written with the same config is reused,
one with checkpoints continues from its latest, the others start.
SIGTERM / SIGINT: the running config finishes its step, writes a checkpoint, and the
command exits 0 saying so. A child never outlives this process (it gets SIGTERM when the
parent dies, even by SIGKILL).

Exit status: 0 done (or interrupted), 1 a run failed, 2 a bad config or command line (or
a ``--resume`` whose checkpoint was written with another config or base), 3 a run diverged
(its row says so; the other configs still ran).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
from typing import Optional, Sequence

from lowrank_jax.trainer import files, report
from lowrank_jax.trainer.base import ResumeError, folder_hash
from lowrank_jax.trainer.config import ConfigError, from_dict, load_all, read_json, to_dict
from lowrank_jax.trainer.rundir import RunDir
from lowrank_jax.trainer.run import check_resumable, run
from lowrank_jax.trainer.signals import StopFlag, die_with_parent

__all__ = ["main", "EXIT_OK", "EXIT_FAILED", "EXIT_CONFIG", "EXIT_DIVERGED", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_DIVERGED = 0, 1, 2, 3
EXIT_INTERRUPTED = 75  # child -> parent only; the command itself exits 0 when interrupted
_STATUS_EXIT = {"completed": EXIT_OK, "diverged": EXIT_DIVERGED, "interrupted": EXIT_INTERRUPTED}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="lowrank-jax-train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("configs", nargs="+", metavar="CONFIG", help="config JSON files")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config key in every config, e.g. training.epochs=1 (repeatable)")
  p.add_argument("--out", default="outputs/run", help="output folder (default: outputs/run)")
  p.add_argument("--resume", action="store_true",
                 help="reuse finished runs with the same config, continue the others from their checkpoints")
  p.add_argument("--inline", action="store_true", help="run the configs in this process")
  p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
  return p


def _reusable(config, out: pathlib.Path) -> Optional[dict]:
  """The finished result of ``config`` in ``out`` when it was written with the same config."""
  path = out / f"{config.name}.json"
  if not path.exists():
    return None
  prev = json.loads(path.read_text())
  if prev.get("config") != to_dict(config) or prev.get("status") not in ("completed", "diverged"):
    return None
  base = prev.get("base") or {}
  if os.path.isdir(base.get("path", "")) and folder_hash(base["path"]) != base.get("sha256"):
    return None  # the base folder changed since: not the same run (resuming it says why)
  return prev


def _run_child(config, out: pathlib.Path, resume: bool, quiet: bool, stop: StopFlag) -> tuple[str, Optional[dict]]:
  """Runs ``config`` in a child process; ``(status, result row or None)``."""
  cfg_path = out / config.name / "config.json"
  files.write_json(cfg_path, to_dict(config))
  cmd = [sys.executable, "-m", "lowrank_jax.trainer.cli", "--child", str(cfg_path), "--out", str(out),
         "--parent", str(os.getpid())]
  cmd += ["--resume"] * resume + ["--quiet"] * quiet
  # its own session: a terminal's Ctrl-C reaches only this process, which forwards it once
  child = subprocess.Popen(cmd, start_new_session=True)
  stop.forward_to(child)
  try:
    rc = child.wait()
  finally:
    stop.forward_to(None)
  status = {v: k for k, v in _STATUS_EXIT.items()}.get(rc)
  if status is None:
    raise RuntimeError(f"{config.name}: the training process exited with status {rc}")
  if status == "interrupted":
    return status, None
  return status, json.loads((out / f"{config.name}.json").read_text())


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command; returns its exit status (see the module docstring)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["--child"]:
    return _child(argv)
  args = _parser().parse_args(argv)
  out = pathlib.Path(args.out)
  try:
    configs = load_all(args.configs, args.overrides)
    if args.resume:
      for c in configs:
        if _reusable(c, out) is None:
          check_resumable(c, RunDir(out / c.name))
  except (ConfigError, ResumeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_CONFIG
  print(f"{len(configs)} config(s) valid: {', '.join(c.name for c in configs)}", file=sys.stderr, flush=True)
  out.mkdir(parents=True, exist_ok=True)
  results = []
  with StopFlag() as stop:
    for c in configs:
      prev = _reusable(c, out) if args.resume else None
      if prev is not None:
        print(f"[{c.name}] reusing {out / (c.name + '.json')}", flush=True)
        results.append(prev)
        continue
      if args.inline:
        try:
          row = run(c, out, resume=args.resume, quiet=args.quiet, stop=stop)
        except ResumeError as e:
          print(f"error: {e}", file=sys.stderr)
          return EXIT_CONFIG
        status = row["status"]
      else:
        try:
          status, row = _run_child(c, out, args.resume, args.quiet, stop)
        except RuntimeError as e:  # the child printed its traceback or error
          print(f"error: {e}", file=sys.stderr)
          return EXIT_FAILED
      if status == "interrupted" or stop.requested:
        print(f"interrupted by {stop.signal or 'a signal'} during {c.name}; its checkpoint is written. "
              f"Continue with: lowrank-jax-train {' '.join(args.configs)} --out {out} --resume",
              flush=True)
        return EXIT_OK
      results.append(row)
  files.write_json(out / "results.json", results)
  md = report.table(results)
  files.write_text(out / "results.md", md + "\n")
  report.plot(results, out / "accuracy_vs_params.png")
  print("\n" + md)
  print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy_vs_params.png'}")
  diverged = [r["name"] for r in results if r.get("status") == "diverged"]
  if diverged:
    print(f"diverged: {', '.join(diverged)} (non-finite loss or gradients)", file=sys.stderr)
    return EXIT_DIVERGED
  return EXIT_OK


def _child(argv: Sequence[str]) -> int:
  """The per-config child: ``--child CONFIG_JSON --out OUT --parent PID [--resume] [--quiet]``."""
  p = argparse.ArgumentParser(prog="lowrank-jax-train --child")
  p.add_argument("--child", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--parent", type=int, required=True)
  p.add_argument("--resume", action="store_true")
  p.add_argument("--quiet", action="store_true")
  a = p.parse_args(argv)
  die_with_parent(a.parent)
  config = from_dict(read_json(a.child), a.child)
  with StopFlag() as stop:
    try:
      row = run(config, a.out, resume=a.resume, quiet=a.quiet, stop=stop)
    except ResumeError as e:
      print(f"error: {e}", file=sys.stderr)
      return EXIT_FAILED
  return _STATUS_EXIT[row["status"]]


if __name__ == "__main__":
  sys.exit(main())
