"""The ``.safetensors`` format read and written tensor by tensor, with numpy only.

A file is an 8-byte little-endian header length ``N``, an ``N``-byte JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(offsets relative to the end of the header) and the raw little-endian tensor bytes.

Why not ``safetensors.numpy``: it cannot read ``BF16`` tensors (numpy has no
bfloat16), and it memory-maps whole files (``OSError: No such device`` on file
systems without ``mmap``). Here every read is one ``seek`` + ``readinto`` of one
tensor (or of the rows a slice needs) into a buffer of its stored dtype
(``ml_dtypes`` supplies bfloat16 and float8), converted straight to the target dtype,
so a model is never held twice; headers are cached per (path, size, mtime).

Hugging Face folders hold one ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map":
{name: file}}``); :func:`checkpoint_files` resolves either, :func:`write_sharded`
writes either.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import struct
import tempfile
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np

from lowrank_jax import validate

__all__ = [
  "DTYPES",
  "TensorInfo",
  "SafetensorsError",
  "read_header",
  "tensor_infos",
  "read_tensor",
  "normalize_index",
  "load_file",
  "TensorSource",
  "write_file",
  "save_file",
  "checkpoint_files",
  "write_sharded",
  "parse_size",
  "SINGLE_FILE",
  "INDEX_FILE",
  "replace_folder",
  "write_json",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100_000_000

DTYPES: dict[str, np.dtype] = {
  "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
  "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
  """A malformed file, a missing tensor or a request that does not fit a tensor."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One header entry: ``dtype`` (numpy), ``shape`` and absolute byte range in the file."""
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int
  end: int


def _np_dtype(dtype) -> np.dtype:
  """numpy dtype of a numpy/JAX dtype or name (``jnp.bfloat16`` -> ml_dtypes' bfloat16)."""
  return np.dtype(dtype)


@functools.lru_cache(maxsize=64)
def _header_cached(path: str, size: int, mtime: int) -> tuple[dict, dict]:
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise SafetensorsError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER or 8 + n > size:
      raise SafetensorsError(f"{path}: header length {n} does not fit the file size {size}")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
  metadata = header.pop("__metadata__", None) or {}
  infos = {}
  for name, entry in header.items():
    try:
      dtype = DTYPES[entry["dtype"]]
    except KeyError:
      raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}; "
                             f"supported: {sorted(DTYPES)}") from None
    shape = tuple(int(d) for d in entry["shape"])
    b, e = (int(o) for o in entry["data_offsets"])
    if e - b != math.prod(shape) * dtype.itemsize or 8 + n + e > size:
      raise SafetensorsError(f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}) has byte range "
                             f"[{b}, {e}) that does not fit its shape or the file")
    infos[name] = TensorInfo(name, dtype, shape, 8 + n + b, 8 + n + e)
  return infos, metadata


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """``({name: TensorInfo}, metadata)`` of a file (cached while the file is unchanged)."""
  path = os.path.abspath(os.fspath(path))
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"safetensors file not found: {path}") from None
  return _header_cached(path, st.st_size, st.st_mtime_ns)


def tensor_infos(path: str | os.PathLike) -> dict[str, TensorInfo]:
  """``{name: TensorInfo}`` of a file."""
  return read_header(path)[0]


def normalize_index(index, shape: tuple[int, ...], where: str) -> tuple[slice, ...]:
  """``index`` (``None``, a slice or a tuple of contiguous slices) as one ``slice(start,
  stop)`` per axis of ``shape``; ``where`` names the tensor in errors."""
  if index is None:
    return tuple(slice(0, d) for d in shape)
  if not isinstance(index, tuple):
    index = (index,)
  if len(index) > len(shape):
    raise SafetensorsError(f"{where}: index {index} has more axes than the shape {list(shape)}")
  out = []
  for s, d in zip(index + (slice(None),) * (len(shape) - len(index)), shape):
    if not isinstance(s, slice):
      raise SafetensorsError(f"{where}: only slices are supported in an index, got {s!r}")
    start, stop, step = s.indices(d)
    if step != 1:
      raise SafetensorsError(f"{where}: slice {s} has a step; only contiguous slices are supported")
    out.append(slice(start, max(start, stop)))
  return tuple(out)


