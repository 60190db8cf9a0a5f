"""Many processes (hosts): ``jax.distributed`` set-up, per-process data, meshes.

One JAX process runs per host (per GPU with some launchers); together they see one
global device list, and a ``jax.Array`` is global: each process holds the shards of its
own devices. The steps of a multi-process run are the single-process ones; only three
things change:

1. :func:`initialize` first, in every process, before any other JAX call::

     lj.distributed.initialize()                          # TPU pod / SLURM / Open MPI / k8s
     lj.distributed.initialize("10.0.0.1:1234", 2, pid)   # explicit (e.g. localhost tests)

   Without arguments it reads ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
   ``JAX_PROCESS_ID``, then lets ``jax.distributed.initialize`` detect the cluster
   (TPU pods, SLURM, Open MPI, Kubernetes); with neither it is a single-process run
   and does nothing.
2. Data: each process loads only its rows (:func:`process_batch_rows` says which) and
   :func:`host_local_batch_to_global` assembles the global batch from them
   (``jax.make_array_from_process_local_data``); no process ever holds the global batch.
3. Meshes span all processes' devices: :func:`make_mesh` (= :func:`lowrank_jax.sharding.make_mesh`,
   topology-aware through ``jax.make_mesh``).

Checkpoints (:mod:`lowrank_jax.checkpoint`) are collective: every process calls
``save``/``restore`` with the same arguments.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowrank_jax import sharding as sharding_lib, tree as tree_lib

try:  # jax's own cluster table (TPU pods, SLURM, Open MPI, k8s); it has no public accessor
  from jax._src.clusters import ClusterEnv as _ClusterEnv
except ImportError:  # pragma: no cover - a jax without it: explicit arguments only
  _ClusterEnv = None

PyTree = Any

__all__ = ["DistributedConfig", "ProcessInfo", "initialize", "process_info",
           "host_local_batch_to_global", "process_batch_rows", "make_mesh"]

make_mesh = sharding_lib.make_mesh

_ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
        "process_id": "JAX_PROCESS_ID"}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How to join a multi-process run (all ``None``: environment / cluster detection).

  Attributes:
    coordinator: ``host:port`` of process 0's coordination service.
    num_processes: number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    local_device_ids: the devices this process drives (default: all visible).
    timeout_s: how long to wait for every process to join.
  """
  coordinator: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[tuple[int, ...]] = None
  timeout_s: int = 300

  def __post_init__(self):
    if self.coordinator is not None and (":" not in self.coordinator
                                         or not self.coordinator.rsplit(":", 1)[1].isdigit()):
      raise ValueError(f"distributed: coordinator must be 'host:port', got {self.coordinator!r}")
    if self.num_processes is not None and (not isinstance(self.num_processes, int)
                                           or self.num_processes < 1):
      raise ValueError(f"distributed: num_processes must be a positive int, got {self.num_processes!r}")
    if self.process_id is not None:
      if not isinstance(self.process_id, int) or self.process_id < 0:
        raise ValueError(f"distributed: process_id must be a non-negative int, got {self.process_id!r}")
      if self.num_processes is not None and self.process_id >= self.num_processes:
        raise ValueError(f"distributed: process_id {self.process_id} is not below num_processes "
                         f"{self.num_processes}")
    if self.timeout_s <= 0:
      raise ValueError(f"distributed: timeout_s must be positive, got {self.timeout_s}")

  @classmethod
  def from_env(cls, **overrides) -> "DistributedConfig":
    """Fields from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
    where ``overrides`` leaves them ``None``."""
    values = dict(overrides)
    for field, var in _ENV.items():
      if values.get(field) is None and os.environ.get(var):
        raw = os.environ[var]
        if field == "coordinator":
          values[field] = raw
        else:
          if not raw.strip().isdigit():
            raise ValueError(f"distributed: environment variable {var}={raw!r} is not an integer")
          values[field] = int(raw)
    return cls(**values)

  @property
  def explicit(self) -> tuple[Optional[str], Optional[int], Optional[int]]:
    return self.coordinator, self.num_processes, self.process_id


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """Where this process stands: index, count, device counts."""
  process_id: int
  num_processes: int
  local_device_count: int
  device_count: int


def process_info() -> ProcessInfo:
  return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())


