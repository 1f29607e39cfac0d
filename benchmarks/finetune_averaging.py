r"""Fine-tuning with iterate averaging: none vs EMA vs BEMA (issue 7).

The experiment of docs/averaging.md on the LM example, as ``lm_runs``
training runs: pretraining, the learning-rate selection, one ``--average
ema,bema`` fine-tune per seed (and an ``--average none`` check), the
``sensitivity_variants`` and each average's best. Writes
``results/finetune_averaging[_quick].json`` (every run's command and
numbers), the PNG next to it and, without ``--quick``, the RESULTS.md
section; finished runs are reused, interrupted ones resumed::

  python -m benchmarks.finetune_averaging            # about an hour, 2 cores
  python -m benchmarks.finetune_averaging --quick    # a few minutes
  python -m benchmarks.finetune_averaging --report-only
"""

import argparse
import json
import math
import pathlib
import time

import jax
import numpy as np

from benchmarks import harness
from benchmarks import lm_runs
from examples.lm import checkpoint
from examples.lm import optimizer

MODULE = "benchmarks.finetune_averaging"
PRETRAIN_PLAYS = "comedies,histories"
FINETUNE_PLAYS = ("hamlet", "othello")
VALIDATION_PLAYS = ("king-lear", "timon-of-athens")
TEST_PLAYS = ("macbeth", "romeo-and-juliet")
METHODS = ("none", "ema", "bema")
NAMES = {"none": "none (last iterate)", "ema": "EMA", "bema": "BEMA"}
PAIRS = (("bema", "none"), ("bema", "ema"), ("ema", "none"))
STATS = ("final", "mean_over_steps")   # the ones paired
SEEDS = (0, 1, 2)
# Averaging hyperparameters: the paper's defaults, fixed, not tuned.
AVERAGING = {"--average-ema-power": 0.5, "--average-bias-power": 0.2,
             "--average-lag": 10.0, "--average-burn-in": 0,
             "--average-every": 1}
# The same eval_windows (eval_batches x microbatches x size) in both phases:
# the pretrained model's final losses are the fine-tune's step 0.
SIZES = {"full": dict(pretrain_steps=600, finetune_steps=400, eval_every=20,
                      eval_windows=128, seeds=SEEDS),
         "quick": dict(pretrain_steps=30, finetune_steps=20, eval_every=5,
                       eval_windows=16, seeds=SEEDS[:2])}
PRETRAIN = dict(microbatches=8, microbatch_size=2, lr=3e-3, warmup=20,
                schedule="cosine")
FINETUNE = dict(microbatches=4, microbatch_size=1, warmup=10,
                schedule="constant")   # --lr: chosen from LR_CANDIDATES
LR_CANDIDATES = (1e-4, 3e-4, 1e-3)
SELECTION_SEED = 100    # the learning-rate selection runs' (not reported)
# Results and run folders, without and with --quick (relative to the root).
RESULTS = tuple(f"benchmarks/results/finetune_averaging{q}.json"
                for q in ("", "_quick"))
RUNS = ("runs/finetune_averaging", "runs/finetune_averaging_quick")


def common_flags(size: dict, phase: dict, eval_test: bool = True) -> list[str]:
  eval_batches = size["eval_windows"] // (phase["microbatches"]
                                          * phase["microbatch_size"])
  return ["--preset", "tiny", "--optimizer", "adamw_bc", "--seq-len", "128",
          "--val-plays", ",".join(VALIDATION_PLAYS),
          "--test-plays", ",".join(TEST_PLAYS),
          *(["--eval-test"] if eval_test else []),
          "--eval-batches", str(eval_batches), "--progress", "off",
          *lm_runs.flags(phase)]


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
  """``curves=False``: evaluated at the end only; ``overrides`` of
  AVERAGING (``tag`` names the run); ``validation_only``: half as often."""
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
          *(lm_runs.flags({**AVERAGING, **(overrides or {})})
            if average != "none" else []),
          *common_flags(size, FINETUNE, eval_test=not validation_only),
          "--out", str(runs / name)]


def run(argv: list[str], runner=None) -> dict:
  """``lm_runs.run``'s record: command, folder, summary, evals, train loss."""
  summary = lm_runs.run(argv, runner)
  if "diverged" in summary:
    raise FloatingPointError(f"{summary['command']}: {summary['diverged']}")
  metrics = lm_runs.metrics(lm_runs.out_dir(argv))
  return {"command": summary["command"], "out": argv[argv.index("--out") + 1],
          "summary": summary, "evals": [r for r in metrics if "val_loss" in r],
          "train_loss": [r["train_loss"] for r in metrics]}