def read_tensor(path: str | os.PathLike, name: str, dtype=None,
                index: Optional[Sequence[slice]] = None, *, check_finite: bool = True) -> np.ndarray:
  """One tensor (or a slice of it) read from ``path`` and converted to ``dtype``.

  This is the single function every tensor read of a checkpoint goes through.

  Args:
    path: the ``.safetensors`` file.
    name: the tensor's name in the file.
    dtype: target dtype (numpy or JAX dtype, e.g. ``jnp.bfloat16``); ``None`` keeps
      the stored one. Converting between float dtypes rounds to nearest.
    index: optional tuple of contiguous slices, one per leading axis; only the rows
      the first axis selects are read from disk.
    check_finite: raise :class:`lowrank_jax.validate.NonFiniteError` (naming the file and
      the tensor) when a floating tensor holds NaN or infinity, e.g. overwritten bytes.

  Returns:
    A numpy array of ``dtype`` (never a view of a shared buffer).
  """
  path = os.fspath(path)
  infos, _ = read_header(path)
  info = infos.get(name)
  if info is None:
    raise KeyError(f"tensor {name!r} not found in {path} ({len(infos)} tensors; "
                   f"e.g. {sorted(infos)[:4]})")
  idx = normalize_index(index, info.shape, f"{path}: {name}")
  rows = idx[0] if info.shape else slice(0, 1)
  row_bytes = (math.prod(info.shape[1:]) if info.shape else 1) * info.dtype.itemsize
  begin = info.begin + rows.start * row_bytes
  n_rows = rows.stop - rows.start
  buf = np.empty((n_rows,) + tuple(info.shape[1:]) if info.shape else (), info.dtype)
  with open(path, "rb") as f:
    f.seek(begin)
    view = memoryview(buf.reshape(-1).view(np.uint8)) if buf.size else memoryview(b"")
    got = f.readinto(view) if buf.size else 0
  if got != n_rows * row_bytes:
    raise SafetensorsError(f"{path}: tensor {name!r} is truncated (read {got} of {n_rows * row_bytes} bytes)")
  if info.dtype.byteorder == ">" or (info.dtype.byteorder == "=" and not np.little_endian):
    buf = buf.byteswap()
  if check_finite:
    validate.check_finite({name: buf}, what=path)
  if info.shape and len(idx) > 1:
    buf = buf[(slice(None),) + idx[1:]]
  target = info.dtype if dtype is None else _np_dtype(dtype)
  out = buf.astype(target, copy=False)
  return out if out.flags.c_contiguous else out.copy()  # (ascontiguousarray makes 0-d arrays 1-d)


def load_file(path: str | os.PathLike, dtype=None, *, check_finite: bool = True) -> dict[str, np.ndarray]:
  """Every tensor of a file, ``{name: array}`` (for small files; models use :func:`read_tensor`)."""
  path = os.fspath(path)
  return {name: read_tensor(path, name, dtype, check_finite=check_finite) for name in tensor_infos(path)}


# --------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class TensorSource:
  """A tensor to write: its name, shape and stored dtype, and a callable producing it
  (called once, when its bytes are written, so only one tensor is in memory at a time)."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], Any]

  @classmethod
  def of(cls, name: str, value, dtype=None) -> "TensorSource":
    """A source over an array-like (numpy, JAX) converted to ``dtype`` when written."""
    dt = _np_dtype(value.dtype if dtype is None else dtype)
    return cls(name, tuple(int(d) for d in value.shape), dt, lambda: value)

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def _header_bytes(sources: Sequence[TensorSource], metadata: Optional[Mapping[str, str]]) -> bytes:
  header: dict[str, Any] = {}
  if metadata:
    bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
      raise TypeError(f"safetensors metadata must map str to str, got {bad}")
    header["__metadata__"] = dict(metadata)
  offset = 0
  for s in sources:
    if s.dtype not in _NAMES:
      raise SafetensorsError(f"tensor {s.name!r}: dtype {s.dtype} cannot be stored in safetensors")
    if s.name in header:
      raise SafetensorsError(f"duplicate tensor name {s.name!r}")
    header[s.name] = {"dtype": _NAMES[s.dtype], "shape": list(s.shape),
                      "data_offsets": [offset, offset + s.nbytes]}
    offset += s.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
  return struct.pack("<Q", len(raw)) + raw


def _write_to(f, sources: Sequence[TensorSource], metadata) -> None:
  """The header, then each source produced, written and released before the next one is
  produced (one tensor in memory at a time)."""
  f.write(_header_bytes(sources, metadata))
  for s in sources:
    arr = np.asarray(s.produce())
    if tuple(arr.shape) != s.shape:
      raise SafetensorsError(f"tensor {s.name!r}: produced shape {tuple(arr.shape)}, declared {s.shape}")
    arr = np.ascontiguousarray(arr.astype(s.dtype, copy=False))
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
      arr = arr.byteswap()
    f.write(memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
    del arr


def _atomic_file(path: str, write: Callable[[Any], None]) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".safetensors", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_file(path: str | os.PathLike, sources: Iterable[TensorSource],
               metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes ``sources`` in order to ``path``, atomically (temp file, then rename)."""
  sources = list(sources)
  _atomic_file(os.fspath(path), lambda f: _write_to(f, sources, metadata))


