"""Fixtures of the language-model example's tests: a tiny run's flags.

The model is one layer of width 32 (about 18k parameters) on a repetitive
text, so a step compiles in seconds and eight steps lower the loss well.
"""

import dataclasses

import pytest

VERSE = ("To be, or not to be, that is the question:\n"
         "Whether 'tis nobler in the mind to suffer\n") * 100


@dataclasses.dataclass(frozen=True)
class TinyRun:
  """A tiny train.py run on a text file."""

  corpus_path: str   # the repeated verse (byte tokens)
  steps: int = 8

  def flags(self, out, optimizer="adamw", *extra) -> list[str]:
    """train.py flags of the run writing to ``out``; ``extra`` come last."""
    return ["--optimizer", optimizer, "--data", self.corpus_path,
            "--out", str(out), "--model", "num_layers=1",
            "--model", "d_model=32", "--model", "num_heads=2",
            "--model", "num_kv_heads=1", "--model", "d_ff=64",
            "--microbatches", "4", "--microbatch-size", "2", "--seq-len", "32",
            "--eval-batches", "1", "--steps", str(self.steps),
            "--warmup", "0", "--lr", "1e-2", "--eval-every", "4",
            "--curvature-every", "3", "--progress", "off", "--fast-compile",
            *extra]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyRun:
  path = tmp_path_factory.mktemp("corpus") / "verse.txt"
  path.write_text(VERSE)
  return TinyRun(str(path))
