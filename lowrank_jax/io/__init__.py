"""File formats below the models: safetensors read/written tensor by tensor
(:mod:`lowrank_jax.io.safetensors`) and torch state-dict naming (:mod:`lowrank_jax.io.hf`)."""
