"""The run configuration: a typed, frozen tree of dataclasses, parsed and validated once.

One JSON file per run (``configs/*.json``)::

    {"name": "lora_r8_qv", "task": "classification",
     "model": {"kind": "bert", "pooling": "mean"},
     "data": {"max_len": 64},
     "methods": [{"name": "lora", "where": "(query|value)/kernel", "rank": 8, "alpha": 16}],
     "quantize": null,
     "optimizer": {"kind": "adamw", "lr": 2e-3, "weight_decay": 0.01},
     "schedule": {"kind": "warmup_cosine", "warmup_frac": 0.06},
     "training": {"epochs": 4, "batch_size": 32, "seed": 0},
     "checkpointing": {"every": 100, "keep": 3},
     "export": {"peft": true, "merged": false}}

Sections (every key optional except where noted; an unknown key is an error with a
did-you-mean, a wrong type or value an error naming its key and file):

* ``task``: ``"classification"`` (the docstring task on BERT/MiniLM) or ``"sft"``
  (causal-LM supervised fine-tuning of a decoder on JSONL).
* ``model`` (:class:`ModelConfig`), ``data`` (:class:`ClassificationData` or
  :class:`SFTData`, by ``task``).
* ``methods``: the method chain, each ``{"name": <registry name>, **parameters}``
  (:mod:`lowrank_jax.methods.registry`); ``[]`` trains only what the task always trains
  (the classification head). ``quantize`` (:class:`QuantizeConfig`): store the frozen base
  by a codec first (QLoRA: ``lora`` on an ``nf4`` base). ``rank_allocator``: AdaLoRA's
  budget (:class:`RankAllocatorConfig`).
* ``optimizer``, ``schedule``, ``training``, ``checkpointing``, ``export``, ``deploy``.
* ``mesh`` (:class:`MeshConfig`): sharded training on a device mesh; ``distributed``
  (:class:`DistributedSection`): joining a multi-process run. Neither changes the
  arithmetic, so a run may resume with another mesh or process count.

:func:`load_all` reads several files, applies ``--set key=value`` overrides (typed by the
key: ``training.epochs=1``, ``methods.0.rank=16``, ``model.random.hidden_size=32``) and
validates every config before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import types
import typing
from typing import Any, Literal, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from lowrank_jax import distributed, sharding
from lowrank_jax.data.docstrings import DEFAULT_PACKAGES
from lowrank_jax.io import safetensors
from lowrank_jax.methods import registry
from lowrank_jax.models import bert, decoder
from lowrank_jax.optim import make_optimizer
from lowrank_jax.quant.codecs import get_codec
from lowrank_jax.trainer.schema import (ConfigError, checked, coerce_text, did_you_mean, field_types,
                                        parse, parse_value, to_json, unknown_key)

__all__ = [
  "ConfigError", "ModelConfig", "ClassificationData", "SFTData", "QuantizeConfig",
  "RankAllocatorConfig", "OptimizerConfig", "ScheduleConfig", "TrainingConfig",
  "CheckpointConfig", "MeshConfig", "DistributedSection", "ExportConfig", "DeployConfig", "RunConfig",
  "from_dict", "to_dict", "load", "load_all", "apply_override", "TASKS",
]

Task = Literal["classification", "sft"]
TASKS: tuple[str, ...] = typing.get_args(Task)
DTypeName = Literal["float32", "bfloat16", "float16"]

_positive = (lambda v: v > 0, "must be > 0")
_non_negative = (lambda v: v >= 0, "must be >= 0")
_fraction = (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
_unit = (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")


def _regex(v: str) -> bool:
  try:
    re.compile(v)
    return True
  except re.error:
    return False


# --------------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The frozen base model.

  Attributes:
    kind: ``"bert"`` (encoder, classification) or ``"decoder"`` (causal LM: Llama, Mistral,
      Qwen, Gemma families, :mod:`lowrank_jax.models.decoder`).
    path: a Hugging Face folder (``config.json`` + safetensors). ``None`` with ``bert``:
      all-MiniLM-L6-v2 from its pip package.
    random: instead of ``path``, a randomly initialised model with these architecture
      fields (``BertConfig`` / ``DecoderConfig`` fields; keys from ``training.seed``), e.g.
      for tests.
    tokenizer: folder (or file) with ``tokenizer.json``; default ``path`` (MiniLM's for bert).
    dtype: the base's dtype in memory.
    dropout: dropout while training: BERT's hidden and attention dropout, a decoder's
      attention dropout; ``None`` keeps the model config's own rates.
    pooling: what the classification head reads: the masked ``"mean"`` or ``"cls"``.
    remat: recompute each decoder block in the backward pass (less memory).
  """
  kind: Literal["bert", "decoder"] = "bert"
  path: Optional[str] = None
  random: Optional[Any] = None  # parsed into bert.BertConfig / decoder.DecoderConfig by kind
  tokenizer: Optional[str] = None
  dtype: DTypeName = "float32"
  dropout: Optional[float] = checked(None, *_fraction)
  pooling: Literal["mean", "cls"] = "mean"
  remat: bool = False


