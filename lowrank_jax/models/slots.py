"""Model-owned slots: where a model's layers are, for methods that add to them.

Bottleneck adapters and prefix tuning do not change existing weights; they add subtrees to
the parameter tree that the model's forward pass reads. Each layer node of a transformer
may hold

* ``attention_adapter`` / ``output_adapter``: ``{down: {kernel, bias}, up: {kernel, bias}}``,
  applied with :func:`lowrank_jax.models.layers.bottleneck_adapter` to the attention
  block's output / the feed-forward block's output before the residual add (Houlsby et al.,
  arXiv 1902.00751);
* ``prefix``: ``{"key": [P, K, hd], "value": [P, K, hd]}`` (``K`` key/value heads of width
  ``hd``; ``[P, K * hd]`` when the heads are not known), concatenated before that layer's
  keys and values and always attended (Li & Liang, arXiv 2101.00190). Keys are used as
  stored (post-RoPE in a decoder, as peft's ``past_key_values``).

A :class:`ModelSlots` tells the methods where the layer nodes are and which existing
leaf in each layer "anchors" a slot (the adapter's parameters are stored in ``phi`` at
the kernel whose output it follows; the prefix at the key projection), plus the sizes
they need. Each model module provides one (``bert.slots(config)``; :func:`decoder_slots`
for the Llama-layout decoders). Models sit below methods: this module imports nothing
from :mod:`lowrank_jax.methods`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

__all__ = [
  "ATTENTION_ADAPTER",
  "OUTPUT_ADAPTER",
  "PREFIX",
  "SLOT_NAMES",
  "ModelSlots",
  "SlotAnchors",
  "bert_slots",
  "decoder_slots",
]

ATTENTION_ADAPTER = "attention_adapter"
OUTPUT_ADAPTER = "output_adapter"
PREFIX = "prefix"
SLOT_NAMES = (ATTENTION_ADAPTER, OUTPUT_ADAPTER, PREFIX)


@dataclasses.dataclass(frozen=True)
class ModelSlots:
  """Where a model's layers are and the sizes the slot methods need (hashable).

  Attributes:
    family: the model family's name, used in errors (``"bert"``, ``"llama"``, ...).
    layer: regex of a layer node's path below ``root`` with one group, the layer index
      (``r"encoder/layer_(\\d+)"``).
    anchors: ``((slot, anchor), ...)``: the anchor leaf's path relative to a layer, a
      regex (``"mlp/(?:experts/)?down_proj/kernel"``): the kernel whose output
      ``attention_adapter`` / ``output_adapter`` follows, the key projection kernel for
      ``prefix`` (its output width is the prefix width ``K * hd``).
    root: '/'-path of the model inside the tree (``""``: the tree is the model; ``None``:
      anywhere, the layer regex may follow any path).
    num_layers: ``L`` if known (checked against the tree).
    hidden_size: ``D`` if known (the adapters' width, checked against the anchors).
    num_kv_heads: ``K`` if known; with ``head_dim`` prefixes are stored ``[P, K, hd]``.
    head_dim: ``hd`` if known.
  """
  family: str
  layer: str
  anchors: tuple[tuple[str, str], ...]
  root: Optional[str] = None
  num_layers: Optional[int] = None
  hidden_size: Optional[int] = None
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None

  def __post_init__(self):
    anchors = dict(self.anchors)
    unknown = sorted(set(anchors) - set(SLOT_NAMES))
    if unknown:
      raise ValueError(f"ModelSlots({self.family}): unknown slots {unknown}; expected {SLOT_NAMES}")
    if re.compile(self.layer).groups != 1:
      raise ValueError(f"ModelSlots({self.family}): the layer regex {self.layer!r} must have "
                       f"exactly one group (the layer index)")
    for slot, rx in anchors.items():
      if re.compile(rx).groups:
        raise ValueError(f"ModelSlots({self.family}): the anchor regex {rx!r} of '{slot}' must "
                         f"not have groups (use (?:...))")
    for name in ("num_layers", "hidden_size", "num_kv_heads", "head_dim"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"ModelSlots({self.family}): {name} must be a positive int, got {v!r}")
    if self.root is not None and (self.root.startswith("/") or self.root.endswith("/")):
      raise ValueError(f"ModelSlots({self.family}): root {self.root!r} must not start or end with '/'")

  def at(self, root: Optional[str]) -> "ModelSlots":
    """The same model placed at ``root`` inside the tree (``""``: the root; ``None``: anywhere)."""
    return dataclasses.replace(self, root=root)

  def anchor(self, slot: str) -> str:
    """The anchor leaf of ``slot`` relative to a layer node (a regex)."""
    anchors = dict(self.anchors)
    if slot not in anchors:
      raise ValueError(f"{self.family} has no '{slot}' slot; its slots: {sorted(anchors)}")
    return anchors[slot]

  @property
  def kv_width(self) -> Optional[int]:
    """``K * hd`` if both are known."""
    if self.num_kv_heads is None or self.head_dim is None:
      return None
    return self.num_kv_heads * self.head_dim

  def layer_regex(self) -> str:
    """Regex (unanchored) of a layer node's full path: group ``layer`` is the path, group 2
    the layer index."""
    if self.root is None:
      lead = "(?:.*/)?"
    elif self.root:
      lead = re.escape(self.root) + "/"
    else:
      lead = ""
    return f"(?P<layer>{lead}(?:{self.layer}))"

  def anchor_regex(self, slot: str) -> str:
    """Regex of the full path of ``slot``'s anchor leaf in every layer (groups ``layer`` and
    the layer index)."""
    return f"^{self.layer_regex()}/(?:{self.anchor(slot)})$"

  def match(self, path: str, slot: str) -> Optional[tuple[str, int]]:
    """``(layer path, layer index)`` if ``path`` is ``slot``'s anchor leaf in a layer, else ``None``."""
    m = re.match(self.anchor_regex(slot), path)
    if m is None:
      return None
    return m["layer"], int(m.group(2))  # group 1 is the whole layer path

  def where(self, slot: str, layers: Optional[Sequence[int]] = None) -> "SlotAnchors":
    """Selection (for ``where=``) of ``slot``'s anchor leaf in every layer, or in ``layers``."""
    self.anchor(slot)
    return SlotAnchors(self, slot, None if layers is None else tuple(sorted({int(i) for i in layers})))

  def slot_path(self, layer_path: str, slot: str) -> str:
    """The path of ``slot`` in the layer node at ``layer_path``."""
    return f"{layer_path}/{slot}"

  def prefix_shape(self, num_prefix: int, width: int) -> tuple[int, ...]:
    """Shape of one stored prefix: ``(P, K, hd)`` if the heads are known, else ``(P, width)``."""
    if self.kv_width is None:
      return (num_prefix, width)
    if self.kv_width != width:
      raise ValueError(f"{self.family}: key projection width {width} != num_kv_heads * head_dim "
                       f"= {self.num_kv_heads} * {self.head_dim}")
    return (num_prefix, self.num_kv_heads, self.head_dim)


