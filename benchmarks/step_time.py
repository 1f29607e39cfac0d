r"""Train-step cost of the bias-corrected optimizers on the LM example.

Whole train steps of ``examples/lm/train.py`` (built by its own ``build``:
per-microbatch gradients by ``vmap``, on Sophia's refresh steps the GNB
curvature of every microbatch, ``bcopt.clip_by_global_norm``, the optimizer,
``apply_updates``; parameters and optimizer state donated), for each family's
``std`` arm (``--optimizer FAMILY``: cross-fit and correction off) and ``bc``
arm (``--optimizer FAMILY_bc``), at the same examples per step (M
microbatches x B sequences x T tokens). Also timed: a ``plain`` step, what one
writes without bcopt: the gradient of the mean loss over the whole batch (no
microbatch axis), ``optax.clip_by_global_norm`` and ``optax.adamw`` with the
same hyperparameters and schedule.

Sophia is timed on refresh steps (curvature) and non-refresh steps (cached
inverse): two compiled steps. Shampoo's root steps (eigendecompositions
under ``lax.cond``, every 10th step) and non-root steps are the same compiled
step; the state's step counter is set before each call so that the call is a
root (or a non-root) step.

Method: one process; every step compiled once with
``jax.jit(...).lower(...).compile()`` (whose ``memory_analysis()`` gives the
compiled memory: arguments, outputs, donated aliases and XLA's temporary
buffers) and the compiled executable called with its state fed back. After
two warm-up calls each, rounds in which every step runs once (order shuffled
per round), each call timed with ``block_until_ready`` in wall time and in
process CPU time (all threads; robust on a shared machine, where wall time
includes waiting for a core). Reported: per-step medians, and the median over
rounds of the per-round ratio ``bc / std`` (and ``/ plain``).

Usage::

  python benchmarks/step_time.py --presets tiny           # ~10 min on 2 cores
  python benchmarks/step_time.py                          # tiny and small
  python benchmarks/step_time.py --quick                  # 3 rounds, tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bcopt
from examples.lm import data as data_lib
from examples.lm import model as model_lib
from examples.lm import train

sys.path.insert(0, str(ROOT / "benchmarks"))
import lm_quality as lq  # pylint: disable=g-import-not-at-top
import optimizer_overhead as oo  # pylint: disable=g-import-not-at-top

FAMILIES = ("adamw", "sophia", "shampoo")
TARGET = 1.15   # issue 6: adamw_bc and sophia_bc (non-refresh) <= 1.15x std


def environment() -> dict:
  """optimizer_overhead's environment plus the git state of the code."""
  return {**oo.environment(),
          "git": lq.git_state()}   # of the code imported by this process


def train_args(preset: str, optimizer: str, shape: dict) -> argparse.Namespace:
  return train.parse_args([
      "--preset", preset, "--optimizer", optimizer,
      "--microbatches", str(shape["M"]), "--microbatch-size", str(shape["B"]),
      "--seq-len", str(shape["T"]), "--steps", "1000", "--lr", "1e-3"])


def plain_step(args, cfg):
  """Full-batch gradient + optax.adamw: the step without a microbatch axis."""
  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0))))
  _, loss_fn = train.make_loss_fns(graphdef)
  _, kwargs = train.optimizer_kwargs(args)
  tx = optax.chain(
      optax.clip_by_global_norm(args.clip_norm),
      optax.adamw(train.learning_rate(args), b1=kwargs["b1"], b2=kwargs["b2"],
                  eps=kwargs["eps"], weight_decay=args.weight_decay,
                  mask=train.decay_mask))

  def step(params, opt_state, windows_MxBxT1, key):
    del key
    windows_NxT1 = windows_MxBxT1.reshape(-1, windows_MxBxT1.shape[-1])
    loss, grads = jax.value_and_grad(loss_fn)(params, windows_NxT1)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, jax.jit(step, donate_argnums=(0, 1))