def _cluster_detected() -> bool:
  """Whether ``jax.distributed.initialize()``'s own detection finds a cluster (SLURM,
  TPU pod, Open MPI, k8s); without one a run is single-process."""
  if _ClusterEnv is None:
    return False
  return any(not env.opt_in_only_method and env.is_env_present()
             for env in _ClusterEnv._cluster_types)


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, config: Optional[DistributedConfig] = None,
               local_device_ids: Optional[Sequence[int]] = None,
               timeout_s: Optional[int] = None) -> ProcessInfo:
  """Joins the multi-process run (``jax.distributed.initialize``); idempotent.

  Args:
    coordinator: ``host:port`` of process 0 (``JAX_COORDINATOR_ADDRESS``).
    num_processes: number of processes (``JAX_NUM_PROCESSES``).
    process_id: this process's index (``JAX_PROCESS_ID``).
    config: a :class:`DistributedConfig` instead of the arguments.
    local_device_ids: the devices this process drives.
    timeout_s: how long to wait for the other processes (default 300).

  Give all three of ``coordinator``/``num_processes``/``process_id`` (or their
  variables), or none: then a cluster that ``jax.distributed`` detects (TPU pod,
  SLURM, Open MPI, k8s) supplies them, and without one the run is single-process
  and nothing is done. A second call returns the current state if it agrees with the
  arguments.

  Returns:
    :class:`ProcessInfo` of this process.

  Raises:
    ValueError: only some of the three are given (outside a detected cluster), or a
      second call asks for another set-up.
  """
  if config is None:
    config = DistributedConfig.from_env(
        coordinator=coordinator, num_processes=num_processes, process_id=process_id,
        local_device_ids=None if local_device_ids is None else tuple(local_device_ids),
        timeout_s=300 if timeout_s is None else timeout_s)
  elif any(v is not None for v in (coordinator, num_processes, process_id, local_device_ids)):
    raise ValueError("distributed.initialize: pass either config= or the arguments, not both")
  given = {k: v for k, v in zip(_ENV, config.explicit) if v is not None}
  if jax.distributed.is_initialized():
    info = process_info()
    if ("num_processes" in given and given["num_processes"] != info.num_processes) or (
        "process_id" in given and given["process_id"] != info.process_id):
      raise ValueError(f"distributed.initialize: already initialized as process {info.process_id} "
                       f"of {info.num_processes}, asked for {given}")
    return info
  if 0 < len(given) < 3 and not _cluster_detected():
    missing = [f"{k} ({_ENV[k]})" for k in _ENV if k not in given]
    raise ValueError(f"distributed.initialize: got {given} but not {', '.join(missing)}; give all "
                     f"three (coordinator 'host:port', num_processes, process_id) or none")
  if not given and not _cluster_detected():
    return process_info()  # a single-process run
  jax.distributed.initialize(
      coordinator_address=config.coordinator, num_processes=config.num_processes,
      process_id=config.process_id,
      local_device_ids=None if config.local_device_ids is None else list(config.local_device_ids),
      initialization_timeout=config.timeout_s)
  return process_info()


# ------------------------------------------------------------------ per-process data

def _batch_sharding(mesh: Mesh, spec: P) -> NamedSharding:
  if not isinstance(spec, P):
    raise TypeError(f"expected a PartitionSpec for the batch, got {type(spec).__name__}")
  return NamedSharding(mesh, spec)


def _batch_axis_size(mesh: Mesh, spec: P) -> int:
  """How many ways ``spec``'s first entry splits the batch axis."""
  first = spec[0] if len(spec) else None
  names = () if first is None else (first,) if isinstance(first, str) else tuple(first)
  return int(np.prod([mesh.shape[a] for a in names]))


def process_batch_rows(global_batch_size: int, mesh: Mesh, spec: P = P("data")) -> slice:
  """The rows of a global batch that this process's devices hold under ``spec``.

  Load exactly these rows (e.g. ``dataset[step * B + rows.start : step * B + rows.stop]``)
  and pass them to :func:`host_local_batch_to_global`.

  Raises:
    ValueError: the batch does not split evenly, or this process's rows are not one
      contiguous range (a mesh whose batch axis interleaves processes).
  """
  sharding = _batch_sharding(mesh, spec)
  size = _batch_axis_size(mesh, spec)
  if global_batch_size % size:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the batch "
                     f"axis {spec[0]!r} of size {size} (mesh {dict(mesh.shape)})")
  idx = sharding.addressable_devices_indices_map((global_batch_size,))
  rows = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
                 for s in idx.values()})
  start, stop = rows[0][0], rows[-1][1]
  covered = sum(b - a for a, b in rows)
  if covered != stop - start:
    raise ValueError(f"process {jax.process_index()}'s rows {rows} of the batch are not contiguous "
                     f"under {spec} on mesh {dict(mesh.shape)}; order the mesh so that the batch "
                     f"axis is split between processes in blocks")
  return slice(start, stop)


def host_local_batch_to_global(batch: PyTree, mesh: Mesh, spec: Any = P("data")) -> PyTree:
  """Assembles global arrays from each process's share of the batch.

  Every process calls it with its own rows (the ones :func:`process_batch_rows` names,
  same count on every process); the result is a tree of global ``jax.Array``
  sharded by ``spec`` whose leading axis is the concatenation over processes.

  Args:
    batch: a tree of this process's arrays (numpy or jax), leading axis = local rows.
    mesh: the global mesh.
    spec: ``PartitionSpec`` of the global arrays (one for every leaf, or a tree of them);
      its first entry splits the batch axis.

  Raises:
    ValueError: naming the leaf whose local rows do not split over this process's devices.
  """
  items = tree_lib.flatten_with_paths(batch)
  treedef = jax.tree_util.tree_structure(batch)
  specs = [spec] * len(items) if isinstance(spec, P) else treedef.flatten_up_to(spec)
  out = []
  for (path, x), s in zip(items, specs):
    sharding = _batch_sharding(mesh, s)
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim == 0:
      raise ValueError(f"batch leaf '{path}' is a scalar; per-process batches need a leading row axis")
    size = _batch_axis_size(mesh, s)
    # distinct row blocks among this process's devices: one row per block of a [size] batch
    blocks = len({i[0].start for i in sharding.addressable_devices_indices_map((size,)).values()})
    if x.shape[0] % blocks:
      raise ValueError(f"batch leaf '{path}' has {x.shape[0]} local rows on process "
                       f"{jax.process_index()}, not divisible by the {blocks} batch shards "
                       f"its devices hold under {s} (mesh {dict(mesh.shape)})")
    out.append(jax.make_array_from_process_local_data(sharding, x))
  return jax.tree_util.tree_unflatten(treedef, out)