def save_file(tensors: Mapping[str, Any], path: str | os.PathLike,
              metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes ``{name: array}`` (numpy or JAX, any supported dtype) to ``path`` atomically."""
  write_file(path, [TensorSource.of(k, v) for k, v in tensors.items()], metadata)


def checkpoint_files(folder: str | os.PathLike) -> dict[str, str]:
  """``{tensor name: file path}`` of a Hugging Face folder (single file or sharded).

  Raises ``FileNotFoundError`` naming the folder when it holds neither
  ``model.safetensors`` nor ``model.safetensors.index.json`` (and says so when only
  pickled ``pytorch_model*.bin`` weights are there), and ``SafetensorsError`` when the
  index names a missing shard or a tensor its shard does not hold.
  """
  folder = os.fspath(folder)
  index_path, single = os.path.join(folder, INDEX_FILE), os.path.join(folder, SINGLE_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SafetensorsError(f"{index_path}: not a safetensors index ({type(e).__name__}: {e})") from None
    out = {}
    for name, shard in weight_map.items():
      p = os.path.join(folder, shard)
      if not os.path.exists(p):
        raise SafetensorsError(f"{index_path}: tensor {name!r} is in shard {shard!r}, which is missing")
      out[name] = p
    for p in sorted(set(out.values())):
      infos = tensor_infos(p)
      missing = [n for n, q in out.items() if q == p and n not in infos]
      if missing:
        raise SafetensorsError(f"{index_path} lists {missing[:5]} in {p}, which does not hold them")
    return out
  if os.path.exists(single):
    return {name: single for name in tensor_infos(single)}
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"checkpoint folder not found: {folder}")
  bins = [n for n in os.listdir(folder) if n.startswith("pytorch_model") and n.endswith(".bin")]
  hint = f"; it holds pickled {bins[:2]}: convert them to safetensors first" if bins else ""
  raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}{hint}")


def parse_size(size: int | str) -> int:
  """A byte count, or a size like ``"5GB"`` / ``"500MiB"`` / ``"100KB"`` (decimal and binary
  units), as a positive number of bytes; anything else is a ``ValueError`` naming it."""
  if isinstance(size, int) and not isinstance(size, bool) and size > 0:
    return size
  s = str(size).strip().upper()
  for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                     ("KB", 10**3), ("B", 1)):
    if s.endswith(unit):
      s, scale = s[: -len(unit)].strip(), mult
      break
  else:
    scale = 1
  try:
    n = int(float(s) * scale)
  except (ValueError, OverflowError):
    n = 0
  if isinstance(size, bool) or n <= 0:
    raise ValueError(f"size {size!r}: expected a positive byte count or a size like '5GB', '500MiB', '100KB'")
  return n


def write_sharded(folder: str | os.PathLike, sources: Iterable[TensorSource], *,
                  max_shard_size: Optional[int | str] = None,
                  metadata: Optional[Mapping[str, str]] = None) -> list[str]:
  """Writes tensors as ``model.safetensors`` or, when they exceed ``max_shard_size``
  (bytes or ``"5GB"``-style), as ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json``, in the order given (the Hugging Face layout).

  Returns the file names written. The folder must exist; each file is written atomically.
  """
  folder = os.fspath(folder)
  sources = list(sources)
  limit = None if max_shard_size is None else parse_size(max_shard_size)
  shards: list[list[TensorSource]] = [[]]
  size = 0
  for s in sources:
    if limit is not None and shards[-1] and size + s.nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(s)
    size += s.nbytes
  if len(shards) == 1:
    write_file(os.path.join(folder, SINGLE_FILE), shards[0], metadata)
    return [SINGLE_FILE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    write_file(os.path.join(folder, name), shard, metadata)
    weight_map.update({s.name: name for s in shard})
  index = {"metadata": {"total_size": sum(s.nbytes for s in sources)}, "weight_map": weight_map}
  write_json(os.path.join(folder, INDEX_FILE), index)
  return names + [INDEX_FILE]


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as indented, key-sorted JSON, atomically (temp file, then rename)."""
  path = os.fspath(path)
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def replace_folder(tmp: str, folder: str) -> None:
  """Moves the finished folder ``tmp`` to ``folder``, replacing an existing one."""
  if os.path.exists(folder):
    parent = os.path.dirname(os.path.abspath(folder))
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old_", dir=parent)
    os.rmdir(old)
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, folder)
