"""The loss curves of a run (RUN_DIR/loss.png) from its metrics.

    python -m examples.lm.plot RUN_DIR

re-draws ``RUN_DIR/loss.png`` from ``RUN_DIR/metrics.jsonl`` (one JSON
object per step: ``train_loss``, and ``val_loss``/``val_loss_ema``/
``val_loss_bema`` at evaluations, and the bias monitor's figures there), as
``train.py`` does after every run.
"""

from __future__ import annotations

import argparse
import json
import pathlib


def read_metrics(path: pathlib.Path, upto: int | None = None) -> list[dict]:
  """The records of a ``metrics.jsonl`` (those up to step ``upto``)."""
  if not path.exists():
    return []
  records = [json.loads(line) for line in path.read_text().splitlines()
             if line.strip()]
  return [r for r in records if upto is None or r["step"] <= upto]


def plot(out: pathlib.Path, records: list[dict]) -> pathlib.Path:
  """Draws the training and validation losses into ``out/loss.png``, and
  beside them the bias monitor's figures if the records have them."""
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top
  monitored = any("noise_scale" in r for r in records)
  fig, axes = plt.subplots(1, 1 + monitored, figsize=(7 + 6 * monitored, 4.5),
                           squeeze=False)
  ax = axes[0, 0]
  ax.plot([r["step"] for r in records], [r["train_loss"] for r in records],
          lw=0.8, alpha=0.7, label="train")
  averages = dict.fromkeys(   # val_loss_ema etc.; _avg repeats one of them
      k[len("val_loss_"):] for r in records for k in r
      if k.startswith("val_loss_") and k != "val_loss_avg")
  curves = [("val_loss", "validation")] + [
      (f"val_loss_{name}", f"validation ({name.upper()} params)")
      for name in averages]
  for key, label in curves:
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
      ax.plot(*zip(*points), "o-", ms=3, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  if monitored:
    plot_monitor(axes[0, 1], records)
  fig.tight_layout()
  path = out / "loss.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_monitor(ax, records: list[dict]) -> None:
  """The monitor's shares (left axis) and noise scale (right, log axis)."""
  def points(key):
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]
  for key, label in (("coupling", "coupling share"),
                     ("jensen", "Jensen share"),
                     ("win_rate", "win rate (Sophia)")):
    if points(key):
      ax.plot(*zip(*points(key)), "o-", ms=3, label=label)
  ax.set(xlabel="step", ylabel="share of the update",
         title="bias monitor (docs/monitor.md)")
  ax.grid(alpha=0.3)
  right = ax.twinx()
  if points("noise_scale"):
    right.plot(*zip(*points("noise_scale")), "k^--", ms=4, lw=0.8,
               label="noise scale B_simple (sequences)")
    right.set_yscale("log")
  right.set_ylabel("noise scale (sequences)")
  lines = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
  ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8)


def parse_args(argv=None) -> argparse.Namespace:
  """Parses ``RUN_DIR`` (nothing is read yet)."""
  p = argparse.ArgumentParser(prog="python -m examples.lm.plot",
                              description=__doc__.split("\n")[0])
  p.add_argument("run_dir", type=pathlib.Path, metavar="RUN_DIR",
                 help="the --out of a train.py run (holds metrics.jsonl)")
  return p.parse_args(argv)


def main(argv=None) -> pathlib.Path:
  """Re-draws ``RUN_DIR/loss.png``; returns its path.

  Raises:
    FileNotFoundError: no records in ``RUN_DIR/metrics.jsonl``.
  """
  run_dir = parse_args(argv).run_dir
  records = read_metrics(run_dir / "metrics.jsonl")
  if not records:
    raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'}: no records")
  path = plot(run_dir, records)
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
