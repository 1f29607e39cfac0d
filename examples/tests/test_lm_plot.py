"""Tests of examples/lm/plot.py: ``python -m examples.lm.plot RUN_DIR``."""

import json
import pathlib
import subprocess
import sys

import pytest

from examples.lm import plot as plot_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def write_metrics(run_dir: pathlib.Path) -> list[dict]:
  records = [{"step": s, "train_loss": 5.0 / s} for s in range(1, 7)]
  records[2] |= {"val_loss": 2.0, "val_loss_ema": 2.1, "val_loss_bema": 1.9}
  records[5] |= {"val_loss": 1.5, "val_loss_bema": 1.4, "val_loss_avg": 1.4}
  run_dir.mkdir(exist_ok=True)
  (run_dir / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records) + "\n")
  return records


def test_read_metrics(tmp_path):
  records = write_metrics(tmp_path)
  assert plot_lib.read_metrics(tmp_path / "metrics.jsonl") == records
  assert plot_lib.read_metrics(tmp_path / "metrics.jsonl", 3) == records[:3]
  assert plot_lib.read_metrics(tmp_path / "missing.jsonl") == []


def test_the_command_redraws_loss_png(tmp_path):
  write_metrics(tmp_path)
  done = subprocess.run([sys.executable, "-m", "examples.lm.plot",
                         str(tmp_path)], cwd=ROOT, capture_output=True,
                        text=True, check=True)
  assert done.stdout.strip() == f"wrote {tmp_path / 'loss.png'}"
  assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_args_and_errors(tmp_path, capsys):
  assert plot_lib.parse_args([str(tmp_path)]).run_dir == tmp_path
  with pytest.raises(SystemExit):
    plot_lib.parse_args([])
  assert "RUN_DIR" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError, match="no records"):
    plot_lib.main([str(tmp_path)])
  assert not (tmp_path / "loss.png").exists()
