"""One module per PEFT method; each exposes a constructor returning a :class:`Reparam`."""