def restored(out: str) -> tuple:
  """``checkpoint.restore_run`` of a run folder (relative to the root)."""
  return checkpoint.restore_run(harness.ROOT / out)


def flat_tree(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel()
                         for x in jax.tree.leaves(tree)])


def displacement(out: str, pretrain_out: str) -> dict:
  """With d = theta_T - theta_0 (last iterate - pretrained): |d|, and per
  average |average - theta_T| and its coefficient along d."""
  cfg, _, fine = restored(out)
  theta = flat_tree(fine["params"])
  d = theta - flat_tree(restored(pretrain_out)[2]["params"])
  result = {"displacement_norm": float(np.linalg.norm(d))}
  for name, avg in optimizer.averaged_params(cfg, fine["opt_state"]).items():
    avg = flat_tree(avg) - theta
    result[f"{name}_distance"] = float(np.linalg.norm(avg))
    result[f"{name}_along_displacement"] = float(avg @ d / (d @ d))
  return result


def raw_agreement(a: dict, b: dict) -> dict:
  """How far the raw trajectories of two runs (records) are apart."""
  pa, pb = ([np.asarray(x) for x in jax.tree.leaves(
      restored(r["out"])[2]["params"])] for r in (a, b))
  held = lambda r: [[e["val_loss"], e["test_loss"]] for e in r["evals"]]
  apart = lambda x, y: float(np.abs(np.subtract(x, y)).max())
  return {"final_params_bitwise_equal": all(map(np.array_equal, pa, pb)),
          "final_params_max_abs_diff": max(map(apart, pa, pb)),
          "final_params_max_abs": max(float(np.abs(x).max()) for x in pa),
          "train_loss_bitwise_equal": a["train_loss"] == b["train_loss"],
          "train_loss_max_abs_diff": apart(a["train_loss"], b["train_loss"]),
          "heldout_loss_max_abs_diff": apart(held(a), held(b))}


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
  """{"steps": [...], method: array (seeds, steps)} of one record per
  seed; step 0 (every method) is ``start``, the pretrained model's losses."""
  steps = [0] + [r["step"] for r in runs[0]["evals"]]
  if any([0] + [e["step"] for e in r["evals"]] != steps for r in runs):
    raise ValueError("the runs were evaluated at different steps")
  return {"steps": steps, **{m: np.array(
      [[start[f"{split}_loss"]] + [e[method_key(split, m)] for e in r["evals"]]
       for r in runs]) for m in METHODS}}


def summarize(c: dict) -> dict:
  """Per-method and paired statistics of ``curves`` output."""
  steps = c["steps"]
  per_seed = {m: {  # mean, lowest, its first step: after the shared step 0
      "final": c[m][:, -1].tolist(),
      "mean_over_steps": c[m][:, 1:].mean(axis=1).tolist(),
      "best": c[m][:, 1:].min(axis=1).tolist(),
      "best_step": [int(steps[1:][i]) for i in c[m][:, 1:].argmin(axis=1)],
  } for m in METHODS}
  diff = lambda a, b, k: np.subtract(per_seed[a][k], per_seed[b][k])
  return {
      "per_seed": per_seed,
      "stats": {m: {k: lm_runs.mean_se(v) for k, v in per_seed[m].items()}
                for m in METHODS},
      "paired": {f"{a}-{b}": {
          **{k: lm_runs.mean_se(diff(a, b, k)) for k in STATS},
          "curve": lm_runs.mean_se(c[a] - c[b])} for a, b in PAIRS},
      "curve": {m: lm_runs.mean_se(c[m]) for m in METHODS}, "steps": steps}


def verdict(diff: dict) -> str:
  """Words for a paired difference (negative: the first method is better)."""
  mean, se = diff["mean"], diff["se"]
  word = "lower" if mean < 0 else "higher"
  if se is None or not math.isfinite(se):
    return f"{word} (one seed)"
  return f"{word} ({'more' if abs(mean) > 2 * se else 'less'} than 2 se from 0)"


def claims(paired: dict) -> str:
  """BEMA against the last iterate and EMA (final and mean), in words."""
  return "; ".join(
      f"{what} is {verdict(paired['bema-none'][k])} than the last iterate's "
      f"and {verdict(paired['bema-ema'][k])} than EMA's (BEMA − EMA "
      f"{lm_runs.fmt(paired['bema-ema'][k])})" for what, k in (
          ("BEMA's final test loss", "final"),
          ("its mean over the fine-tune", "mean_over_steps")))