@dataclasses.dataclass(frozen=True)
class ClassificationData:
  """The standard-library docstring task (:func:`lowrank_jax.data.load_docstring_task`)."""
  packages: tuple[str, ...] = DEFAULT_PACKAGES
  max_len: int = checked(64, lambda v: v >= 2, "must be >= 2 ([CLS] and [SEP])")
  max_per_class: Optional[int] = checked(None, *_positive)
  fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
  min_chars: int = checked(30, *_non_negative)
  min_words: int = checked(4, *_non_negative)
  salt: str = ""

  def __post_init__(self):
    if not self.packages:
      raise ValueError("packages: at least one package is needed")
    if any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1.0) > 1e-9:
      raise ValueError(f"fractions {list(self.fractions)} must be non-negative and sum to 1")


@dataclasses.dataclass(frozen=True)
class SFTData:
  """Supervised fine-tuning data (:mod:`lowrank_jax.data.sft`): JSONL files of
  ``{"prompt", "response"}`` or ``{"messages": [{"role", "content"}, ...]}`` records.

  Attributes:
    train: the training JSONL file (relative paths: from the working directory).
    eval: an evaluation JSONL file (eval loss and perplexity after every epoch and at the end).
    seq_len: tokens per row.
    pack: pack several examples per row (attention never crosses examples).
    loss_on: ``"response"`` (assistant/response tokens only) or ``"all"`` tokens.
    too_long: an example longer than ``seq_len``: ``"truncate"`` it, ``"drop"`` it or ``"error"``.
  """
  train: str
  eval: Optional[str] = None
  seq_len: int = checked(512, lambda v: v >= 2, "must be >= 2")
  pack: bool = True
  loss_on: Literal["response", "all"] = "response"
  too_long: Literal["truncate", "drop", "error"] = "truncate"


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
  """The frozen base stored by a codec (:func:`lowrank_jax.quantize`), before the methods.

  Attributes:
    codec: ``"nf4"``, ``"fp4"``, ``"int8"``, ``"int4_affine"``, ``"int8_affine"``...
    where: regex of the leaves to quantize; default: the task's weight matrices (bert:
      ``^bert/encoder/.*/kernel$``, decoder: every kernel under ``layers/``).
    block_size, double_quant, compute_dtype: see :func:`lowrank_jax.quantize`.
    options: the codec's own keywords (e.g. ``{"symmetric": false}`` for affine codecs).
  """
  codec: str = "nf4"
  where: Optional[str] = checked(None, _regex, "is not a valid regex")
  block_size: int = checked(64, *_positive)
  double_quant: bool = True
  compute_dtype: Optional[DTypeName] = None
  options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RankAllocatorConfig:
  """AdaLoRA's budgeted rank allocation and orthogonality penalty (:func:`lowrank_jax.rank_allocator`);
  ``tinit``/``tfinal`` as fractions of the total steps."""
  target_r: int = checked(4, *_positive)
  orth_reg_weight: float = checked(0.5, *_non_negative)
  tinit_frac: float = checked(0.1, *_unit)
  tfinal_frac: float = checked(0.2, *_unit)
  deltaT: int = checked(5, *_positive)
  beta1: float = checked(0.85, *_fraction)
  beta2: float = checked(0.85, *_fraction)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """:func:`lowrank_jax.optim.make_optimizer`'s keys, typed; the learning rate follows
  ``schedule``. Keys of another ``kind`` (e.g. ``rank`` with ``adamw``) are an error."""
  kind: Literal["adamw", "adamw_8bit", "galore_adamw", "loraplus"] = "adamw"
  lr: float = checked(1e-3, *_positive)
  weight_decay: float = checked(0.01, *_non_negative)
  b1: Optional[float] = checked(None, *_fraction)
  b2: Optional[float] = checked(None, *_fraction)
  eps: Optional[float] = checked(None, *_non_negative)
  clip: Optional[float] = checked(1.0, *_positive)
  offload: Union[bool, Literal["force"]] = False
  # adamw_8bit
  min_8bit_size: Optional[int] = checked(None, *_non_negative)
  block_size: Optional[int] = checked(None, *_positive)
  # galore_adamw
  rank: Optional[int] = checked(None, *_positive)
  update_proj_gap: Optional[int] = checked(None, *_positive)
  scale: Optional[float] = None
  proj_type: Optional[str] = None
  where: Optional[str] = checked(None, _regex, "is not a valid regex")
  svd: Optional[str] = None
  moments: Optional[Literal["fp32", "8bit"]] = None
  projector_dtype: Optional[str] = None
  compat: Optional[Literal["galore_torch"]] = None
  # loraplus
  ratio: Optional[float] = checked(None, *_positive)
  base: Optional[Literal["adamw", "adamw_8bit"]] = None
  where_b: Optional[str] = checked(None, _regex, "is not a valid regex")

  def spec(self, lr=None) -> dict:
    """The ``make_optimizer`` dict: the keys that are set (``lr`` replaced by ``lr`` if given)."""
    out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v is not False}
    if lr is not None:
      out["lr"] = lr
    return out


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Learning-rate schedule: linear warm-up from 0, then ``"cosine"`` decay to
  ``end_frac * lr``, ``"linear"`` decay to it, or ``"constant"``."""
  kind: Literal["warmup_cosine", "warmup_linear", "constant"] = "warmup_cosine"
  warmup_frac: float = checked(0.06, *_unit)
  warmup_steps: Optional[int] = checked(None, *_non_negative)
  end_frac: float = checked(0.05, *_unit)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  """The loop.

  Attributes:
    epochs: passes over the training data.
    max_steps: stop after this many steps (the schedule then spans them).
    batch_size: rows per step (sequences, or packed rows for ``sft``).
    eval_batch_size: rows per evaluation batch (default ``batch_size``).
    seed: every random choice: head and method init, data order, dropout.
    log_every: steps between JSON metrics lines.
  """
  epochs: int = checked(3, *_positive)
  max_steps: Optional[int] = checked(None, *_positive)
  batch_size: int = checked(32, *_positive)
  eval_batch_size: Optional[int] = checked(None, *_positive)
  seed: int = checked(0, *_non_negative)
  log_every: int = checked(10, *_positive)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints of the trainable state every ``every`` steps (0: only at the end and
  on SIGTERM/SIGINT); the last ``keep`` are kept."""
  every: int = checked(100, *_non_negative)
  keep: int = checked(3, *_positive)


