r"""Train-step cost of the bias-corrected optimizers on the LM example.

Timed interleaved (``harness``) on random tokens: each family's ``std`` and
``bc`` train steps of the example (Sophia refresh / non-refresh, Shampoo
root / non-root: the example's two programs of each), ``plain``
(full-batch gradient, clip, ``optax.adamw``), each arm's bias monitor (the
example's program taken at evaluations, ``/monitor``: ``x step`` is its
cost in steps of that arm), and ``vmap`` over the microbatches of
``gnb_diag``, ``hutchinson_diag`` and ``grad(loss)``.
Reported: medians, per-round ratios, XLA's memory, issue 6's ``TARGET``
(docs/performance.md). Writes ``results/step_time[_quick].json`` and,
without ``--quick``, its RESULTS.md section::

  python -m benchmarks.step_time --presets tiny     # ~10 min on 2 cores
  python -m benchmarks.step_time                    # tiny and small
  python -m benchmarks.step_time --quick            # 3 rounds of tiny
"""

import os

# Before numpy loads SciPy's OpenBLAS, as in update_cost (Shampoo's eigh).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import math

import jax
import jax.numpy as jnp
import optax

import bcopt
from benchmarks import harness
from examples.lm import config
from examples.lm import data
from examples.lm import model
from examples.lm import optimizer
from examples.lm import train

MODULE = "benchmarks.step_time"
FAMILIES = ("adamw", "sophia", "shampoo")
TARGET = 1.15   # issue 6: adamw_bc and sophia_bc (non-refresh) <= 1.15x std
TARGETS = ("adamw/bc", "sophia/bc/nonrefresh")
# The example's step kinds (its periodic step compiles apart): the flag.
KINDS = {"sophia": {"/nonrefresh": False, "/refresh": True},
         "shampoo": {"/nonroot": False, "/root": True}}
GRADIENTS = "estimator/gradients"
MONITOR = "/monitor"   # suffix of the bias monitor's programs


def settings(args, preset: str, name: str) -> config.Config:
  """The example's settings of one optimizer at the benchmark's shape."""
  return train.parse_args(
      ["--preset", preset, "--optimizer", name, "--microbatches",
       str(args.microbatches), "--microbatch-size", str(args.microbatch_size),
       "--seq-len", str(args.seq_len), "--steps", "1000", "--lr", "1e-3"]
      + [w for item in args.model for w in ("--model", item)]
      + ["--fast-compile"] * args.fast_compile)


def finite(loss) -> None:
  if not math.isfinite(float(loss)):
    raise FloatingPointError(f"loss {float(loss)}")


def plain_step(cfg: config.Config, loss_fn):
  """Full-batch gradient + optax.adamw: the step without a microbatch axis."""
  kw = optimizer.optimizer_kwargs(cfg)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(
      optimizer.learning_rate(cfg), b1=kw["b1"], b2=kw["b2"], eps=kw["eps"],
      weight_decay=cfg.weight_decay, mask=optimizer.decay_mask))

  def step(state, windows_MxBxT1, key):
    del key
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(
        params, windows_MxBxT1.reshape(-1, windows_MxBxT1.shape[-1]))
    updates, opt_state = tx.update(grads, opt_state, params)
    return loss, (optax.apply_updates(params, updates), opt_state)

  return step, tx