def method_table(s: dict, val: dict | None = None, variant=None) -> str:
  """Each method's test losses and their differences to none (``val``:
  with the step of the lowest test loss and the final validation loss)."""
  fmt, names = lm_runs.fmt, {m: NAMES[m] + (
      f" ({variant[m]})" if variant and m != "none" else "") for m in METHODS}
  return harness.table(
      ["method", "final test loss", "mean test loss over the fine-tune",
       "lowest test loss along it"]
      + ["at step", "final validation loss"] * bool(val)
      + ["minus none, final", "minus none, mean"],
      [[names[m], *(fmt(s["stats"][m][k]) for k in (*STATS, "best")),
        *((fmt(s["stats"][m]["best_step"], 0), fmt(val["stats"][m]["final"]))
          if val else ()),
        *(fmt(s["paired"][f"{m}-none"][k]) if m != "none" else ""
          for k in STATS)] for m in METHODS])


def markdown(payload: dict) -> str:
  """The ``finetune_averaging`` section of RESULTS.md (without markers)."""
  s, sz, sel = payload["summary"]["test"], payload["sizes"], payload["selected"]
  avg, plays, g = (payload["averaging"], payload["plays"],
                   payload["raw_vs_average_none"])
  mean = lambda ws, k: float(np.mean([w[k] for w in ws]))
  path = lambda k: mean(payload["final_averages_vs_path"], k)
  along = lambda m: mean(sel["final_averages_vs_path"][sel["variant"][m]],
                         f"{m}_along_displacement")
  raw = s["curve"]["none"]["mean"]
  low = int(np.argmin(raw[1:])) + 1
  power = avg["--average-bias-power"]
  alpha = (avg["--average-lag"] + sz["finetune_steps"]
           - avg["--average-burn-in"]) ** -power
  return "\n".join([
      "## Fine-tuning with iterate averaging: none vs EMA vs BEMA", "",
      "`benchmarks/finetune_averaging.py` (issue 7; the experiment: "
      f"`docs/averaging.md`). The `tiny` model ({payload['params']:,} "
      f"parameters, bytes): {sz['pretrain_steps']} pretraining steps on the "
      f"{plays['pretrain'].replace(',', ' and ')}, then "
      f"{sz['finetune_steps']} fine-tuning steps on "
      f"{', '.join(plays['finetune'])} (AdamW-BC, 4 x 1 x 128 = 512 tokens "
      f"per step, constant learning rate {payload['lr']:g}), "
      f"{len(payload['seeds'])} seeds; every {sz['eval_every']} steps the "
      f"test ({', '.join(plays['test'])}; reported) and validation "
      f"({', '.join(plays['validation'])}) losses. Averaging at the paper's "
      "defaults, fixed beforehand: " + ", ".join(
          f"{k.removeprefix('--average-')} {x:g}" for k, x in avg.items())
      + ". Learning rate: the last iterate's lowest final validation loss "
      f"(seed {payload['lr_selection']['seed']}, not reported) among "
      + ", ".join(f"{k} ({r['final_val_loss']:.4f})"
                  for k, r in payload["lr_selection"]["runs"].items())
      + ". Mean ± se over seeds; differences (negative: better) paired: one "
      "trajectory per seed gives all three read-outs, its raw iterates "
      "those of an `--average none` run (seed 0) " + (
          "bitwise." if g["final_params_bitwise_equal"]
          and g["train_loss_bitwise_equal"] else "up to float rounding "
          f"(parameters within {g['final_params_max_abs_diff']:.1e} of up to "
          f"{g['final_params_max_abs']:.2f}, held-out losses within "
          f"{g['heldout_loss_max_abs_diff']:.1e}, train losses within "
          f"{g['train_loss_max_abs_diff']:.1e})."), "",
      f"Pretrained model (step 0): test loss "
      f"{payload['pretrained']['test_loss']:.4f}, validation "
      f"{payload['pretrained']['val_loss']:.4f} nats/byte.", "",
      method_table(s, payload["summary"]["val"]), "",
      "Against the paper's claim (arXiv:2508.00180: BEMA converges faster "
      f"and ends better than EMA and no averaging): {claims(s['paired'])}. "
      "Along the fine-tune's displacement d = theta_T - theta_0 (|d| = "
      f"{path('displacement_norm'):.2f}), the final EMA - theta_T is "
      f"{path('ema_along_displacement'):+.3f} d (norm "
      f"{path('ema_distance'):.2f}) and BEMA - theta_T "
      f"{path('bema_along_displacement'):+.3f} d (norm "
      f"{path('bema_distance'):.2f}), mean over seeds; alpha_s = (lag + "
      f"s)^-{power:g} is {alpha:.2f} at the last step. The raw test loss "
      f"(mean over seeds) is lowest at step {s['steps'][low]} "
      f"({raw[low]:.4f}) and ends at {raw[-1]:.4f}.", "",
      f"Sensitivity on validation (seed {payload['sensitivity']['seed']}, "
      "same rate; bias power: BEMA only), final and mean loss:", "",
      harness.table(
          ["variant", "none final", "EMA final", "BEMA final", "none mean",
           "EMA mean", "BEMA mean"],
          [[label, *(f"{var['val'][m][k][0]:.4f}" for k in STATS
                     for m in METHODS)]
           for label, var in payload["sensitivity"]["variants"].items()]), "",
      "Each average with its variant that ends lowest there, on the test "
      "plays:", "",
      method_table(sel["test"], variant=sel["variant"]), "",
      f"With these variants {claims(sel['test']['paired'])}. Their final "
      f"averages sit at {along('ema'):+.3f} d (EMA) and {along('bema'):+.3f}"
      " d (BEMA) from the last iterate" + (
          ", between the pretrained and the fine-tuned parameters."
          if all(-1 < along(m) < 0 for m in ("ema", "bema")) else "."), "",
      "![fine-tuning loss curves](results/finetune_averaging.png)", "",
      f"Reproduce: `python -m {MODULE}` ({payload['wall_s'] / 60:.0f} min of "
      "training on 2 shared CPU cores: " + ", ".join(
          f"{part} {sec / 60:.1f}"
          for part, sec in payload["wall_s_by_part"].items())
      + " min; finished runs are reused; every run's command is in "
      "`results/finetune_averaging.json`)."])