MeshAxes = Optional[Union[str, tuple[str, ...]]]  # one entry of a PartitionSpec


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sharded training on a device mesh over every process's devices (:mod:`lowrank_jax.sharding`).

  The frozen base is placed by the model family's rules (:func:`lowrank_jax.sharding.family_rules`:
  Megatron column/row tensor parallelism, FSDP on the other dimension, experts split),
  after the config's own ``rules``; adapters, quantized codes and optimizer state are placed
  from their base weight's spec; the batch is split over ``batch``.

  Attributes:
    mesh: ``"name:size,..."``, e.g. ``"data:2,fsdp:2,tensor:2"`` (one size may be -1: the
      rest of the devices); ``None``: one device, nothing sharded (the other keys are then
      unused, so one config runs on a mesh or on one device: ``--mesh none``).
    rules: ``[[regex, spec], ...]`` tried before the family's rules (first match wins,
      ``re.search`` on paths like ``layers/layer_0/attention/q_proj/kernel``); a spec is a
      list with an entry per array axis: ``null``, a mesh axis name or a list of names
      (``[]``: replicated).
    fsdp: the mesh axis that shards each weight's other dimension (ZeRO-3) and splits the
      batch; default ``"fsdp"`` when the mesh has it.
    tensor: the tensor-parallel axis; default ``"tensor"`` when the mesh has it.
    expert: the axis that splits MoE experts; default ``"expert"`` when the mesh has it.
    batch: the axes that split the batch (in mesh order); default the ``data`` and FSDP
      axes the mesh has.
    on_indivisible: a spec that does not divide its leaf: ``"replicate"`` the leaf (with a
      warning naming it) or raise an ``"error"``.
    dcn: multislice / hybrid meshes: ``"name:size,..."``, how many ways each axis of
      ``mesh`` spans the slow network between slices (TPU multislice; on GPU and CPU each
      process is a slice), e.g. ``mesh "data:4,fsdp:4,tensor:2"``, ``dcn "data:2"``
      (:func:`lowrank_jax.sharding.make_mesh`); ``None``: one slice.
  """
  mesh: Optional[str] = None
  rules: tuple[tuple[str, tuple[MeshAxes, ...]], ...] = ()
  fsdp: Optional[str] = None
  tensor: Optional[str] = None
  expert: Optional[str] = None
  batch: Optional[tuple[str, ...]] = None
  on_indivisible: Literal["replicate", "error"] = "replicate"
  dcn: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class DistributedSection:
  """How the training process joins a multi-process run (:func:`lowrank_jax.distributed.initialize`).

  Every field left ``null``: the command line (``--coordinator``, ``--num-processes``,
  ``--process-id``), then ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID``, then the cluster ``jax.distributed`` detects (TPU pod, SLURM, Open
  MPI, Kubernetes); none of these: a single process.

  Attributes:
    coordinator: ``host:port`` of process 0.
    num_processes: the number of processes.
    process_id: this process's index (usually from the command line or the environment).
    local_device_ids: the devices this process drives (default: every visible one).
    timeout_s: how long to wait for every process to join.
  """
  coordinator: Optional[str] = None
  num_processes: Optional[int] = checked(None, *_positive)
  process_id: Optional[int] = checked(None, *_non_negative)
  local_device_ids: Optional[tuple[int, ...]] = None
  timeout_s: int = checked(300, *_positive)

  def __post_init__(self):
    distributed.DistributedConfig(self.coordinator, self.num_processes, self.process_id,
                                  self.local_device_ids, self.timeout_s)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """What the end of a run writes beside the metrics: the adapter as a PEFT folder (written
  from the methods' configs: LoRA incl. rsLoRA, biases and PiSSA/OLoRA converted, DoRA,
  AdaLoRA, LoKr, LoHa, VeRA, IA3, batched LoRA, ``full`` entries as ``modules_to_save``;
  what peft cannot represent is skipped with the reason) and, for decoders, the merged
  model as a Hugging Face folder (streamed leaf by leaf, in ``merged_dtype``; larger than
  ``merged_max_shard_size``, e.g. ``"5GB"``, it is written as shards + index)."""
  peft: bool = True
  merged: bool = False
  merged_dtype: Optional[DTypeName] = None
  merged_max_shard_size: Optional[str] = None

  def __post_init__(self):
    if self.merged_max_shard_size is not None:
      try:
        safetensors.parse_size(self.merged_max_shard_size)
      except ValueError as e:
        raise ValueError(f"merged_max_shard_size: {e}") from None


@dataclasses.dataclass(frozen=True)
class DeployConfig:
  """How the trained model is deployed for one more test evaluation: ``merge_quantize``
  (merge, then store by ``quantize``), ``qalora_merge`` (QA-LoRA's int4 merge) or
  ``l4q_merge`` (L4Q's int codes)."""
  kind: Literal["merge_quantize", "qalora_merge", "l4q_merge"]
  quantize: Optional[QuantizeConfig] = None

  def __post_init__(self):
    if (self.kind == "merge_quantize") != (self.quantize is not None):
      raise ValueError("quantize is required with kind 'merge_quantize' and only there")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One run: what :func:`lowrank_jax.trainer.run.run` trains (see the module docstring)."""
  name: str
  task: Task = "classification"
  model: ModelConfig = ModelConfig()
  data: Union[ClassificationData, SFTData] = ClassificationData()
  methods: tuple[registry.MethodConfig, ...] = ()
  quantize: Optional[QuantizeConfig] = None
  rank_allocator: Optional[RankAllocatorConfig] = None
  optimizer: OptimizerConfig = OptimizerConfig()
  schedule: ScheduleConfig = ScheduleConfig()
  training: TrainingConfig = TrainingConfig()
  checkpointing: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig()
  distributed: DistributedSection = DistributedSection()
  export: ExportConfig = ExportConfig()
  deploy: Optional[DeployConfig] = None

  @property
  def method_names(self) -> tuple[str, ...]:
    return tuple(m.method_name for m in self.methods)


# --------------------------------------------------------------------------------- parsing

_DATA = {"classification": ClassificationData, "sft": SFTData}
_MODEL_CONFIG = {"bert": bert.BertConfig, "decoder": decoder.DecoderConfig}


def _parse_random(kind: str, raw, source: str):
  """``model.random`` as the model family's config dataclass (unknown keys with a did-you-mean)."""
  if raw is None:
    return None
  cls = _MODEL_CONFIG[kind]
  key = "model.random"
  if not isinstance(raw, dict):
    raise ConfigError(f"{source}: {key}: expected an object of {cls.__name__} fields")
  names = [f.name for f in dataclasses.fields(cls)]
  for k in raw:
    if k not in names:
      raise unknown_key(source, key, k, names)
  try:
    return cls(**raw)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{source}: {key}: {e}") from e


def _parse_methods(raw, source: str) -> tuple:
  if raw is None:
    return ()
  if not isinstance(raw, (list, tuple)):
    raise ConfigError(f"{source}: methods: expected a list of {{\"name\": ..., **parameters}}, got "
                      f"{json.dumps(raw, default=repr)}")
  out = []
  for i, item in enumerate(raw):
    key = f"methods[{i}]"
    if not isinstance(item, dict) or "name" not in item:
      raise ConfigError(f"{source}: {key}: expected an object with a 'name' (one of "
                        f"{', '.join(registry.METHODS)}), got {json.dumps(item, default=repr)}")
    params = dict(item)
    name = params.pop("name")
    try:
      out.append(registry.parse(name, params))
    except (registry.ConfigError, TypeError, ValueError) as e:
      raise ConfigError(f"{source}: {key}: {e}") from e
  return tuple(out)


def from_dict(raw: dict, source: str = "<config>", *, name: Optional[str] = None) -> RunConfig:
  """A validated :class:`RunConfig` from a JSON mapping (``name`` defaults to ``raw["name"]``).

  Raises:
    ConfigError: naming ``source`` and the key of the first problem.
  """
  if not isinstance(raw, dict):
    raise ConfigError(f"{source}: a config must be a JSON object, got {type(raw).__name__}")
  raw = dict(raw)
  if name is not None:
    raw.setdefault("name", name)
  types_ = field_types(RunConfig)
  for k in raw:
    if k not in types_:
      raise unknown_key(source, "", k, types_)
  task = parse_value(types_["task"], raw.get("task", "classification"), source, "task")
  model_raw = raw.get("model") or {}
  if not isinstance(model_raw, dict):
    raise ConfigError(f"{source}: model: expected an object")
  kind = parse_value(field_types(ModelConfig)["kind"], model_raw.get("kind", "bert"), source, "model.kind")
  model = parse(ModelConfig, model_raw, source, "model",
                overrides={"random": _parse_random(kind, model_raw.get("random"), source)})
  data = parse(_DATA[task], raw.get("data"), source, "data")
  methods = _parse_methods(raw.get("methods"), source)
  config = parse(RunConfig, raw, source,
                 overrides={"task": task, "model": model, "data": data, "methods": methods})
  validate(config, source)
  return config


def to_dict(config: RunConfig) -> dict:
  """The config as JSON (``from_dict(to_dict(c)) == c``)."""
  out = {}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if f.name == "methods":
      out[f.name] = [to_json(registry.as_dict(m)) for m in value]
    elif f.name == "model":
      out[f.name] = {k: (None if v is None else _model_config_json(v)) if k == "random" else to_json(v)
                     for k, v in ((g.name, getattr(value, g.name)) for g in dataclasses.fields(value))}
    else:
      out[f.name] = to_json(value)
  return out


def _model_config_json(config) -> dict:
  out = {}
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    out[f.name] = v.name if isinstance(v, np.dtype) else to_json(v)
  return out


# ------------------------------------------------------------------------------- validation


def _error(source: str, key: str, message: str) -> ConfigError:
  return ConfigError(f"{source}: {key}: {message}")


def _exists(source: str, key: str, path: Optional[str], what: str) -> None:
  if path is not None and not os.path.exists(path):
    raise _error(source, key, f"{what} {path!r} does not exist (relative paths are read from "
                              f"the working directory {os.getcwd()})")


def validate(config: RunConfig, source: str = "<config>") -> None:
  """The checks between sections and against the file system (run before any training)."""
  m, task = config.model, config.task
  if task == "classification" and m.kind != "bert":
    raise _error(source, "model.kind", f"task 'classification' needs a 'bert' model, got {m.kind!r}")
  if task == "sft" and m.kind != "decoder":
    raise _error(source, "model.kind", f"task 'sft' needs a 'decoder' model, got {m.kind!r}")
  if m.path is not None and m.random is not None:
    raise _error(source, "model", "give either 'path' or 'random', not both")
  if m.kind == "decoder" and m.path is None and m.random is None:
    raise _error(source, "model.path", "a decoder needs a Hugging Face folder 'path' (or 'random')")
  if m.random is not None and m.kind == "decoder" and m.tokenizer is None:
    raise _error(source, "model.tokenizer", "a random decoder needs a tokenizer folder")
  _exists(source, "model.path", m.path, "model folder")
  _exists(source, "model.tokenizer", m.tokenizer, "tokenizer")
  if isinstance(config.data, SFTData):
    _exists(source, "data.train", config.data.train, "training data")
    _exists(source, "data.eval", config.data.eval, "evaluation data")
  names = config.method_names
  if config.rank_allocator is not None and "adalora" not in names:
    raise _error(source, "rank_allocator", "needs an 'adalora' method in 'methods'")
  if names.count("adalora") > 1:
    raise _error(source, "methods", "at most one 'adalora' method (one rank budget)")
  if config.export.merged and m.kind != "decoder":
    raise _error(source, "export.merged", "a merged Hugging Face folder is written for decoder models only")
  if config.deploy is not None and config.deploy.kind in ("qalora_merge", "l4q_merge"):
    need = config.deploy.kind.split("_")[0]
    if need not in names:
      raise _error(source, "deploy.kind", f"{config.deploy.kind!r} needs a {need!r} method in 'methods'")
  try:
    make_optimizer(config.optimizer.spec())
  except (TypeError, ValueError) as e:
    raise _error(source, "optimizer", str(e)) from e
  for key, q in (("quantize", config.quantize),
                 ("deploy.quantize", config.deploy.quantize if config.deploy else None)):
    if q is not None:
      _check_codec(q, source, key)
  _check_mesh(config.mesh, source)


def mesh_axis_names(spec: str) -> tuple[str, ...]:
  """The axis names of a mesh string (its syntax checked, not the device count)."""
  known = 1
  for part in spec.split(","):
    size = part.partition(":")[2].strip()
    known *= int(size) if size.isdigit() and int(size) > 0 else 1
  return sharding.parse_mesh_spec(spec, known)[0]


def _check_mesh(mc: MeshConfig, source: str) -> None:
  """The mesh string's syntax, the rules' regexes and every axis name against the mesh."""
  for i, (regex, _) in enumerate(mc.rules):
    if not _regex(regex):
      raise _error(source, f"mesh.rules[{i}][0]", f"{regex!r} is not a valid regex")
  if mc.mesh is None:  # one device: nothing to lay out (one config runs, or resumes, on one device)
    return
  try:
    names = mesh_axis_names(mc.mesh)
  except ValueError as e:
    raise _error(source, "mesh.mesh", str(e)) from e

  def check_axis(key: str, name: str) -> None:
    if name not in names:
      raise _error(source, key, f"the mesh {mc.mesh!r} has no axis {name!r};{did_you_mean(name, names)} "
                   f"its axes: {', '.join(names)}")

  for key in ("fsdp", "tensor", "expert"):
    if getattr(mc, key) is not None:
      check_axis(f"mesh.{key}", getattr(mc, key))
  if mc.dcn is not None:
    try:
      dcn_names = mesh_axis_names(mc.dcn)
    except ValueError as e:
      raise _error(source, "mesh.dcn", str(e)) from e
    for name in dcn_names:
      check_axis("mesh.dcn", name)
  for i, name in enumerate(mc.batch or ()):
    check_axis(f"mesh.batch[{i}]", name)
  for i, (_, spec) in enumerate(mc.rules):
    for j, entry in enumerate(spec):
      for name in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
        check_axis(f"mesh.rules[{i}][1][{j}]", name)


def quantize_kwargs(q: QuantizeConfig) -> dict:
  """The keywords of :func:`lowrank_jax.quantize` (after ``theta0`` and ``where``)."""
  kw = dict(codec=q.codec, block_size=q.block_size, double_quant=q.double_quant, **q.options)
  if q.compute_dtype is not None:
    kw["compute_dtype"] = jnp.dtype(q.compute_dtype)
  return kw


def _check_codec(q: QuantizeConfig, source: str, key: str) -> None:
  """The codec's name and options against the codec registry."""
  try:
    spec = get_codec(q.codec)
  except ValueError as e:
    raise _error(source, f"{key}.codec", str(e)) from e
  for option in q.options:
    if option not in spec.options:
      raise _error(source, f"{key}.options", f"codec {q.codec!r} has no option {option!r};"
                   f"{did_you_mean(option, spec.options)} valid options: {', '.join(spec.options) or 'none'}")


# ------------------------------------------------------------------------ files, overrides


class _MethodList:
  """Schema marker: the ``methods`` list (indexed by position)."""


@dataclasses.dataclass(frozen=True)
class _Fields:
  """Schema marker: an object whose keys are the fields of ``cls`` (a registry method's
  config, a model config), plus ``extra`` string keys."""
  cls: type
  extra: tuple[str, ...] = ()


_SCALARS = (int, float, bool, str, type(None))


def _simple(tp):
  """``tp`` when :func:`coerce_text` reads it by type (scalars, literals, optional scalars),
  else ``Any`` (the text is read as JSON)."""
  if tp in _SCALARS or typing.get_origin(tp) is Literal:
    return tp
  if typing.get_origin(tp) in (Union, types.UnionType) and all(
      a in _SCALARS or typing.get_origin(a) is Literal for a in typing.get_args(tp)):
    return tp
  return Any


def _schema_step(tp, key: str, node, raw: dict, source: str, prefix: str, display: str):
  """The type of ``key`` inside a value of type ``tp`` (``node``: that value in ``raw``)."""
  if tp is RunConfig and key == "data":
    return _DATA.get(raw.get("task", "classification"), ClassificationData)
  if tp is RunConfig and key == "methods":
    return _MethodList
  if tp is _MethodList:
    items = node if isinstance(node, list) else []
    if not key.isdigit():
      raise ConfigError(f"{source}: {display}: methods are indexed by position (methods.0.rank)")
    if int(key) >= len(items):
      raise ConfigError(f"{source}: {display}: the config has {len(items)} method(s)")
    return _Fields(registry.get(items[int(key)].get("name", "")).config_cls, extra=("name",))
  if tp is ModelConfig and key == "random":
    kind = node.get("kind", "bert") if isinstance(node, dict) else "bert"
    return _Fields(_MODEL_CONFIG.get(kind, bert.BertConfig))
  if isinstance(tp, _Fields):
    if key in tp.extra:
      return str
    hints = typing.get_type_hints(tp.cls)
    names = [f.name for f in dataclasses.fields(tp.cls)]
    if key not in names:
      raise unknown_key(source, prefix, key, [*tp.extra, *names])
    return _simple(hints.get(key, Any))
  if dataclasses.is_dataclass(tp):
    types_ = field_types(tp)
    if key not in types_:
      raise unknown_key(source, prefix, key, types_)
    sub = types_[key]
    sections = [a for a in typing.get_args(sub) if dataclasses.is_dataclass(a)]
    return sections[0] if len(sections) == 1 else sub  # Optional[Section] -> Section
  return Any


def _schema_at(raw: dict, keys: Sequence[str], source: str, display: str):
  """The type of the value at ``keys`` in a raw config (for typed ``--set`` parsing)."""
  tp: Any = RunConfig
  node: Any = raw
  for i, k in enumerate(keys):
    tp = _schema_step(tp, k, node, raw, source, ".".join(keys[:i]), display)
    if isinstance(node, dict):
      node = node.get(k)
    elif isinstance(node, list) and k.isdigit() and int(k) < len(node):
      node = node[int(k)]
    else:
      node = None
  return Any if tp is _MethodList or isinstance(tp, _Fields) or dataclasses.is_dataclass(tp) else tp


def apply_override(raw: dict, assignment: str, source: str) -> dict:
  """``raw`` with ``--set a.b.c=value`` applied (the value typed by the key's schema)."""
  if "=" not in assignment:
    raise ConfigError(f"--set {assignment!r}: expected key=value (e.g. training.epochs=1)")
  dotted, text = assignment.split("=", 1)
  keys = [k for k in dotted.strip().split(".")]
  if not all(keys):
    raise ConfigError(f"--set {assignment!r}: empty key")
  display = f"--set {dotted}"
  tp = _schema_at(raw, keys, source, display)
  value = coerce_text(tp, text, source, display)
  out = json.loads(json.dumps(raw))
  node = out
  for k in keys[:-1]:
    if isinstance(node, list):
      node = node[int(k)]
      continue
    if not isinstance(node.get(k), (dict, list)):
      node[k] = {}
    node = node[k]
  if isinstance(node, list):
    node[int(keys[-1])] = value
  else:
    node[keys[-1]] = value
  return out


def read_json(path: str | os.PathLike) -> dict:
  """A config file as a dict (JSON errors name the file, line and column)."""
  p = pathlib.Path(path)
  try:
    text = p.read_text()
  except OSError as e:
    raise ConfigError(f"{path}: cannot read the config: {e.strerror}") from e
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: a config must be a JSON object")
  return raw


def load(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
  """One config file (+ ``--set`` overrides), validated; ``name`` defaults to the file's stem."""
  source = os.fspath(path)
  raw = read_json(path)
  raw.setdefault("name", pathlib.Path(path).stem)
  for assignment in overrides:
    raw = apply_override(raw, assignment, source)
  return from_dict(raw, source)


def load_all(paths: Sequence[str | os.PathLike], overrides: Sequence[str] = ()) -> list[RunConfig]:
  """Every config validated before any run; names must be distinct (they name output files)."""
  configs = [load(p, overrides) for p in paths]
  seen: dict[str, str] = {}
  for p, c in zip(paths, configs):
    if c.name in seen:
      raise ConfigError(f"{p}: name {c.name!r} is also the name of {seen[c.name]}; names must differ")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", c.name):
      raise ConfigError(f"{p}: name {c.name!r} must be a plain file name (letters, digits, _.+-)")
    seen[c.name] = os.fspath(p)
  return configs