def runners(args, preset: str, log) -> tuple[dict, dict]:
  """Compiles every program of one preset: (runners, facts by name)."""
  out, facts, key = {}, {}, jax.random.key(0)
  windows = jax.random.randint(jax.random.key(1), (
      args.microbatches, args.microbatch_size, args.seq_len + 1), 0,
                               data.BYTE_VOCAB, jnp.int32)
  for family in args.families:
    for arm, name in (("std", family), ("bc", f"{family}_bc")):
      cfg = settings(args, preset, name)
      model_cfg = config.model_config(cfg, data.BYTE_VOCAB)
      prog = train.build(cfg, model_cfg)
      state = prog.init(jax.random.key(0))
      fact = {"optimizer": name, "params": model.count_params(state["params"]),
              "opt_state_bytes": harness.nbytes(state["opt_state"])}
      for kind, refresh in KINDS.get(family, {"": False}).items():
        label = f"{family}/{arm}{kind}"
        out[label] = harness.Runner(prog.train_steps[refresh], state, windows,
                                    key, check=finite, state_first=True)
        log(f"  {label}: compiled in {out[label].compile_s:.1f} s")
        facts[label] = fact
      label = f"{family}/{arm}{MONITOR}"
      out[label] = harness.Runner(prog.monitor, state, windows, key,
                                  reads_state=True)
      facts[label] = fact
  # The plain step and the estimators on the last step's model and params.
  logits_fn, loss_fn = model.make_loss_fns(model_cfg)
  step, tx = plain_step(settings(args, preset, "adamw"), loss_fn)
  params = state["params"]
  out["plain"] = harness.Runner(step, (params, tx.init(params)), windows, key,
                                check=finite)
  facts["plain"] = {"optimizer": "optax.adamw", "params": fact["params"],
                    "opt_state_bytes": harness.nbytes(tx.init(params))}
  keys = lambda k: jax.random.split(k, args.microbatches)
  over_m = lambda f: jax.vmap(f, in_axes=(None, None, 0, 0))
  for label, f in {
      GRADIENTS: lambda p, w, k: jax.vmap(jax.grad(loss_fn), (None, 0))(p, w),
      "estimator/gnb_diag": lambda p, w, k: over_m(bcopt.gnb_diag)(
          logits_fn, p, w[..., :-1], keys(k)),
      "estimator/hutchinson_diag": lambda p, w, k: over_m(
          bcopt.hutchinson_diag)(loss_fn, p, w, keys(k))}.items():
    out[label] = harness.Runner(lambda s, *a, f=f: (f(*a), s), jnp.zeros(()),
                                params, windows, key, donate=False)
  return out, facts


def measure(args, preset: str, log) -> dict:
  log(f"[step_time] {preset}: M={args.microbatches} B={args.microbatch_size}"
      f" T={args.seq_len}")
  rs, facts = runners(args, preset, log)
  rounds = harness.time_rounds(rs, args.rounds, args.max_seconds,
                               warmup=args.warmup, log=log)
  steps = {name: {**harness.stats(r), "compile_s": round(r.compile_s, 2),
                  "memory": harness.memory(r.compiled), **facts.get(name, {})}
           for name, r in rs.items()}
  ratios = {}
  for name, r in rs.items():
    std = name.replace("/bc", "/std")
    base = GRADIENTS if name.startswith("estimator/") else "plain"
    ratios[name] = {f"vs_{base.split('/')[-1]}": harness.ratios(r, rs[base])}
    if name.endswith(MONITOR):   # against the arm's usual train step
      step = name[:-len(MONITOR)] + next(iter(KINDS.get(
          name.split("/")[0], {"": None})))
      ratios[name]["vs_step"] = harness.ratios(r, rs[step])
    if std != name:
      ratios[name] |= {"vs_std": harness.ratios(r, rs[std]), **{
          f"{k}_minus_std": steps[name][f][k] - steps[std][f][k]
          for f, k in (("memory", "temp"), ("memory", "peak_bound"))},
          "opt_state_bytes_minus_std": (steps[name]["opt_state_bytes"]
                                        - steps[std]["opt_state_bytes"])}
  targets = {name: {"target": TARGET, **{
      k: ratios[name]["vs_std"][k] for k in ("wall_paired", "cpu_paired")}}
             for name in TARGETS if name in ratios}
  for t in targets.values():
    t |= {"met_wall": t["wall_paired"] <= TARGET,
          "met_cpu": t["cpu_paired"] <= TARGET}
  shape = (args.microbatches, args.microbatch_size, args.seq_len)
  return {"preset": preset, "params": steps["plain"]["params"],
          "rounds": rounds, "shape": dict(zip("MBT", shape)),
          "tokens_per_step": math.prod(shape), "steps": steps,
          "ratios": ratios, "targets": targets,
          "microbatch_gradients_bytes": args.microbatches * harness.nbytes(
              rs["plain"].state[0])}


