"""Where a run's arrays live: one device, or a mesh over every process's devices.

A :class:`Placement` is made once per run from the config's ``mesh`` section
(:class:`~lowrank_jax.trainer.config.MeshConfig`) and the model family, and used by every
part of the run that touches devices:

* the frozen base ``theta0``: one ``PartitionSpec`` per leaf from the config's ``rules``,
  then the family's (:func:`lowrank_jax.sharding.family_rules`: FSDP on one dimension,
  Megatron column/row tensor parallelism on the other, experts split); quantized leaves
  keep their codes in the codec's row layout, gathered inside each matmul
  (:func:`lowrank_jax.sharding.shard`). A Hugging Face decoder folder is read slice by
  slice: each process reads from the safetensors files only the parts of each tensor
  that its own devices hold (:func:`load_decoder`), and a BERT folder likewise
  (:func:`load_bert`);
* ``phi`` from its base weight's spec (:func:`lowrank_jax.sharding.phi_specs`), the
  optimizer state from its parameter's (:func:`lowrank_jax.sharding.like`);
* the batch: split over the ``data`` and FSDP axes; each process passes only its rows
  (:func:`lowrank_jax.distributed.process_batch_rows`,
  :func:`lowrank_jax.distributed.host_local_batch_to_global`);
* the step: :func:`lowrank_jax.sharding.jit_train_step` (outputs pinned to the inputs'
  placements, so it compiles once).

Sharding never changes the arithmetic beyond the order of floating-point sums: a run on
any mesh follows the one-device run (to rounding), and a checkpoint written on one mesh
restores onto another.

Many processes (:mod:`~lowrank_jax.trainer.processes`): every process runs the same
program; :meth:`Placement.to_host` gathers arrays for what only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowrank_jax import distributed, sharding, tree as tree_lib
from lowrank_jax.io import hf as hf_io
from lowrank_jax.models import bert, hf_decoder
from lowrank_jax.trainer.config import MeshConfig

__all__ = ["Placement", "LoadReport", "load_sources", "load_decoder", "load_bert"]

PyTree = Any


# ------------------------------------------------------------------------- placement

def _spec(entries) -> P:
  return P(*entries)


def _pick(explicit: Optional[str], default: str, names) -> Optional[str]:
  if explicit is not None:
    return explicit
  return default if default in names else None


@dataclasses.dataclass(frozen=True)
class Placement:
  """Device placement of a run (``mesh=None``: the default device, nothing sharded).

  Attributes:
    mesh: the device mesh (over every process's devices), or ``None``.
    rules: ``(regex, PartitionSpec)`` pairs for the frozen base, first match wins.
    fsdp: the FSDP axis (its quantized leaves are gathered inside the matmul), or ``None``.
    batch_axes: the mesh axes that split the batch, in mesh order.
    on_indivisible: ``"replicate"`` or ``"error"`` (see :func:`lowrank_jax.sharding.partition_specs`).
  """
  mesh: Optional[Mesh] = None
  rules: tuple = ()
  fsdp: Optional[str] = None
  batch_axes: tuple[str, ...] = ()
  on_indivisible: str = "replicate"

  @classmethod
  def from_config(cls, mc: MeshConfig, family: str) -> "Placement":
    """The placement of ``mc`` for a model of ``family`` (``"bert"`` or a decoder family)."""
    if mc.mesh is None:
      return cls()
    mesh = sharding.make_mesh(mc.mesh, dcn=mc.dcn)
    names = mesh.axis_names
    fsdp = _pick(mc.fsdp, "fsdp", names)
    tensor = _pick(mc.tensor, "tensor", names)
    expert = _pick(mc.expert, "expert", names)
    rules = [(regex, _spec(entries)) for regex, entries in mc.rules]
    rules += sharding.family_rules(family, fsdp=fsdp, tensor=tensor,
                                   **({} if family == "bert" else {"expert": expert}))
    batch = mc.batch if mc.batch is not None else tuple(a for a in names if a in ("data", fsdp))
    batch = tuple(a for a in names if a in batch)
    return cls(mesh=mesh, rules=tuple(rules), fsdp=fsdp, batch_axes=batch, on_indivisible=mc.on_indivisible)

  @property
  def sharded(self) -> bool:
    return self.mesh is not None

  @property
  def batch_spec(self) -> P:
    if not self.batch_axes:
      return P()
    return P(self.batch_axes[0] if len(self.batch_axes) == 1 else self.batch_axes)

  @property
  def batch_shards(self) -> int:
    """How many ways the batch is split (1 without a mesh)."""
    return math.prod(self.mesh.shape[a] for a in self.batch_axes) if self.sharded else 1

  def describe(self) -> str:
    if not self.sharded:
      return "one device"
    return (f"mesh {dict(self.mesh.shape)} over {self.mesh.size} devices of {jax.process_count()} "
            f"process(es); batch split over {self.batch_axes or 'nothing'}; FSDP axis {self.fsdp}")

  # ---------------------------------------------------------------- parameters

  def specs(self, theta0: PyTree) -> PyTree:
    """A ``PartitionSpec`` per leaf of the frozen base (arrays, lazy weights or abstract values)."""
    return sharding.partition_specs(theta0, self.rules, self.mesh, on_indivisible=self.on_indivisible)

  def place_theta0(self, theta0: PyTree) -> tuple[PyTree, PyTree]:
    """``(placed theta0, its specs)``; leaves already placed so stay where they are."""
    if not self.sharded:
      return theta0, None
    specs = self.specs(theta0)
    return sharding.shard(theta0, specs, self.mesh, gather_axes=(self.fsdp,) if self.fsdp else ()), specs

  def place_phi(self, phi: PyTree, theta0: PyTree, theta0_specs: PyTree) -> tuple[PyTree, PyTree]:
    """``(placed phi, its specs)``, each leaf placed from its base weight's spec."""
    if not self.sharded:
      return phi, None
    specs = sharding.phi_specs(phi, theta0, theta0_specs,
                               replicate_axes=(self.fsdp,) if self.fsdp else ())
    return sharding.shard(phi, specs, self.mesh, gather_axes=()), specs

  def place_opt_state(self, opt_state: PyTree, phi: PyTree, phi_specs: PyTree) -> PyTree:
    """The optimizer state placed like its parameters (:func:`lowrank_jax.sharding.like`).

    Codec nodes (8-bit Adam's moments) are kept in their row layout on one device too, as
    ``like`` stores them on a mesh (the same bytes, shaped like the tensor), so a
    checkpoint restores onto any mesh or one device alike. (Its updates equal those of
    bitsandbytes' flat layout to rounding, not bit for bit.)"""
    if not self.sharded:
      return jax.tree.map(lambda x: x.rows() if _is_codec(x) else x, opt_state, is_leaf=_is_codec)
    return sharding.like(opt_state, phi, phi_specs, self.mesh)

  def step(self, make: Callable[..., Callable]) -> Callable:
    """The jitted train step: ``make(jit=...)`` is :func:`lowrank_jax.train.make_train_step`
    with everything but ``jit`` bound."""
    if not self.sharded:
      return make(jit=True)
    return sharding.jit_train_step(make(jit=False))

  # ---------------------------------------------------------------------- data

  def check_batch(self, batch_size: int, what: str = "training.batch_size") -> None:
    if batch_size % self.batch_shards:
      raise ValueError(f"{what} {batch_size} is not divisible by the {self.batch_shards} batch shards "
                       f"of the mesh ({' x '.join(self.batch_axes)} of {dict(self.mesh.shape)})")

  def local_rows(self, batch_size: int) -> slice:
    """The rows of each global batch that this process feeds (all of them without a mesh)."""
    if not self.sharded:
      return slice(0, batch_size)
    return distributed.process_batch_rows(batch_size, self.mesh, self.batch_spec)

  def batch(self, local: Mapping[str, np.ndarray]) -> PyTree:
    """This process's rows -> the global batch, split over the batch axes."""
    if not self.sharded:
      return local
    return distributed.host_local_batch_to_global(dict(local), self.mesh, self.batch_spec)

  def whole_batch(self, batch: Mapping[str, np.ndarray]) -> PyTree:
    """A batch every process holds whole (evaluation): split over the batch axes when it
    divides, else replicated."""
    if not self.sharded:
      return batch
    n = len(next(iter(batch.values())))
    spec = self.batch_spec if n % self.batch_shards == 0 else P()
    return jax.device_put(dict(batch), NamedSharding(self.mesh, spec))

  def to_host(self, tree: PyTree) -> PyTree:
    """Every array of ``tree`` as a numpy array of its global value (a collective when
    arrays span processes: every process calls it)."""
    def get(x):
      if not isinstance(x, jax.Array):
        return x
      if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(get, tree)


def _is_codec(x) -> bool:
  """A codec node with a row layout (``rows``) that placements use (8-bit Adam's moments)."""
  return callable(getattr(x, "rows", None)) and callable(getattr(x, "buffer_specs", None))


# --------------------------------------------------------------- sliced base loading

@dataclasses.dataclass(frozen=True)
class LoadReport:
  """How much of a base's safetensors this process read (its shards only) of the total."""
  bytes_read: int
  bytes_total: int

  def __str__(self) -> str:
    return (f"process {jax.process_index()} of {jax.process_count()} read {self.bytes_read:,} of the "
            f"base's {self.bytes_total:,} bytes (the slices its devices hold)")


def load_sources(sources, dtype, placement: Placement) -> tuple[PyTree, LoadReport]:
  """``(params, LoadReport)``: the leaves ``sources`` describe
  (:class:`~lowrank_jax.models.hf_decoder.LeafSource`: ``path``, ``shape``,
  ``stored_dtype``, ``read(dtype, index)``) as global arrays placed by ``placement``.

  Each leaf is made by ``jax.make_array_from_callback`` with its target sharding, its
  shards read from the safetensors files slice by slice: a process reads only what its own
  devices hold, each distinct slice once (``dtype=None``: the stored dtypes).
  """
  dtypes = {s.path: np.dtype(dtype) if dtype is not None else np.dtype(s.stored_dtype) for s in sources}
  abstract = hf_io.unflatten({s.path: jax.ShapeDtypeStruct(s.shape, dtypes[s.path]) for s in sources})
  leaves, _ = jax.tree_util.tree_flatten_with_path(placement.specs(abstract),
                                                   is_leaf=lambda x: isinstance(x, P))
  specs = {tree_lib.path_str(p): s for p, s in leaves}
  read = [0]
  flat = {}
  for src in sources:
    cache: dict = {}

    def callback(index, src=src, cache=cache):
      key = tuple((s.start, s.stop) for s in index)
      if key not in cache:
        cache[key] = src.read(dtypes[src.path], index)
        read[0] += cache[key].nbytes
      return cache[key]

    sharding_ = NamedSharding(placement.mesh, specs[src.path])
    flat[src.path] = jax.make_array_from_callback(tuple(src.shape), sharding_, callback)
  total = sum(math.prod(s.shape) * dtypes[s.path].itemsize for s in sources)
  return hf_io.unflatten(flat), LoadReport(read[0], total)


def _whole(config, params) -> tuple[Any, PyTree, LoadReport]:
  total = tree_lib.count_bytes(params)
  return config, params, LoadReport(total, total)


def load_decoder(folder: str, dtype, placement: Placement):
  """``(DecoderConfig, params, LoadReport)`` of a Hugging Face decoder folder placed by ``placement``.

  Without a mesh: :func:`lowrank_jax.models.hf_decoder.load_pretrained`. On a mesh, each
  process reads only the slices its own devices hold (:func:`load_sources` over
  :func:`lowrank_jax.models.hf_decoder.checkpoint_plan`), never the whole model.
  """
  if not placement.sharded:
    return _whole(*hf_decoder.load_pretrained(folder, dtype=dtype))
  config, sources = hf_decoder.checkpoint_plan(folder)
  return (config, *load_sources(sources, dtype, placement))


def load_bert(folder: str, dtype, placement: Placement):
  """``(BertConfig, params, LoadReport)`` of a BERT folder placed by ``placement``, as
  :func:`load_decoder` (:func:`lowrank_jax.models.bert.checkpoint_plan`; without a mesh:
  :func:`lowrank_jax.models.bert.load_bert`)."""
  if not placement.sharded:
    return _whole(*bert.load_bert(folder, dtype))
  config, sources = bert.checkpoint_plan(folder)
  return (config, *load_sources(sources, dtype, placement))
