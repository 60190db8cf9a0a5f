"""The main job: typed configs -> training runs that survive interruption.

    lowrank-jax-train configs/minilm_lora.json --out outputs/run [--set training.epochs=1] [--resume]

Modules, one idea each: :mod:`~lowrank_jax.trainer.schema` (typed parsing of JSON into
frozen dataclasses), :mod:`~lowrank_jax.trainer.config` (the run config tree),
:mod:`~lowrank_jax.trainer.tasks` (classification and causal-LM SFT),
:mod:`~lowrank_jax.trainer.setup` (methods from the registry, quantized base, optimizer),
:mod:`~lowrank_jax.trainer.placement` (the device mesh: base, adapters, optimizer state,
batches), :mod:`~lowrank_jax.trainer.processes` (many processes: joining, agreeing, writing
once), :mod:`~lowrank_jax.trainer.loop` (the loop), :mod:`~lowrank_jax.trainer.rundir`
(checkpoint folders), :mod:`~lowrank_jax.trainer.base` (the base's content hash),
:mod:`~lowrank_jax.trainer.signals` (SIGTERM/SIGINT, parent death),
:mod:`~lowrank_jax.trainer.files` (atomic strict-JSON files), :mod:`~lowrank_jax.trainer.report`
(table, plot), :mod:`~lowrank_jax.trainer.export` (PEFT and merged folders),
:mod:`~lowrank_jax.trainer.run` (one run) and :mod:`~lowrank_jax.trainer.cli` (the command).
"""

from lowrank_jax.trainer.config import ConfigError, RunConfig, from_dict, load, load_all, to_dict

__all__ = ["ConfigError", "RunConfig", "from_dict", "load", "load_all", "to_dict"]