def plot(payload: dict, path: pathlib.Path) -> None:
  """Test-loss curves (mean ± se) and the paired differences over steps."""
  s, sel = payload["summary"]["test"], payload["selected"]
  steps = np.array(s["steps"])
  colors = {"none": "C0", "ema": "C1", "bema": "C2", "bema-none": "C2",
            "ema-none": "C1", "bema-ema": "C3"}
  pair_name = lambda k: k.replace("-", " − ").upper().replace("NONE", "none")
  fig, (ax, bx) = lm_runs.subplots(1, 2, figsize=(12, 4.5))

  def band(axis, curve, key, label, first=0):
    mean, se = (np.array(curve[q])[first:] for q in ("mean", "se"))
    axis.plot(steps[first:], mean, "o-", ms=2.5, color=colors[key],
              label=label)
    if np.isfinite(se).all():
      axis.fill_between(steps[first:], mean - se, mean + se,
                        color=colors[key], alpha=0.2)

  for m in METHODS:
    band(ax, s["curve"][m], m, m.upper() if m != "none" else NAMES[m])
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
  ax.set(xlabel="fine-tuning step", ylabel="test loss (nats/byte), mean ± "
         f"se over {len(payload['seeds'])} seeds")
  for k in ("bema-none", "ema-none", "bema-ema"):
    band(bx, s["paired"][k]["curve"], k, pair_name(k), first=1)
  if sel["variant"]["bema"] != "defaults":
    for k in ("bema-none", "bema-ema"):
      bx.plot(steps[1:], sel["test"]["paired"][k]["curve"]["mean"][1:], "--",
              color=colors[k], lw=1.2,
              label=pair_name(k) + " (selected variants)")
  bx.axhline(0, color="k", lw=0.8)
  bx.set_title("paired differences (negative: first is better)", fontsize=9)
  bx.set(xlabel="fine-tuning step", ylabel="test-loss difference")
  for a in (ax, bx):
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
  lm_runs.save_figure(fig, path, dpi=120)


def report(payload: dict, png: pathlib.Path, section: bool) -> None:
  """Writes the PNG and (if ``section``) the RESULTS.md section."""
  plot(payload, png)
  text = markdown(payload)
  print(text)
  if section:
    harness.write_section("finetune_averaging", text)


def parse_args(argv=None) -> argparse.Namespace:
  """The flags, with ``size``, ``runs_dir`` and the output paths."""
  args = lm_runs.parser(MODULE, __doc__, "tiny sizes, 2 seeds (a smoke "
                        "test); *_quick outputs, RESULTS.md left alone",
                        RESULTS, RUNS).parse_args(argv)
  args.size = SIZES["quick" if args.quick else "full"]
  lm_runs.paths(args, RESULTS, RUNS)   # runs_dir relative: in the commands
  return args