def markdown(res: dict) -> str:
  """One preset's table and target check."""
  pair = lambda r: f"{r['wall_paired']:.3f} / {r['cpu_paired']:.3f}"
  rows = [[name, f"{s['median_ms']:.4g}", f"{s['cpu_median_ms']:.4g}",
           *(pair(r[k]) if k in r else "" for r in [res["ratios"].get(
               name, {})] for k in ("vs_std", "vs_plain", "vs_gradients",
                                    "vs_step")),
           f"{s['memory']['temp'] / 2**20:.1f}",
           f"{s['opt_state_bytes'] / 2**20:.2f}" if "opt_state_bytes" in s
           else ""] for name, s in res["steps"].items()]
  word = lambda met: "met" if met else "missed"
  return "\n".join([
      f"### `{res['preset']}`: {res['params']:,} parameters, M x B x T = "
      + " x ".join(map(str, res["shape"].values()))
      + f", {res['rounds']} rounds", "",
      harness.table(["program", "wall ms", "CPU ms", "x std", "x plain",
                     "x gradients", "x step", "temp MiB", "opt state MiB"],
                    rows), "",
      "Ratios: medians of the per-round ratios, wall / CPU time. Target: at "
      f"most {TARGET}x std" + "".join(
          f"; {name}: wall {t['wall_paired']:.3f} ({word(t['met_wall'])}), "
          f"CPU {t['cpu_paired']:.3f} ({word(t['met_cpu'])})"
          for name, t in res["targets"].items())
      + ". The M microbatch gradients take "
      f"{res['microbatch_gradients_bytes'] / 2**20:.1f} MiB."])


def parse_args(argv=None) -> argparse.Namespace:
  p = harness.parser(MODULE, __doc__)
  add = p.add_argument
  add("--presets", nargs="+", choices=sorted(model.PRESETS),
      help="default: tiny small (tiny with --quick)")
  add("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
  add("--model", action="append", default=[], metavar="FIELD=VALUE",
      help="as in the example")
  add("--microbatches", type=int, default=8)
  add("--microbatch-size", type=int, default=2)
  add("--seq-len", type=int, default=128)
  add("--rounds", type=int, help="default 15 (3 with --quick)")
  add("--max-seconds", type=float, default=900.0, help="per preset (>= 3 "
      "rounds)")
  add("--warmup", type=int, default=2, help="untimed calls per program")
  add("--fast-compile", action="store_true", help="as in the example")
  add("--quick", action="store_true", help="3 rounds of tiny; no RESULTS.md")
  add("--out", help="JSON (default results/step_time[_quick].json)")
  args = p.parse_args(argv)
  args.presets = args.presets or (["tiny"] if args.quick else ["tiny", "small"])
  args.rounds = args.rounds or (3 if args.quick else 15)
  for preset in args.presets:     # the example's own checks, nothing built
    for family in args.families:
      config.validate(settings(args, preset, f"{family}_bc"))
    config.model_config(settings(args, preset, "adamw"), data.BYTE_VOCAB)
  args.out = args.out or str(harness.RESULTS_DIR / (
      f"step_time{'_quick' if args.quick else ''}.json"))
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  env = harness.environment()
  result = {"command": harness.command(MODULE, argv), "environment": env,
            "config": vars(args), "presets": {}}
  for preset in args.presets:
    res = result["presets"][preset] = measure(
        args, preset, lambda s: print(s, flush=True))
    res["markdown"] = markdown(res)
    print(res["markdown"], flush=True)
    harness.write_json(args.out, {**result, "environment": harness.finish(
        env)})   # after each preset
  if not args.quick:
    harness.write_section("step_time", "\n\n".join(
        [f"## Train-step cost (`{result['command']}`)"]
        + [r["markdown"] for r in result["presets"].values()]))
  print(f"wrote {args.out} ({env['wall_s']:.0f} s, load "
        f"{env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f})")
  return result


if __name__ == "__main__":
  main()
