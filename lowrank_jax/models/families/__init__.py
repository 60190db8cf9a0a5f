"""Hugging Face decoder families: one table each for the ``config.json`` keys and the
tensor names, used both ways (loading and ``save_pretrained``).

A family (:class:`Family`) is data:

* ``keys``: ``(hf key, DecoderConfig field, default)`` triples copied as they are
  (:data:`REQUIRED` marks keys a ``config.json`` must have);
* ``fixed``: the architecture's switches (``DecoderConfig`` fields with one value for
  the whole family, e.g. Gemma's ``(1 + w)`` norms);
* ``read`` / ``write``: the few keys that are not plain copies (RoPE, layer types, MoE);
* ``modules``: our module path -> Hugging Face module name (``{i}`` = layer, ``{e}`` =
  expert, which a 3-d leaf stacks on its first axis).

The tensor table follows from ``modules`` and the parameter shapes of the config: a leaf
``<module>/kernel`` is the tensor ``<hf module>.weight`` transposed (``[in, out]`` ours,
``[out, in]`` torch; per expert for 3-d leaves), ``bias`` is ``.bias``, ``scale`` and
``embedding`` are ``.weight`` as stored. The machinery is in
:mod:`~lowrank_jax.models.families.base`, the families in ``llama``, ``qwen``, ``gemma``
and ``mixtral``.
"""

from lowrank_jax.models.families import base, gemma, llama, mixtral, qwen  # the modules register the families
from lowrank_jax.models.families.base import *  # noqa: F401,F403  (the machinery, see base.__all__)

__all__ = ["FAMILY_NAMES", "MODEL_TYPES", *base.__all__]

FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in base.registered())
MODEL_TYPES: dict[str, str] = {t: f.name for f in base.registered() for t in f.model_types}