def main(argv=None, runner=None) -> dict:
  args = parse_args(argv)
  if args.report_only:
    payload = json.loads(args.results.read_text())
    report(payload, args.png, not args.quick)
    return payload
  size, seeds, t0 = args.size, args.size["seeds"], time.time()
  fine_run = lambda *a, **k: run(finetune_argv(size, args.runs_dir, *a, **k),
                                 runner)
  pre = run(pretrain_argv(size, args.runs_dir), runner)
  selection = {lr: fine_run(SELECTION_SEED, lr, "none", curves=False)
               for lr in LR_CANDIDATES}
  lr = select_lr(selection)
  print(f"learning rate {lr:g} (final validation loss of the selection "
        "runs: " + ", ".join(f"{k:g}: {r['summary']['final_val_loss']:.4f}"
                             for k, r in selection.items()) + ")")
  fine = [fine_run(seed, lr) for seed in seeds]
  check = fine_run(seeds[0], lr, "none")
  tags = sensitivity_variants(size)
  variants = {label: (overrides, fine_run(
      SELECTION_SEED, lr, overrides=overrides, tag=tag, validation_only=True))
              for label, (tag, overrides) in tags.items()}
  start = {k: pre["evals"][-1][k] for k in ("val_loss", "test_loss")}
  # Each average's variant with the lowest final validation loss, then run
  # on the reported seeds (the defaults reuse the main runs).
  val_final = {label: summarize(curves([r], start, "val"))["per_seed"]
               for label, (_, r) in variants.items()}
  chosen = {m: select_variant(val_final, m) for m in ("ema", "bema")}
  variant_runs = {label: fine if label == "defaults" else [
      fine_run(seed, lr, overrides=tags[label][1], tag=tags[label][0])
      for seed in seeds] for label in dict.fromkeys(chosen.values())}
  chosen_curves = curves(fine, start, "test")
  for m, label in chosen.items():
    chosen_curves[m] = curves(variant_runs[label], start, "test")[m]
  parts = {"pretraining": [pre],
           "learning-rate selection": list(selection.values()),
           "seeds": fine, "--average none check": [check],
           "sensitivity": [r for _, r in variants.values()],
           "selected variants": [r for label, rs in variant_runs.items()
                                 if label != "defaults" for r in rs]}
  payload = {
      "benchmark": "finetune_averaging", "quick": args.quick,
      "sizes": {k: v for k, v in size.items() if k != "seeds"},
      "seeds": list(seeds), "pretrain": PRETRAIN, "finetune": FINETUNE,
      "averaging": AVERAGING, "lr": lr,
      "lr_selection": {
          "seed": SELECTION_SEED, "criterion": "final_val_loss (raw)",
          "runs": {f"{k:g}": {"final_val_loss": r["summary"]["final_val_loss"],
                              "command": r["command"]}
                   for k, r in selection.items()}},
      "plays": {"pretrain": PRETRAIN_PLAYS, "finetune": FINETUNE_PLAYS,
                "validation": VALIDATION_PLAYS, "test": TEST_PLAYS},
      "params": pre["summary"]["params"], "pretrained": start,
      "raw_vs_average_none": raw_agreement(fine[0], check),
      "final_averages_vs_path": [displacement(r["out"], pre["out"])
                                 for r in fine],
      "summary": {split: summarize(curves(fine, start, split))
                  for split in ("test", "val")},
      "sensitivity": {"seed": SELECTION_SEED, "split": "val", "variants": {
          label: {"overrides": overrides, "command": r["command"],
                  "val": val_final[label]}
          for label, (overrides, r) in variants.items()}},
      "selected": {"variant": chosen, "test": summarize(chosen_curves),
                   "final_averages_vs_path": {
                       label: [displacement(r["out"], pre["out"]) for r in rs]
                       for label, rs in variant_runs.items()},
                   "runs": {label: [r["command"] for r in rs]
                            for label, rs in variant_runs.items()}},
      "runs": {"pretrain": pre, **{f"finetune_seed{s}": r for s, r in
                                   zip(seeds, fine)},
               f"finetune_seed{seeds[0]}_none": check},
      "wall_s_by_part": {part: round(sum(r["summary"]["wall_s"] for r in rs),
                                     1) for part, rs in parts.items()},
      "script_wall_s": round(time.time() - t0, 1),
  }
  payload["wall_s"] = round(sum(payload["wall_s_by_part"].values()), 1)
  payload["command"] = harness.command(MODULE, argv)
  harness.write_json(args.results, payload)
  report(payload, args.png, not args.quick)
  print(f"wrote {args.results}")
  return payload


if __name__ == "__main__":
  main()