@dataclasses.dataclass(frozen=True)
class SlotAnchors:
  """``where=`` predicate ``(path, leaf) -> bool`` of a slot's anchor leaves (readable repr)."""
  model: ModelSlots
  slot: str
  layers: Optional[tuple[int, ...]] = None

  def __call__(self, path: str, leaf=None) -> bool:
    m = self.model.match(path, self.slot)
    return m is not None and (self.layers is None or m[1] in self.layers)

  def __repr__(self):
    which = "every layer" if self.layers is None else f"layers {list(self.layers)}"
    return (f"<{self.slot} anchors of {self.model.family} in {which}: "
            f"{self.model.anchor_regex(self.slot)}>")


def bert_slots(*, num_layers: Optional[int] = None, hidden_size: Optional[int] = None,
               num_heads: Optional[int] = None, head_dim: Optional[int] = None,
               root: Optional[str] = None) -> ModelSlots:
  """BERT's layout (``encoder/layer_{i}``, :mod:`lowrank_jax.models.bert`): the attention
  adapter follows ``attention/output``, the output adapter ``output``, the prefix's width is
  ``attention/key``'s. Sizes are optional (read from the tree where they can be)."""
  return ModelSlots(
      family="bert", layer=r"encoder/layer_(\d+)",
      anchors=((ATTENTION_ADAPTER, "attention/output/kernel"), (OUTPUT_ADAPTER, "output/kernel"),
               (PREFIX, "attention/key/kernel")),
      root=root, num_layers=num_layers, hidden_size=hidden_size, num_kv_heads=num_heads,
      head_dim=head_dim)


def decoder_slots(config=None, *, num_layers: Optional[int] = None,
                  hidden_size: Optional[int] = None, num_kv_heads: Optional[int] = None,
                  head_dim: Optional[int] = None, root: Optional[str] = None,
                  family: str = "decoder") -> ModelSlots:
  """The Llama-layout decoders' (``layers/layer_{i}``, :mod:`lowrank_jax.models.decoder` and
  :mod:`lowrank_jax.models.llama`): the attention adapter follows ``attention/o_proj``, the
  output adapter ``mlp/down_proj`` (``mlp/experts/down_proj``, an ``[E, F, D]`` kernel, in
  a mixture-of-experts layer), the prefix's width is ``attention/k_proj``'s (``K * hd``).

  Args:
    config: optional model config whose attributes give the sizes: ``num_layers``,
      ``hidden_size``, ``num_kv_heads`` (or ``kv_heads``), ``head_dim`` (or ``dim_head``)
      and ``family`` (a ``DecoderConfig`` or ``LlamaConfig``); keyword arguments override.
    num_layers, hidden_size, num_kv_heads, head_dim: the sizes (see :class:`ModelSlots`).
    root: where the model is in the tree.
    family: the name used in errors.
  """
  def attr(*names):
    for n in names:
      v = getattr(config, n, None)
      if v is not None:
        return v
    return None

  return ModelSlots(
      family=str(attr("family") or family), layer=r"layers/layer_(\d+)",
      anchors=((ATTENTION_ADAPTER, "attention/o_proj/kernel"),
               (OUTPUT_ADAPTER, "mlp/(?:experts/)?down_proj/kernel"),
               (PREFIX, "attention/k_proj/kernel")),
      root=root,
      num_layers=num_layers if num_layers is not None else attr("num_layers"),
      hidden_size=hidden_size if hidden_size is not None else attr("hidden_size"),
      num_kv_heads=num_kv_heads if num_kv_heads is not None else attr("num_kv_heads", "kv_heads"),
      head_dim=head_dim if head_dim is not None else attr("head_dim", "dim_head"))