def set_shampoo_count(opt_state, count: int):
  """The state with Shampoo's step counter set (the next call is step count+1)."""
  def fix(x):
    if isinstance(x, bcopt.ScaleByShampooBCState):
      return x._replace(count=jnp.asarray(count, x.count.dtype))
    return x
  return jax.tree.map(fix, opt_state, is_leaf=lambda x: isinstance(
      x, bcopt.ScaleByShampooBCState))


def nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Timer:
  """One compiled step with its own carried state."""

  name: str            # e.g. "sophia/bc/refresh"
  compiled: object
  state: list          # [params, opt_state]
  prepare: object = None   # opt_state -> opt_state before each call
  wall: list = dataclasses.field(default_factory=list)
  cpu: list = dataclasses.field(default_factory=list)

  def call(self, windows, key, record=True):
    params, opt_state = self.state
    if self.prepare is not None:
      opt_state = self.prepare(opt_state)
    jax.block_until_ready((params, opt_state))
    c0, w0 = time.process_time(), time.perf_counter()
    params, opt_state, loss = self.compiled(params, opt_state, windows, key)
    jax.block_until_ready((params, opt_state, loss))
    w1, c1 = time.perf_counter(), time.process_time()
    self.state = [params, opt_state]
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f"{self.name}: loss {float(loss)}")
    if record:
      self.wall.append(w1 - w0)
      self.cpu.append(c1 - c0)


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {f.replace("_size_in_bytes", "_bytes"): int(getattr(m, f))
         for f in fields if hasattr(m, f)}
  # Live at the peak, at most: inputs + non-aliased outputs + temporaries.
  out["peak_bound_bytes"] = (out["argument_bytes"] + out["output_bytes"]
                             - out["alias_bytes"] + out["temp_bytes"])
  return out


def make_timers(preset: str, shape: dict, log) -> tuple:
  """Compiles every step of one preset: (timers, per-step facts, batch, key)."""
  timers, facts = [], {}
  corpus = data_lib.load_corpus(None, vocab_size=None, seq_len=shape["T"])
  windows = jax.device_put(data_lib.train_batch(
      corpus.train, seed=0, step=1, noise=0.0, microbatches=shape["M"],
      batch_size=shape["B"], seq_len=shape["T"]))
  key = jax.random.key(0)
  for family in FAMILIES:
    for arm, optimizer in (("std", family), ("bc", f"{family}_bc")):
      args = train_args(preset, optimizer, shape)
      cfg = train.model_config(args, corpus.vocab_size)
      prog = train.build(args, cfg)
      state = prog.init(jax.random.key(0))
      params, opt_state = state["params"], state["opt_state"]
      kinds = {"sophia": (("nonrefresh", False), ("refresh", True))}.get(
          family, (("step", False),))
      for kind, refresh in kinds:
        t0, c0 = time.perf_counter(), time.process_time()
        compiled = prog.train_steps[refresh].lower(
            params, opt_state, windows, key).compile()
        compile_s = (time.perf_counter() - t0, time.process_time() - c0)
        if family == "shampoo":
          for kind2, count in (("nonroot", 1), ("root", 0)):
            name = f"{family}/{arm}/{kind2}"
            timers.append(Timer(name, compiled, [
                jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state)],
                prepare=lambda s, c=count: set_shampoo_count(s, c)))
            facts[name] = {"memory": memory(compiled)}
        else:
          name = f"{family}/{arm}/{kind}" if family == "sophia" else f"{family}/{arm}"
          timers.append(Timer(name, compiled, [
              jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state)]))
          facts[name] = {"memory": memory(compiled)}
        log(f"  compiled {family}/{arm}/{kind} in {compile_s[0]:.0f} s "
            f"({compile_s[1]:.0f} s CPU)")
      for name in facts:
        if name.startswith(f"{family}/{arm}"):
          facts[name].update(optimizer=optimizer,
                             params=model_lib.count_params(params),
                             opt_state_bytes=nbytes(opt_state),
                             param_bytes=nbytes(params))
  # The plain step: no microbatch axis, optax.adamw.
  args = train_args(preset, "adamw", shape)
  cfg = train.model_config(args, corpus.vocab_size)
  tx, step = plain_step(args, cfg)
  params = nnx.to_pure_dict(nnx.state(
      model_lib.Transformer(cfg, rngs=nnx.Rngs(jax.random.key(0))), nnx.Param))
  opt_state = tx.init(params)
  compiled = step.lower(params, opt_state, windows, key).compile()
  timers.insert(0, Timer("plain", compiled, [params, opt_state]))
  facts["plain"] = {"memory": memory(compiled), "optimizer": "optax.adamw",
                    "params": model_lib.count_params(params),
                    "opt_state_bytes": nbytes(opt_state),
                    "param_bytes": nbytes(params)}
  return timers, facts, windows, key


