"""Interoperability with the PyTorch ecosystem's file formats (no torch import)."""
