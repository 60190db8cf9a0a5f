"""Device meshes and ``NamedSharding`` placement for ``theta0``, ``phi`` and optimizer state.

Sharding uses only ``jax.jit`` with ``NamedSharding`` inputs (``pjit`` is deprecated):
place the arrays, and the compiled step follows their shardings.

* :func:`make_mesh` builds a mesh from a string, ``"data:2,fsdp:2,tensor:2"``, with
  ``jax.make_mesh`` (device order that follows the physical topology on TPU/GPU),
  falling back to the plain device order where the backend has no topology to use.
* :func:`partition_specs` gives a ``PartitionSpec`` per leaf from ``(regex, spec)``
  rules, first match wins (default: replicated). :func:`decoder_sharding_rules` and
  :func:`bert_sharding_rules` are the layouts of our model families (below); put your own
  ``(regex, spec)`` pairs first to override them.
* :func:`fsdp_specs` shards every leaf along its largest axis divisible by the
  axis size (ZeRO-3 / FSDP style), for ``theta0`` or full fine-tuning.
* :func:`phi_specs` derives adapter placements from the base weight's spec.
* :func:`shard` places a tree (``None`` holes allowed); :func:`like` places an
  optimizer state the way its parameters are placed; :func:`jit_train_step` jits a
  step whose outputs keep those placements (no recompilation on the second call).

Layout rules (``fsdp`` and ``tensor`` are mesh axis names, either may be ``None``):

========================================  ===========================  =================
leaf (Flax layout ``[in, out]``)          spec                         why
========================================  ===========================  =================
``q_proj``/``k_proj``/``v_proj`` kernel   ``P(fsdp, tensor)``          column parallel:
BERT ``query``/``key``/``value``                                       heads split
``o_proj``, BERT ``attention/output``     ``P(tensor, fsdp)``          row parallel
``gate_proj``/``up_proj``, BERT           ``P(fsdp, tensor)``          column parallel
``intermediate``
``down_proj``, BERT ``layer_i/output``    ``P(tensor, fsdp)``          row parallel
MoE ``experts/{gate,up}_proj`` [E,D,F]    ``P(expert, fsdp, tensor)``  experts split
MoE ``experts/down_proj`` [E,F,D]         ``P(expert, tensor, fsdp)``
``router`` [D,E]                          ``P(fsdp)``
``embed_tokens``/``word_embeddings``      ``P(tensor, fsdp)``          vocab parallel
``lm_head`` [D,V]                         ``P(fsdp, tensor)``
column-parallel biases                    ``P(tensor)``
norms, other biases, prefixes, adapters   replicated                   small
========================================  ===========================  =================

Column-parallel outputs feed row-parallel inputs, so each attention and MLP block
needs one all-reduce (Megatron-LM, Shoeybi et al., arXiv 1909.08053); ``fsdp`` splits
the other axis and is all-gathered at use (ZeRO-3, Rajbhandari et al., arXiv 1910.02054).

Everything derived from a base weight is placed from the base's spec:

* adapters (:func:`phi_specs`): a factor sharing the base's input dimension (LoRA
  ``a [in, r]``) takes the input axis's entry, one sharing the output dimension
  (``b [r, out]``) the output axis's entry, a vector of the output size (DoRA's
  magnitude) the output entry, a full-size leaf (``full``) the whole spec; so the
  low-rank matmuls stay local. ``chain`` phis (tuples) are handled element-wise.
* quantized bases (``QuantizedWeight``): the spec is the *weight's*; :func:`shard` stores
  the codec in its row layout and maps the spec onto its buffers (``buffer_specs``:
  4-bit codes ``[..., out/2]`` and block scales ``[..., out/block]`` take the weight's
  spec), and along the FSDP axes (``gather_axes``) the codes are all-gathered inside
  each matmul and decoded there: FSDP moves 4.13 bits a parameter, not decoded floats.
* optimizer states (:func:`like`): a state leaf under a parameter's path takes the
  parameter's spec on every axis whose size it shares (Adam's moments entirely,
  GaLore's projector ``[m, r]`` / moments ``[r, n]`` on the shared axis), codec nodes
  (8-bit Adam's ``Blockwise8``) through their ``buffer_specs``; offloaded state keeps its
  memory kind.

FSDP at use: :func:`gather_at_use` makes the selected dense kernels
(:class:`GatherAtUse`) gather along the FSDP axes inside their matmul and again in the
backward pass, instead of leaving XLA to move activations or to keep every gathered
weight alive; with the embedding replicated (or activations constrained) a step then
all-gathers each weight twice and all-reduces the adapter gradients, nothing else.

A spec that does not divide a leaf raises a ``ValueError`` naming the path, shape,
mesh axis and size; ``on_indivisible="replicate"`` replicates such leaves instead and
says which (a ``UserWarning``).
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.quant.blockwise import mesh_entry_size, spec_of
from lowrank_jax.quant.qlora import buffer_specs

PyTree = Any
Rules = Sequence[tuple[str, P]]
Axis = Optional[str]
OnIndivisible = Literal["error", "replicate"]

__all__ = ["make_mesh", "parse_mesh_spec", "parse_dcn_spec", "partition_specs", "fsdp_specs", "phi_specs", "shard",
           "like", "replicated", "decoder_sharding_rules", "bert_sharding_rules",
           "family_rules", "named_shardings", "shape_structs",
           "leaf_shardings", "jit_train_step", "gather_at_use", "GatherAtUse"]


# ----------------------------------------------------------------------------- meshes

def parse_mesh_spec(spec: str, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """``"name:size,..."`` -> ``(names, sizes)``; one size may be ``-1`` (the rest of the devices)."""
  names, sizes = [], []
  for part in spec.split(","):
    name, _, size = part.strip().partition(":")
    if not name or not size.lstrip("-").isdigit():
      raise ValueError(f"bad mesh spec part {part!r} in {spec!r}; expected 'name:size'")
    if name in names:
      raise ValueError(f"mesh spec {spec!r} names axis {name!r} twice")
    names.append(name)
    sizes.append(int(size))
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh spec {spec!r}: at most one axis may be -1")
  if any(s < 1 and s != -1 for s in sizes):
    raise ValueError(f"mesh spec {spec!r}: sizes must be positive (or one -1)")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh spec {spec!r}: {num_devices} devices not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  n = int(np.prod(sizes))
  if n > num_devices:
    raise ValueError(f"mesh spec {spec!r} needs {n} devices, {num_devices} available")
  return tuple(names), tuple(sizes)


def make_mesh(spec: str, devices: Optional[Sequence[jax.Device]] = None, *,
              dcn: Optional[str] = None) -> Mesh:
  """A mesh from ``"name:size,name:size"``; one size may be ``-1`` (the rest of the devices).

  The devices are ordered by ``jax.make_mesh`` (the physical topology on TPU and GPU:
  the last axes over the fastest links); where it cannot lay out the shape (CPU, a
  shape the topology does not fit) they are taken in ``devices`` order. Axes are
  ``AxisType.Auto`` (GSPMD propagation), as ``jax.sharding.Mesh`` makes them.

  Multislice / hybrid meshes (``dcn``): ``spec`` is the whole mesh and ``dcn`` says how
  many ways each axis spans the slow network between slices (TPU multislice, or hosts over
  a data-center network): e.g. ``spec="data:4,fsdp:4,tensor:2", dcn="data:2"`` puts
  ``data`` 2 ways within each slice and 2 ways across the 2 slices, every other axis
  within a slice. Built by ``jax.experimental.mesh_utils.create_hybrid_device_mesh``;
  where the devices are not in several slices (no or one ``slice_index``: GPU clusters,
  CPU) each process is a slice (``process_is_granule=True``).

  Args:
    spec: e.g. ``"data:2,model:4"``, ``"data:2,fsdp:2,tensor:2"`` or ``"fsdp:-1"``.
    devices: defaults to ``jax.devices()`` (every process's devices); a mesh smaller
      than the list takes its first devices (without ``dcn``).
    dcn: ``"name:size,..."`` over axes of ``spec`` (the others: 1); ``None``: one slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = parse_mesh_spec(spec, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  if dcn is not None:
    return Mesh(_hybrid_devices(spec, names, sizes, dcn, devices), names, axis_types=auto)
  chosen = devices[:int(np.prod(sizes))]
  try:
    return jax.make_mesh(sizes, names, axis_types=auto, devices=chosen)
  except (ValueError, NotImplementedError, AssertionError) as e:
    if chosen[0].platform != "cpu":
      warnings.warn(f"make_mesh({spec!r}): jax.make_mesh could not follow the device topology "
                    f"({e}); using the device order as given", RuntimeWarning, stacklevel=2)
    return Mesh(np.asarray(chosen).reshape(sizes), names, axis_types=auto)


def parse_dcn_spec(dcn: str, names: Sequence[str], sizes: Sequence[int], spec: str = "") -> tuple[int, ...]:
  """The DCN size of every axis of a mesh (``names``/``sizes``) from ``"name:size,..."``
  (axes not named: 1); each must divide its axis's size."""
  dn, ds = parse_mesh_spec(dcn, int(np.prod(sizes)))
  out = dict.fromkeys(names, 1)
  for n, d in zip(dn, ds):
    if n not in out:
      raise ValueError(f"dcn {dcn!r} names axis {n!r}, which the mesh {spec!r} does not have "
                       f"(axes {', '.join(names)})")
    if sizes[list(names).index(n)] % d:
      raise ValueError(f"dcn {dcn!r}: axis {n!r} of size {sizes[list(names).index(n)]} in the mesh "
                       f"{spec!r} is not divisible by {d}")
    out[n] = d
  return tuple(out[n] for n in names)


def _hybrid_devices(spec: str, names, sizes, dcn: str, devices) -> np.ndarray:
  dcn_shape = parse_dcn_spec(dcn, names, sizes, spec)
  ici_shape = tuple(s // d for s, d in zip(sizes, dcn_shape))
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {spec!r} with dcn {dcn!r} must use every one of the {len(devices)} devices "
                     f"(it has {int(np.prod(sizes))})")
  by_process = len({getattr(d, "slice_index", None) for d in devices}) == 1  # no slices to go by
  try:
    return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                process_is_granule=by_process,
                                                allow_split_physical_axes=True)
  except ValueError as e:
    unit = "processes" if by_process else "slices"
    raise ValueError(f"mesh {spec!r} with dcn {dcn!r}: {int(np.prod(dcn_shape))} {unit} of "
                     f"{int(np.prod(ici_shape))} devices each expected ({e})") from e


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ------------------------------------------------------------------------ spec checks

_norm = spec_of  # P(*entries), or P() when every entry is None (P(None, None) != P())


def _problem(shape: tuple, spec: P, sizes: Mapping[str, int]) -> Optional[str]:
  """Why ``spec`` cannot shard ``shape`` on a mesh of ``sizes``, or ``None``."""
  if len(spec) > len(shape):
    return f"spec {spec} has more entries than the {len(shape)} axes"
  for ax, entry in enumerate(spec):
    names = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    unknown = [n for n in names if n not in sizes]
    if unknown:
      return f"mesh has no axis {unknown[0]!r} (axes {dict(sizes)})"
    size = mesh_entry_size(sizes, entry)
    if shape[ax] % size:
      return (f"axis {ax} ({shape[ax]}) is not divisible by mesh axis {entry!r} of size {size} "
              f"(mesh {dict(sizes)})")
  return None


def _check(path: str, shape: tuple, spec: P, mesh: Mesh) -> None:
  why = _problem(tuple(shape), spec, dict(mesh.shape))
  if why is not None:
    raise ValueError(f"leaf '{path}' of shape {tuple(shape)}: {why}")


def _is_spec(x) -> bool:
  return isinstance(x, P)


def _is_leaf(x) -> bool:
  return x is None or lazy.is_lazy(x)


def _items(tree: PyTree) -> list[tuple[str, Any]]:
  """``[(path, leaf)]`` with ``None`` holes and lazy weights as leaves."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  return [(tree_lib.path_str(p), x) for p, x in leaves]


def _shardable(x: Any) -> Any:
  """``x`` in the layout its placement uses: a quantized weight's codec in its row layout
  (``for_sharding``), a codec node (8-bit Adam moments) likewise (``rows``); others as is."""
  if hasattr(x, "for_sharding"):
    return x.for_sharding()
  if hasattr(x, "rows") and hasattr(x, "buffer_specs"):
    return x.rows()
  return x


def _prepared(tree: PyTree) -> PyTree:
  return jax.tree.map(_shardable, tree, is_leaf=_is_leaf)


def leaf_shardings(x: Any, spec: Any, mesh: Mesh, path: str = "", *,
                   memory_kind: Optional[str] = None) -> Any:
  """The ``NamedSharding`` (tree) that places leaf ``x`` by the *logical* spec ``spec``.

  An array gets ``NamedSharding(mesh, spec)``. A lazy weight (a quantized base) is
  placed by its ``buffer_specs(spec, axis_sizes)`` in its row layout (the codec maps the
  weight's spec onto its buffers; :func:`shard` converts the leaf); a lazy weight
  without it gets ``spec`` on its buffers shaped like the weight and replication
  elsewhere. ``spec`` may also be a ready tree of specs.

  Raises:
    ValueError: naming ``path``, the shape and the mesh axis when ``spec`` does not divide.
  """
  def named(s):
    return NamedSharding(mesh, s, memory_kind=memory_kind)

  if not _is_spec(spec):  # already a tree of specs matching x
    return jax.tree.map(named, spec, is_leaf=_is_spec)
  shape = tuple(x.shape)
  _check(path, shape, spec, mesh)
  if not lazy.is_lazy(x):
    return named(spec)
  x = _shardable(x)
  try:
    specs = buffer_specs(x, spec, dict(mesh.shape))
  except ValueError as e:
    raise ValueError(f"leaf '{path}' of shape {shape} ({type(x).__name__}): {e}") from None
  return jax.tree.map(named, specs, is_leaf=_is_spec)


# ------------------------------------------------------------------------------ rules

def _warn_replicated(reasons: list[str]) -> None:
  if reasons:
    more = f" (and {len(reasons) - 10} more)" if len(reasons) > 10 else ""
    warnings.warn("sharding: replicated instead of sharded: " + "; ".join(reasons[:10]) + more,
                  UserWarning, stacklevel=3)


def partition_specs(tree: PyTree, rules: Rules, mesh: Mesh, *,
                    on_indivisible: OnIndivisible = "error") -> PyTree:
  """``PartitionSpec`` per leaf: the first ``(regex, spec)`` whose regex matches the path.

  Lazy leaves (quantized bases) get the spec of the weight they stand for; :func:`shard`
  maps it onto their buffers.

  Args:
    tree: the parameters (arrays, lazy weights, ``jax.ShapeDtypeStruct``).
    rules: ``(regex, PartitionSpec)`` pairs, searched in order (``re.search``).
    mesh: the mesh the specs refer to.
    on_indivisible: ``"error"``: a spec that does not divide its leaf raises a
      ``ValueError`` naming the path, shape, mesh axis and size; ``"replicate"``: the
      leaf is replicated and a warning lists the reasons.
  """
  compiled = [(re.compile(r), s) for r, s in rules]
  out, reasons = [], []
  for path, x in _items(tree):
    if x is None:
      out.append(None)
      continue
    spec = next((s for r, s in compiled if r.search(path)), P())
    try:
      leaf_shardings(x, spec, mesh, path)
    except ValueError as e:
      if on_indivisible != "replicate":
        raise
      reasons.append(str(e))
      spec = P()
    out.append(spec)
  _warn_replicated(reasons)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree, is_leaf=_is_leaf), out)


def decoder_sharding_rules(*, fsdp: Axis = "fsdp", tensor: Axis = "tensor", expert: Axis = None) -> list:
  """The decoder layout (``models/decoder.py`` paths) as ``(regex, spec)`` rules; see the
  module docstring. Pass ``None`` for an axis the mesh does not have."""
  col, row = _norm(fsdp, tensor), _norm(tensor, fsdp)
  return [
    (r"experts/(gate_proj|up_proj)/kernel$", _norm(expert, fsdp, tensor)),
    (r"experts/down_proj/kernel$", _norm(expert, tensor, fsdp)),
    (r"router/kernel$", _norm(fsdp)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", col),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", _norm(tensor)),
    (r"(o_proj|down_proj)/kernel$", row),
    (r"(embed_tokens|embedding)/embedding$", _norm(tensor, fsdp)),
    (r"lm_head/kernel$", col),
  ]


DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "mixtral",
                    "qwen3_moe")


def family_rules(family: str, *, fsdp: Axis = "fsdp", tensor: Axis = "tensor",
                 expert: Axis = None) -> list:
  """The sharding rules of a model family: ``"bert"`` or a decoder family name
  (``DecoderConfig.family``)."""
  if family == "bert":
    if expert is not None:
      raise ValueError("bert has no experts; leave expert=None")
    return bert_sharding_rules(fsdp=fsdp, tensor=tensor)
  if family in DECODER_FAMILIES:
    return decoder_sharding_rules(fsdp=fsdp, tensor=tensor, expert=expert)
  raise ValueError(f"no sharding rules for model family {family!r}; known: bert, "
                   f"{', '.join(DECODER_FAMILIES)}")


def bert_sharding_rules(*, fsdp: Axis = "fsdp", tensor: Axis = "tensor") -> list:
  """The BERT layout (``models/bert.py`` paths) as ``(regex, spec)`` rules."""
  col, row = _norm(fsdp, tensor), _norm(tensor, fsdp)
  return [
    (r"attention/(query|key|value)/kernel$", col),
    (r"attention/(query|key|value)/bias$", _norm(tensor)),
    (r"attention/output/kernel$", row),
    (r"intermediate/kernel$", col),
    (r"intermediate/bias$", _norm(tensor)),
    (r"layer_\d+/output/kernel$", row),
    (r"word_embeddings/embedding$", _norm(tensor, fsdp)),
  ]


def fsdp_specs(tree: PyTree, mesh: Mesh, axis: str = "fsdp", min_size: int = 2**14) -> PyTree:
  """Shards each leaf with at least ``min_size`` entries along its largest axis that the
  mesh axis divides (for a quantized leaf: that its codec's buffers divide too);
  smaller leaves and leaves no axis fits are replicated."""
  n = mesh.shape[axis]

  def spec(x):
    shape = tuple(x.shape)
    if int(np.prod(shape)) < min_size:
      return P()
    for ax in sorted(range(len(shape)), key=lambda a: -shape[a]):
      s = P(*([None] * ax + [axis]))
      if shape[ax] % n == 0:
        try:
          leaf_shardings(x, s, mesh)
        except ValueError:
          continue
        return s
    return P()

  return jax.tree.map(spec, tree, is_leaf=lazy.is_lazy)


# ---------------------------------------------------------------- derived placements

def _components(path: str) -> tuple[str, ...]:
  return tuple(c for c in path.split("/") if c)


class _ParamIndex:
  """Finds the parameter whose path lies inside a derived leaf's path (adapter factor,
  optimizer state): the longest window of path components, the rightmost on ties."""

  def __init__(self, params: PyTree, specs: PyTree):
    treedef = jax.tree_util.tree_structure(params, is_leaf=_is_leaf)
    flat_specs = treedef.flatten_up_to(specs)
    self.by_path: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
    for (path, x), s in zip(_items(params), flat_specs):
      if x is not None and s is not None:
        self.by_path[_components(path)] = (tuple(x.shape), s)
    self.lengths = sorted({len(k) for k in self.by_path}, reverse=True)

  def find(self, path: str):
    comps = _components(path)
    for length in self.lengths:
      for start in range(len(comps) - length, -1, -1):
        hit = self.by_path.get(comps[start:start + length])
        if hit is not None:
          return hit
    return None


def _entries(spec: P, ndim: int) -> list:
  return list(spec) + [None] * (ndim - len(spec))


def _shared_axes_spec(shape: tuple, base_shape: tuple, spec: P) -> P:
  """The base's spec on every axis where ``shape`` and ``base_shape`` agree (same rank)."""
  e = _entries(spec, len(base_shape))
  return _norm(*(e[i] if shape[i] == base_shape[i] else None for i in range(len(shape))))


def _adapter_spec(shape: tuple, base_shape: tuple, spec: P) -> P:
  """Placement of an adapter array of ``shape`` for a base of ``base_shape`` placed by ``spec``.

  The base is seen as the matrix ``[prod(S[:k]), prod(S[k:])]``: a merged axis takes the
  entry of its leading base axis when the others in it are unsharded.
  """
  S, e = tuple(base_shape), _entries(spec, len(base_shape))
  if shape == S:
    return _norm(*e)
  if len(S) >= 2 and len(shape) == 2:
    for k in range(1, len(S)):  # a [d_in, r]
      if shape[0] == int(np.prod(S[:k])) and all(x is None for x in e[1:k]):
        return _norm(e[0], None)
    for k in range(len(S) - 1, 0, -1):  # b [r, d_out]
      if shape[1] == int(np.prod(S[k:])) and all(x is None for x in e[k + 1:]):
        return _norm(None, e[k])
  if len(S) >= 2 and len(shape) == 1:  # per-output vectors (DoRA magnitude), then per-input
    if shape[0] == S[-1]:
      return _norm(e[-1])
    if shape[0] == S[0]:
      return _norm(e[0])
  if len(shape) == len(S):
    return _shared_axes_spec(shape, S, spec)
  return P()


def phi_specs(phi: PyTree, theta0: PyTree, theta0_specs: PyTree, *,
              replicate_axes: Sequence[str] = ("fsdp",)) -> PyTree:
  """Adapter placements derived from the base weights' specs.

  Each ``phi`` leaf is matched to the base weight whose path lies inside its own
  (``l1/kernel`` for ``l1/kernel/a``; any ``chain`` position, ``(phi_lora, phi_full)``
  included) and placed by the rules in the module docstring: for a base ``P(in_axis,
  out_axis)``, LoRA's ``a [in, r]`` gets ``P(in_axis)``, ``b [r, out]`` gets
  ``P(None, out_axis)``, a full-size leaf the base's spec. Leaves matching no base
  (prefixes, bottleneck adapters) and specs that would not divide are replicated.

  Args:
    phi: the trainable parameters (``None`` holes allowed).
    theta0: the frozen base (arrays, lazy weights or abstract values).
    theta0_specs: its specs.
    replicate_axes: storage-only (FSDP) mesh axes that leaves *smaller* than their base
      (LoRA factors, vectors) are not split along: they are tiny, and a factor split
      along the axis that also splits the batch makes the partitioner move activations.
      A full-size leaf keeps them (full fine-tuning stays ZeRO-3).

  Returns:
    A tree with ``phi``'s structure: a ``PartitionSpec`` per array, ``None`` per hole.
  """
  index = _ParamIndex(theta0, theta0_specs)
  items = _items(phi)
  out = []
  for path, a in items:
    if a is None:
      out.append(None)
      continue
    hit = index.find(path)
    spec = P() if hit is None else _adapter_spec(tuple(a.shape), hit[0], hit[1])
    if hit is not None and tuple(a.shape) != tuple(hit[0]):
      spec = _without(spec, replicate_axes)
    out.append(spec)
  treedef = jax.tree_util.tree_structure(phi, is_leaf=_is_leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


# ------------------------------------------------------------------------- placement

def named_shardings(tree: PyTree, specs: PyTree, mesh: Mesh) -> PyTree:
  """``NamedSharding`` (trees for lazy leaves, in their row layout) per leaf of ``tree``;
  ``None`` holes kept."""
  treedef = jax.tree_util.tree_structure(tree, is_leaf=_is_leaf)
  out = [None if x is None else leaf_shardings(x, s, mesh, path)
         for (path, x), s in zip(_items(tree), treedef.flatten_up_to(specs))]
  return jax.tree_util.tree_unflatten(treedef, out)


def shard(tree: PyTree, specs: PyTree, mesh: Mesh, *,
          gather_axes: Sequence[str] = ("fsdp",)) -> PyTree:
  """``jax.device_put`` every array leaf with ``NamedSharding(mesh, spec)``.

  A quantized leaf (``QuantizedWeight``) is placed buffer by buffer from its weight's
  spec, its codec in the row layout, and gathered along ``gather_axes`` (the FSDP
  axes) inside its matmul: the 4-bit codes are all-gathered, then decoded locally
  (``compute_sharding``), never the decoded weight. Dense leaves are left to the
  partitioner (see :func:`gather_at_use` for the same on them).

  With several processes every leaf must be the global value (the same on every
  process); a process's share of a batch goes through
  :func:`lowrank_jax.distributed.host_local_batch_to_global`.
  """
  tree = _prepared(tree)
  treedef = jax.tree_util.tree_structure(tree, is_leaf=_is_leaf)
  shardings = treedef.flatten_up_to(named_shardings(tree, specs, mesh))
  placed = jax.tree_util.tree_unflatten(treedef, [
      None if x is None else _put(path, x, sh) for (path, x), sh in zip(_items(tree), shardings)])
  return gather_at_use(placed, specs, mesh, where=lambda p, x: hasattr(x, "with_compute_sharding"),
                       axes=gather_axes)


def _put(path: str, x, sharding):
  try:
    return jax.device_put(x, sharding)
  except (AssertionError, ValueError) as e:
    if jax.process_count() == 1:
      raise
    why = str(e).split(". Expected")[0].split("\n")[0][:200]
    raise ValueError(f"leaf '{path}' of shape {tuple(x.shape)}: cannot place it on a mesh spanning "
                     f"{jax.process_count()} processes ({why}). shard() takes the *global* value, the "
                     f"same on every process; per-process rows (a data loader's share of the batch) "
                     f"go through lowrank_jax.distributed.host_local_batch_to_global") from e


def shape_structs(tree: PyTree, specs: PyTree, mesh: Mesh) -> PyTree:
  """``jax.ShapeDtypeStruct`` with its target sharding per array of ``tree`` (arrays or
  abstract values): a template for :func:`lowrank_jax.checkpoint.restore` onto ``mesh``."""
  tree = _prepared(tree)
  shardings = named_shardings(tree, specs, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _memory_kind(x) -> Optional[str]:
  kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
  return None if kind in (None, "device") else kind


def _is_codec(x) -> bool:
  return callable(getattr(x, "buffer_specs", None)) and not isinstance(x, P)


def like(state: PyTree, params: PyTree, param_specs: PyTree, mesh: Mesh) -> PyTree:
  """Places an optimizer state the way its parameters are placed.

  A state leaf whose path contains a parameter's path (optax moments ``0/mu/<path>``,
  GaLore's ``projector/<path>``, leafwise/offload pages ``pages/states/<path>/...``) gets
  the parameter's spec on the axes it shares with the parameter (all of them for
  Adam's moments; the ``m`` axis of a GaLore projector ``[m, r]``); a codec node (8-bit
  Adam's ``Blockwise8`` moments) is placed by its ``buffer_specs``. Counts, scalars
  and leaves matching no parameter are replicated. A leaf in host memory (offloaded
  state) stays in its memory kind.
  """
  index = _ParamIndex(params, param_specs)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_codec)

  def place(path: str, x):
    kind = _memory_kind(jax.tree.leaves(x)[0]) if jax.tree.leaves(x) else None
    hit = index.find(path)
    if _is_codec(x):
      x = _shardable(x)
      spec = P() if hit is None else _codec_spec(x, hit, mesh)
      return jax.device_put(x, leaf_shardings(x, spec, mesh, path, memory_kind=kind))
    shape = tuple(np.shape(x))
    spec = P()
    if hit is not None and len(shape) == len(hit[0]) and shape:
      spec = _shared_axes_spec(shape, hit[0], hit[1])
      if _problem(shape, spec, dict(mesh.shape)) is not None:
        spec = P()
    return jax.device_put(x, NamedSharding(mesh, spec, memory_kind=kind))

  placed = [place(tree_lib.path_str(p), x) for p, x in leaves]
  return jax.tree_util.tree_unflatten(treedef, placed)


# ------------------------------------------------------------------- gather at use

@lazy.pytree_dataclass(static=("compute_sharding",))
class GatherAtUse(lazy.LazyWeight):
  """A dense weight stored sharded (FSDP) and gathered to ``compute_sharding`` only where
  it is used: in its matmul (:func:`lowrank_jax.dot`; recomputed in the backward pass,
  so the gathered copy lives for one matmul, not for the whole step) and in
  ``materialize``. It is gathered in its stored dtype, then cast to the input's.

  Attributes:
    w: the stored (sharded) weight.
    compute_sharding: the ``NamedSharding`` of the weight inside the matmul.
  """
  w: jax.Array
  compute_sharding: Any

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return self.w.dtype

  def materialize(self) -> jax.Array:
    return jax.lax.with_sharding_constraint(self.w, self.compute_sharding)

  def matrix_matmul(self, x: jax.Array) -> jax.Array:
    return _gathered_matmul(x, self.w, self.compute_sharding)


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _gathered_matmul(x: jax.Array, w: jax.Array, compute_sharding) -> jax.Array:
  w = jax.lax.with_sharding_constraint(w, compute_sharding)
  return jnp.matmul(x, w.astype(x.dtype))


def _without(spec: P, axes: Sequence[str]) -> P:
  """``spec`` with the mesh axes ``axes`` removed (what a leaf looks like when gathered)."""
  def drop(entry):
    if entry is None:
      return None
    names = tuple(n for n in ((entry,) if isinstance(entry, str) else entry) if n not in axes)
    return None if not names else names[0] if len(names) == 1 else names
  return _norm(*(drop(e) for e in spec))


def gather_at_use(tree: PyTree, specs: PyTree, mesh: Mesh, *,
                  where: Union[str, Sequence[str], Callable[[str, Any], bool]] = r"kernel$",
                  axes: Sequence[str] = ("fsdp",)) -> PyTree:
  """FSDP for the frozen base: the selected leaves, placed by ``specs``, are gathered along
  ``axes`` inside each matmul instead of wherever the partitioner decides.

  Without it XLA may keep an FSDP-sharded weight sharded in the matmul and move
  activations instead, or (for a quantized base) gather the *decoded* weight. A dense
  selected matrix becomes a :class:`GatherAtUse`; a quantized one (``QuantizedWeight``)
  gets its compute sharding, so its 4-bit codes are gathered and decoded locally
  (:func:`shard` already does this for quantized leaves).

  Args:
    tree: the placed frozen parameters (:func:`shard` output).
    specs: the specs they were placed with.
    mesh: their mesh.
    where: the leaves to treat: regex(es) on the path or ``(path, leaf) -> bool`` (default:
      every ``kernel``, the weights our models multiply through :func:`lowrank_jax.dot`;
      embeddings are indexed, not multiplied: leave them out).
    axes: the storage-only mesh axes (gathered at use).
  """
  if callable(where):
    selected = where
  else:
    patterns = [re.compile(w) for w in ([where] if isinstance(where, str) else where)]
    selected = lambda path, x: any(r.search(path) for r in patterns)
  treedef = jax.tree_util.tree_structure(tree, is_leaf=_is_leaf)

  def wrap(path, x, spec):
    if x is None or not _is_spec(spec) or not selected(path, x):
      return x
    compute = _without(spec, axes)
    if compute == _norm(*spec):
      return x
    sharding = NamedSharding(mesh, compute)
    if hasattr(x, "with_compute_sharding"):
      return x.with_compute_sharding(sharding)
    if lazy.is_lazy(x) or getattr(x, "ndim", 0) != 2:
      return x
    return GatherAtUse(x, sharding)

  leaves = [wrap(p, x, s) for (p, x), s in zip(_items(tree), treedef.flatten_up_to(specs))]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _shardings_of(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: getattr(x, "sharding", None), tree)


def jit_train_step(step: Callable, *, donate: bool = True) -> Callable:
  """``jax.jit`` of ``step(phi, opt_state, *rest) -> (phi, opt_state, metrics)`` whose
  ``phi`` and ``opt_state`` outputs keep the placements of the inputs.

  Plain ``jax.jit`` lets the partitioner choose output shardings (a replicated bias's
  Adam moments may come back split over ``fsdp``, offloaded state back in device
  memory), so the next call sees new input shardings and compiles again. Here the
  outputs are pinned to the inputs' shardings (memory kinds included): one compile per
  placement, reused every step. Use with ``train.make_train_step(..., jit=False)``.

  Args:
    step: the unjitted step.
    donate: donate the ``phi`` and ``opt_state`` buffers.

  Returns:
    The jitted step; ``._cache_size()`` counts its compilations, ``.lower(*args)`` lowers it.
  """
  compiled: dict = {}

  def jitted(phi, opt_state):
    phi_sh, state_sh = _shardings_of(phi), _shardings_of(opt_state)
    leaves, treedef = jax.tree_util.tree_flatten((phi_sh, state_sh), is_leaf=lambda s: s is None)
    key = (treedef, tuple(leaves))
    fn = compiled.get(key)
    if fn is None:
      fn = compiled[key] = jax.jit(step, out_shardings=(phi_sh, state_sh, None),
                                   donate_argnums=(0, 1) if donate else ())
    return fn

  def call(phi, opt_state, *rest):
    return jitted(phi, opt_state)(phi, opt_state, *rest)

  call.lower = lambda phi, opt_state, *rest: jitted(phi, opt_state).lower(phi, opt_state, *rest)
  call._cache_size = lambda: sum(f._cache_size() for f in compiled.values())
  return call


def _codec_spec(x, hit, mesh: Mesh):
  """The buffer specs of a codec node holding a parameter-shaped tensor (its ``shape``
  equals the parameter's), or replication."""
  base_shape, spec = hit
  if tuple(getattr(x, "shape", ())) != tuple(base_shape):
    return P()
  try:
    return x.buffer_specs(spec, dict(mesh.shape))
  except ValueError:
    return P()