def median_ratio(a: list, b: list) -> float:
  return float(np.median(np.asarray(a) / np.asarray(b)))


def measure(preset: str, shape: dict, rounds: int, max_seconds: float,
            log) -> dict:
  log(f"[step_time] {preset}: M={shape['M']} B={shape['B']} T={shape['T']}")
  timers, facts, windows, key = make_timers(preset, shape, log)
  for t in timers:           # warm-up
    t.call(windows, key, record=False)
    t.call(windows, key, record=False)
  rng = np.random.default_rng(0)
  t_start = time.time()
  done = 0
  for r in range(rounds):
    for i in rng.permutation(len(timers)):
      timers[i].call(windows, key)
    done = r + 1
    log(f"  round {done}/{rounds}: " + ", ".join(
        f"{t.name} {t.wall[-1]:.3f}" for t in timers))
    if done >= 3 and time.time() - t_start > max_seconds:
      break
  by = {t.name: t for t in timers}
  steps = {}
  for t in timers:
    steps[t.name] = {
        **facts[t.name], "rounds": len(t.wall),
        "wall_median_s": float(np.median(t.wall)),
        "wall_quartiles_s": [float(q) for q in np.percentile(t.wall, [25, 75])],
        "cpu_median_s": float(np.median(t.cpu)),
        "wall_s": [round(x, 5) for x in t.wall],
        "cpu_s": [round(x, 5) for x in t.cpu]}
  ratios = {}
  for name, t in by.items():
    if name == "plain" or "/bc" not in name:
      continue
    std = by[name.replace("/bc", "/std")]
    mem_bc, mem_std = facts[name]["memory"], facts[std.name]["memory"]
    ratios[name] = {
        "vs": std.name,
        "wall_ratio": median_ratio(t.wall, std.wall),
        "cpu_ratio": median_ratio(t.cpu, std.cpu),
        "wall_ratio_vs_plain": median_ratio(t.wall, by["plain"].wall),
        "cpu_ratio_vs_plain": median_ratio(t.cpu, by["plain"].cpu),
        "temp_bytes_bc_minus_std": mem_bc["temp_bytes"] - mem_std["temp_bytes"],
        "opt_state_bytes_bc_minus_std": (facts[name]["opt_state_bytes"]
                                         - facts[std.name]["opt_state_bytes"]),
    }
  for name in ("adamw/std", "sophia/std/nonrefresh", "shampoo/std/nonroot"):
    ratios[name] = {"vs": "plain",
                    "wall_ratio": median_ratio(by[name].wall, by["plain"].wall),
                    "cpu_ratio": median_ratio(by[name].cpu, by["plain"].cpu)}
  n_params = facts["plain"]["params"]
  microbatch_grad_bytes = shape["M"] * facts["plain"]["param_bytes"]
  extra = (facts["adamw/std"]["memory"]["temp_bytes"]
           - facts["plain"]["memory"]["temp_bytes"])
  return {
      "preset": preset, "shape": shape, "params": n_params,
      "tokens_per_step": shape["M"] * shape["B"] * shape["T"],
      "steps": steps, "ratios": ratios,
      "targets": {name: {"target": TARGET,
                         "wall_ratio": ratios[name]["wall_ratio"],
                         "cpu_ratio": ratios[name]["cpu_ratio"],
                         "met_cpu": ratios[name]["cpu_ratio"] <= TARGET,
                         "met_wall": ratios[name]["wall_ratio"] <= TARGET}
                  for name in ("adamw/bc", "sophia/bc/nonrefresh")},
      "microbatch_gradients": {
          "M_x_param_bytes": microbatch_grad_bytes,
          "temp_bytes_adamw_std_minus_plain": extra,
          "note": "temp_bytes of the vmapped-gradient step (train.py adamw, "
                  "cross-fit off) minus the full-batch optax.adamw step"},
  }


