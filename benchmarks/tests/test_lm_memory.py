"""benchmarks/lm_memory.py: its cells and flags, and the committed tables
(docs/scale_out.md, README.md) are its report of the committed results."""

import pytest

from benchmarks import harness
from benchmarks import lm_memory as lm


def test_cells():
  cells = lm.cells()
  # AdamW-BC in every cell, plain AdamW with float32 gradients.
  assert len(cells) == len(set(cells)) == 2 * 2 * 2 * 3 + 2 * 2 * 3
  assert cells[:len(lm.FIRST)] == lm.FIRST
  assert lm.parse_args(["--report-only"]).report_only
  with pytest.raises(SystemExit):
    lm.parse_args(["--max-minutes", "soon"])


def test_the_committed_tables_are_the_report_of_the_results():
  saved = harness.read_json(lm.OUT)
  assert saved["command"].startswith(
      "XLA_FLAGS=--xla_force_host_platform_device_count=64 python -m "
      "benchmarks.lm_memory")
  for r in saved["results"]:
    b = r["bytes"]
    assert b["peak"] == b["argument"] + b["output"] - b["alias"] + b["temp"]
    assert tuple(r["cell"].values()) in lm.cells()
  for page, kwargs in lm.PAGES.items():
    text = (harness.ROOT / page).read_text()
    assert harness.replace_section(
        text, "lm_memory", lm.report(saved, **kwargs)) == text, page
