"""A stand-in for ``python -m examples.lm.train`` in the subprocess tests.

Takes the example's flags and writes what a run writes for the benchmarks
(``metrics.jsonl``, ``summary.json``), with losses that are a formula of
the flags: ``final_val_loss = 2 + lr + seed / 1000``, test loss 0.1 higher.
``--lr`` above 1 fails as a diverged run does (train.py's message, exit 1);
``--lr`` 0.5 fails otherwise. Its bias ``monitor``: noise_scale 1 + seed,
coupling 10 lr.
"""

import json
import pathlib
import sys

from examples.lm import train


def main(argv):
  cfg = train.parse_args(argv)
  if cfg.lr > 1:
    sys.exit(f"error: loss is nan at step 3; stopping. The last good "
             f"checkpoint (step None) in {cfg.out} is kept")
  if cfg.lr == 0.5:
    sys.exit("error: something else went wrong")
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  loss = 2 + cfg.lr + cfg.seed / 1000
  (out / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "train_loss": loss + 1 / s, "val_loss": loss})
      + "\n" for s in range(1, cfg.steps + 1)))
  (out / "summary.json").write_text(json.dumps({
      "final_val_loss": loss, "final_eval_loss": loss + 0.1,
      "tokens": cfg.steps, "wall_s": 0.5, "argv": argv,
      "monitor": {"noise_scale": 1.0 + cfg.seed, "coupling": 10 * cfg.lr}}))
  print(f"final validation loss {loss:.4f}")


if __name__ == "__main__":
  main(sys.argv[1:])