def print_summary(res: dict) -> None:
  print(f"\n{res['preset']}: {res['params']:,} params, "
        f"{res['tokens_per_step']} tokens/step")
  print(f"{'step':26} {'wall ms':>9} {'cpu ms':>9} {'temp MiB':>9} "
        f"{'state MiB':>9}")
  for name, s in res["steps"].items():
    print(f"{name:26} {1e3 * s['wall_median_s']:9.1f} "
          f"{1e3 * s['cpu_median_s']:9.1f} "
          f"{s['memory']['temp_bytes'] / 2**20:9.1f} "
          f"{s['opt_state_bytes'] / 2**20:9.2f}")
  print(f"{'ratio (median per round)':26} {'wall':>9} {'cpu':>9} "
        f"{'wall/plain':>10} {'cpu/plain':>10}")
  for name, r in res["ratios"].items():
    label = f"{name} / {'plain' if r['vs'] == 'plain' else 'std'}"
    print(f"{label:26} "
          f"{r['wall_ratio']:9.3f} {r['cpu_ratio']:9.3f} "
          f"{r.get('wall_ratio_vs_plain', float('nan')):10.3f} "
          f"{r.get('cpu_ratio_vs_plain', float('nan')):10.3f}")
  mg = res["microbatch_gradients"]
  print(f"microbatch gradients: M x params x 4 B = "
        f"{mg['M_x_param_bytes'] / 2**20:.1f} MiB; temp(adamw std) - "
        f"temp(plain) = {mg['temp_bytes_adamw_std_minus_plain'] / 2**20:.1f} MiB")


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", nargs="+", default=["tiny", "small"],
                 choices=sorted(model_lib.PRESETS))
  p.add_argument("--microbatches", type=int, default=8)
  p.add_argument("--microbatch-size", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--max-seconds", type=float, default=900.0,
                 help="per preset: stop the rounds after this (>= 3 rounds)")
  p.add_argument("--quick", action="store_true", help="3 rounds of tiny")
  p.add_argument("--out", type=pathlib.Path)
  args = p.parse_args(argv)
  if args.quick:
    args.presets, args.rounds = ["tiny"], 3
  out = args.out or ROOT / "benchmarks" / "results" / (
      "step_time_quick.json" if args.quick else "step_time.json")
  shape = {"M": args.microbatches, "B": args.microbatch_size,
           "T": args.seq_len}
  env = environment()
  log = lambda s: print(s, flush=True)
  t0, c0 = time.time(), time.process_time()
  results = {"command": "python benchmarks/step_time.py " + " ".join(
      shlex.quote(a) for a in argv), "environment": env, "presets": {}}
  for preset in args.presets:
    res = measure(preset, shape, args.rounds, args.max_seconds, log)
    results["presets"][preset] = res
    print_summary(res)
    env["loadavg_end"] = list(os.getloadavg())
    env["wall_s"] = round(time.time() - t0, 1)
    env["process_cpu_s"] = round(time.process_time() - c0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")   # after each preset
  print(f"\nwrote {out} ({env['wall_s']:.0f} s, load "
        f"{env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f})")


if __name__ == "__main__":
  main()
