"""Data sets: the standard-library docstring classification task and tokenisation."""

from lowrank_jax.data.docstrings import (DEFAULT_PACKAGES, DocstringTask, Example,
                                         extract_docstrings, load_docstring_task)
from lowrank_jax.data.tokenization import encode, load_tokenizer
