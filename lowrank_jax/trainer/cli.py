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

Many devices, many hosts: ``--mesh data:2,fsdp:2,tensor:2`` (or the config's ``mesh``)
trains on a device mesh (:mod:`lowrank_jax.trainer.placement`). On a TPU pod, a SLURM
allocation or with ``--coordinator HOST:PORT --num-processes N --process-id I`` (or the
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables, or the
config's ``distributed``) the same command runs on every host; each training process
joins the run (``jax.distributed``) and the mesh spans every host's devices. ``--out``
must then be one folder every host sees (a shared file system or a bucket mount):
checkpoints are written by all processes together, the metrics, results table, plot and
exports by process 0. This process itself never touches the accelerators (it pins JAX
to the CPU for the few checks it makes), so each config's process can own them.

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
import tempfile
from typing import Optional, Sequence

import jax

from lowrank_jax.trainer import files, report
from lowrank_jax.trainer.base import ResumeError, same_folder
from lowrank_jax import distributed
from lowrank_jax.trainer.config import ConfigError, from_dict, load_all, read_json, to_dict
from lowrank_jax.trainer.processes import join
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
  _distributed_arguments(p)
  return p


def _distributed_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("devices and hosts")
  g.add_argument("--mesh", metavar="SPEC",
                 help="device mesh of every config (its mesh.mesh), e.g. data:2,fsdp:2,tensor:2; "
                      "'none' for one device")
  g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (multi-process runs)")
  g.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
  g.add_argument("--process-id", type=int, metavar="I", help="this process's index in [0, N)")


def _process_flags(args) -> dict:
  """The ``--coordinator/--num-processes/--process-id`` given (checked like the config's)."""
  flags = {"coordinator": args.coordinator, "num_processes": args.num_processes, "process_id": args.process_id}
  try:
    distributed.DistributedConfig(**flags)
  except ValueError as e:
    raise ConfigError(f"command line: {e}") from e
  return {k: v for k, v in flags.items() if v is not None}


def _flag_args(flags: dict) -> list[str]:
  return [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _comparable(config_dict: dict) -> dict:
  """A config's JSON without what may differ between the processes of one run."""
  return {k: v for k, v in config_dict.items() if k not in ("mesh", "distributed")}


def _stated_process_index(configs, flags: dict) -> int:
  """This process's index as the command line, the config, ``JAX_PROCESS_ID`` or SLURM's
  ``SLURM_PROCID`` state it (0 when none does)."""
  for value in (flags.get("process_id"), configs[0].distributed.process_id,
                os.environ.get("JAX_PROCESS_ID"), os.environ.get("SLURM_PROCID")):
    if value is not None and str(value).strip().isdigit():
      return int(value)
  return 0


def _pin_to_cpu() -> None:
  """Keeps this (parent) process off the accelerators: it only reads checkpoint metadata,
  and a GPU it initialised (memory preallocation) or a TPU it held (one process per chip)
  would be taken from the training process. Called first thing in the command, before any
  JAX computation, so no backend exists yet; the children get the user's environment
  (``JAX_PLATFORMS`` included) unchanged, not this setting."""
  jax.config.update("jax_platforms", "cpu")


def _reusable(config, out: pathlib.Path) -> Optional[dict]:
  """The finished result of ``config`` in ``out`` when it was written with the same config."""
  path = out / f"{config.name}.json"
  if not path.exists():
    return None
  prev = json.loads(path.read_text())
  if (_comparable(prev.get("config") or {}) != _comparable(to_dict(config))
      or prev.get("status") not in ("completed", "diverged")):
    return None
  base = prev.get("base") or {}
  if os.path.isdir(base.get("path", "")) and not same_folder(base, base["path"]):
    return None  # the base folder changed since: not the same run (resuming it says why)
  return prev


def _run_child(config, out: pathlib.Path, resume: bool, quiet: bool, stop: StopFlag,
               flags: dict) -> tuple[str, Optional[dict], int]:
  """Runs ``config`` in a child process; ``(status, result row or None, its process index)``."""
  with tempfile.TemporaryDirectory(prefix=f"lowrank_jax_{config.name}_") as tmp:
    cfg_path, report_path = pathlib.Path(tmp) / "config.json", pathlib.Path(tmp) / "report.json"
    files.write_json(cfg_path, to_dict(config))
    cmd = [sys.executable, "-m", "lowrank_jax.trainer.cli", "--child", str(cfg_path), "--out", str(out),
           "--parent", str(os.getpid()), "--report", str(report_path), *_flag_args(flags)]
    cmd += ["--resume"] * resume + ["--quiet"] * quiet
    # its own session: a terminal's Ctrl-C reaches only this process, which forwards it once
    child = subprocess.Popen(cmd, start_new_session=True)
    stop.forward_to(child)
    try:
      rc = child.wait()
    finally:
      stop.forward_to(None)
    status = {v: k for k, v in _STATUS_EXIT.items()}.get(rc)
    if status is None or not report_path.exists():
      raise RuntimeError(f"{config.name}: the training process exited with status {rc}")
    report = json.loads(report_path.read_text())
  return status, (None if status == "interrupted" else report["row"]), report["process_index"]


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command; returns its exit status (see the module docstring)."""
  command = argv is None  # the console script (not a call from Python)
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["--child"]:
    return _child(argv)
  args = _parser().parse_args(argv)
  if command and not args.inline:
    _pin_to_cpu()
  out = pathlib.Path(args.out)
  overrides = list(args.overrides)
  if args.mesh is not None:
    overrides.append(f"mesh.mesh={'null' if args.mesh.lower() in ('none', 'null') else args.mesh}")
  try:
    flags = _process_flags(args)
    configs = load_all(args.configs, overrides)
    if args.inline:
      if len({json.dumps(to_dict(c)["distributed"]) for c in configs}) > 1:
        raise ConfigError("--inline: every config must have the same 'distributed' section (one "
                          "jax.distributed per process); run without --inline instead")
      join(configs[0].distributed, **flags)
    reusable = {c.name: _reusable(c, out) for c in configs} if args.resume else {}
    for c in configs:
      if args.resume and reusable[c.name] is None:
        check_resumable(c, RunDir(out / c.name))
  except (ConfigError, ResumeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_CONFIG
  print(f"{len(configs)} config(s) valid: {', '.join(c.name for c in configs)}", file=sys.stderr, flush=True)
  out.mkdir(parents=True, exist_ok=True)
  results, processes = [], set()
  with StopFlag() as stop:
    for c in configs:
      prev = reusable.get(c.name)
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
        processes.add(jax.process_index())
      else:
        try:
          status, row, index = _run_child(c, out, args.resume, args.quiet, stop, flags)
        except RuntimeError as e:  # the child printed its traceback or error
          print(f"error: {e}", file=sys.stderr)
          return EXIT_FAILED
        processes.add(index)
      if status == "interrupted" or stop.requested:
        print(f"interrupted by {stop.signal or 'a signal'} during {c.name}; its checkpoint is written. "
              f"Continue with: lowrank-jax-train {' '.join(args.configs)} --out {out} --resume",
              flush=True)
        return EXIT_OK
      results.append(row)
  diverged = [r["name"] for r in results if r.get("status") == "diverged"]
  if not processes:  # every result reused: no training process said which process this is
    processes.add(_stated_process_index(configs, flags))
  if processes - {0}:  # another process (index 0) writes the table
    print(f"process {max(processes)}: done; process 0 writes {out / 'results.json'}", flush=True)
    return EXIT_DIVERGED if diverged else EXIT_OK
  files.write_json(out / "results.json", results)
  md = report.table(results)
  files.write_text(out / "results.md", md + "\n")
  report.plot(results, out / "accuracy_vs_params.png")
  print("\n" + md)
  print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy_vs_params.png'}")
  if diverged:
    print(f"diverged: {', '.join(diverged)} (non-finite loss or gradients)", file=sys.stderr)
    return EXIT_DIVERGED
  return EXIT_OK


def _child(argv: Sequence[str]) -> int:
  """The per-config child: ``--child CONFIG_JSON --out OUT --parent PID --report FILE
  [--resume] [--quiet] [--coordinator H:P --num-processes N --process-id I]``.

  It joins the multi-process run first (before any other JAX call), trains, and writes
  ``{"process_index", "row"}`` to ``FILE`` for its parent."""
  p = argparse.ArgumentParser(prog="lowrank-jax-train --child")
  p.add_argument("--child", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--parent", type=int, required=True)
  p.add_argument("--report", required=True)
  p.add_argument("--resume", action="store_true")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--coordinator")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  a = p.parse_args(argv)
  die_with_parent(a.parent)
  config = from_dict(read_json(a.child), a.child)
  join(config.distributed, **_process_flags(a))
  with StopFlag() as stop:
    try:
      row = run(config, a.out, resume=a.resume, quiet=a.quiet, stop=stop)
    except ResumeError as e:
      print(f"error: {e}", file=sys.stderr)
      return EXIT_FAILED
  files.write_json(a.report, {"process_index": jax.process_index(), "row": row})
  return _STATUS_EXIT[row["status"]]


if __name__ == "__main__":
  sys.exit(main())
