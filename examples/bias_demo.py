"""The bias meter: how biased is an Adam update, and what removes the bias?

    python examples/bias_demo.py           # 48 configurations, ~30 s of CPU
    python examples/bias_demo.py --quick   # M in {4, 16}, 1/4 of the draws
    python examples/bias_demo.py --b2 0.9 0.95 0.99 0.999  # a b2 axis

A Monte Carlo on a synthetic problem whose population quantities are known in
closed form. For every cross-fit scheme (standard, twofold, symmetric, loo) x
inverse correction (none, jackknife, paper) x number of microbatches M in
{4, 8, 16, 32} it estimates the expected update ``E[u]`` of
``bcopt.scale_by_adam_bc`` and its distance to the population update ``u*``,
the update Adam would take if it knew the expected gradient and the expected
preconditioner. Each configuration is one jitted update, vmapped over the
draws.

Problem
-------
``d = 64`` coordinates. One step sees a batch split into M microbatches with
i.i.d. Gaussian gradients ``g_j ~ N(mu, M diag(sigma^2))``, so the full-batch
mean ``gbar ~ N(mu, diag(sigma^2))`` whatever M is: the same batch, split M
ways. (Each draw is built from 32 unit normals shared by all M and all
configurations, so the standard update is exactly the same for every M.) The
coordinates mix signal-to-noise ratios ``|mu_i| / sigma_i`` from 0.05 to 2
(log-spaced, random signs) with scales ``sigma_i`` over three decades.

The Adam state (b1 0.9, b2 0.95, eps 1e-8) is that of step ``t - 1`` with
the momentum at the population mean and a second moment that remembers
gradients ``kappa`` times larger (in square) than today's, as when the
gradient norm falls early in training::

    mu_state = (1 - b1^(t-1)) mu
    nu_state = (1 - b2^(t-1)) kappa (mu^2 + sigma^2)

Target
------
A preconditioned update is ``u = N(a) F(P(s))``: a numerator ``N`` of a mean
gradient ``a`` times the inverse ``F`` of a preconditioner ``P`` built from a
statistic ``s``. The target has neither coupling nor Jensen bias,
``u* = N(E[a]) F(E[P(s)])``, with the full-batch statistic ``s = gbar^2``.
In closed form, with ``w1 = (1 - b1) / (1 - b1^t)`` and ``w2 = (1 - b2) /
(1 - b2^t)`` the weights of today's batch in the two moments::

    N(E[a]) = (b1 mu_state + (1 - b1) mu) / (1 - b1^t) = mu
    E[P(s)] = (b2 nu_state + (1 - b2) E[gbar^2]) / (1 - b2^t)
            = (mu^2 + sigma^2) ((1 - w2) kappa + w2)
    u*      = mu / (sqrt(E[P(s)]) + eps)

Reading the tables
------------------
The first table is the relative bias ``||E[u] - u*|| / ||u*||`` in percent,
``±`` the Monte Carlo error (``||se(E[u])|| / ||u*||``: what an exactly
unbiased update would show on average, so a cell about the size of its ``±``
is zero). The second splits ``E[u] - u*`` at one M into three parts (they add
as vectors, not as numbers; ``shrink`` is the signed part along ``u*``,
negative when the expected update is shorter). With ``f`` the scheme's
inverse, averaged over its folds and corrected if asked:

* coupling ``E[u] - N(mu) E[f]``: numerator and preconditioner share
  microbatches. It shrinks the update; cross-fitting removes it. (With LOO
  and a correction about a fifth of it returns: the variance estimate is
  shared by the folds and includes each fold's own microbatch.)
* inversion ``N(mu) (E[f] - f_G)``, with ``f_G`` the inverse at the expected
  preconditioner of the scheme's own groups: the Jensen bias of inverting a
  noisy preconditioner. It inflates the update; the inverse correction
  removes most of it (the delta method corrects ``1 / p`` with ``p =
  sqrt(P) + eps``, not the square root inside ``p``).
* group size ``N(mu) (f_G - F(E[P(s)]))``, exact: a preconditioner group of
  ``n < M`` microbatches has a noisier statistic, ``E[gbar_G^2] = mu^2 +
  sigma^2 M / n``, so a larger expected preconditioner. Twofold and symmetric
  pay for their half batch; LOO's ``M - 1`` costs little from M = 16 on.

What to look for: standard Adam's coupling bias (shrinks the update) and
inversion bias (inflates it) partly cancel, so removing only one of them
raises the total (a correction alone doubles it). LOO with the jackknife
removes both; its total falls with M, to about half of standard Adam's at
M = 32, while at M = 4 its group of ``M - 1`` costs more than it saves.
Twofold and symmetric lose to their halved preconditioner batch. The
"paper" estimator under-corrects LOO by about a factor M and over-corrects
the standard scheme more as M grows. The coupling bias scales with ``w1 *
w2``, the inversion bias with ``w2^2`` (``--b2`` shows both): a few percent
in the first steps (the default ``--step 3``), ten times smaller in a
stationary state late in training (``--step 200 --kappa 1``).

Estimators. ``E[f]`` comes from the same compiled update: the numerator is
affine in the momentum state, so lowering ``mu_state`` by ``(1 - b1^t) c / b1``
lowers every fold's numerator by ``c`` and the update by ``c * f``. Every
mean subtracts its first-order term in the gradient noise (a control variate
with mean exactly zero), which removes much of the draw-to-draw noise and
none of the bias.

Several ``--b2`` values add an axis: the problem is rebuilt for each (the
state of step ``t - 1``, ``E[P(s)]`` and ``u*`` all take ``b2``; the draws are
shared), and instead of the two tables above it prints the total of a few
variants (``B2_ROWS``) across M x b2 and their parts at one M, each row
with ``w2``, the weight of today's batch in the second moment.

Outputs in ``--out`` (default ``bias_demo_out/``): ``bias.png`` (the total
bias against M for each correction, and the three parts at one M; with
several b2, the total and the parts against ``1 - b2``) and ``bias.json``
(every number, the problem and the flags; one record per b2 x scheme x
correction x M).
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import bcopt

SCHEMES = (None, "twofold", "symmetric", "loo")
CORRECTIONS = (None, "jackknife", "paper")
MICROBATCHES = (4, 8, 16, 32)
# (scheme, correction) rows of the tables across b2: optax's Adam, each fix
# alone, and both.
B2_ROWS = ((None, None), (None, "jackknife"), ("loo", None),
           ("loo", "jackknife"))


@dataclasses.dataclass(frozen=True)
class Problem:
  """The synthetic problem (fixed by its own seed, not the Monte Carlo's)."""

  dim: int = 64         # d: coordinates (parameters).
  step: int = 3         # t: the step whose update is measured (count = t - 1).
  b1: float = 0.9       # Adam's hyperparameters (the paper's recipe).
  b2: float = 0.95
  eps: float = 1e-8
  kappa: float = 2.0    # nu_state remembers kappa x today's E[gbar^2].
  snr: tuple[float, float] = (0.05, 2.0)    # range of |mu_i| / sigma_i.
  sigma: tuple[float, float] = (1e-3, 1.0)  # range of sigma_i, sd of gbar_i.
  seed: int = 0         # the coordinates' order, signs and scales.

  def __post_init__(self):
    for name in ("b1", "b2"):
      value = getattr(self, name)
      if not 0 < value < 1:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}.")

  @property
  def fresh_weights(self) -> tuple[float, float]:
    """``(w1, w2)``: the weights of today's batch in the two moments."""
    t = self.step
    return (1 - self.b1) / (1 - self.b1**t), (1 - self.b2) / (1 - self.b2**t)


@dataclasses.dataclass(frozen=True)
class Population:
  """Closed-form population quantities of a :class:`Problem` (float64)."""

  mean: np.ndarray        # mu = E[g_j] = E[gbar], shape (d,).
  sigma: np.ndarray       # sd of the full-batch mean gradient, shape (d,).
  expected_p: np.ndarray  # E[P(s)] for the full-batch s = gbar^2, shape (d,).
  target: np.ndarray      # u* = mu / (sqrt(E[P(s)]) + eps), shape (d,).
  state: bcopt.ScaleByAdamBCState  # Adam's state before step t.


def population(problem: Problem) -> Population:
  """The population mean, noise, Adam state and target update."""
  rng = np.random.default_rng(problem.seed)
  d, t, b1, b2 = problem.dim, problem.step, problem.b1, problem.b2
  snr = rng.permutation(np.geomspace(*problem.snr, d))
  sigma = np.exp(rng.uniform(*np.log(problem.sigma), d))
  mean = rng.choice([-1.0, 1.0], d) * snr * sigma
  second = mean**2 + sigma**2  # E[gbar^2]
  _, w2 = problem.fresh_weights
  expected_p = second * ((1 - w2) * problem.kappa + w2)
  state = bcopt.ScaleByAdamBCState(
      count=jnp.asarray(t - 1, jnp.int32),
      mu=jnp.asarray((1 - b1 ** (t - 1)) * mean, jnp.float32),
      nu=jnp.asarray((1 - b2 ** (t - 1)) * problem.kappa * second,
                     jnp.float32),
  )
  return Population(mean, sigma, expected_p,
                    mean / (np.sqrt(expected_p) + problem.eps), state)


def group_sizes(scheme: Optional[str], m: int) -> list[int]:
  """Microbatches in each fold's preconditioner group (docs/algorithms.md)."""
  return {None: [m], "twofold": [m - m // 2],
          "symmetric": [m - m // 2, m // 2], "loo": [m - 1]}[scheme]


def group_inverse(problem: Problem, pop: Population, scheme, m) -> np.ndarray:
  """``f_G / F(E[P(s)])``: the fold-averaged inverse at each group's E[P]."""
  _, w2 = problem.fresh_weights
  full = 1 / (np.sqrt(pop.expected_p) + problem.eps)
  # A group of n has E[gbar_G^2] = mu^2 + sigma^2 M / n instead of M / M.
  return np.mean([
      1 / (np.sqrt(pop.expected_p + w2 * pop.sigma**2 * (m / n - 1))
           + problem.eps) / full
      for n in group_sizes(scheme, m)], axis=0)


def microbatch_gradients(pop: Population, atoms: np.ndarray, m: int):
  """Splits each draw's batch into ``m`` microbatches.

  Args:
    pop: the population.
    atoms: unit normals shaped ``(draws, A, d)``, ``A`` a multiple of ``m``.
    m: the number of microbatches M.

  Returns:
    float32 gradients ``g_j = mu + sqrt(M) sigma z_j`` shaped ``(draws, M,
    d)``, ``z_j`` the normalised sum of the j-th block of ``A / M`` atoms, so
    the mean over the microbatches is the same for every M.
  """
  draws, a, d = atoms.shape
  z = atoms.reshape(draws, m, a // m, d).sum(axis=2) / np.sqrt(a // m)
  return (pop.mean + np.sqrt(m) * pop.sigma * z).astype(np.float32)


def compiled_update(problem: Problem, scheme, correction):
  """``scale_by_adam_bc``'s direction, vmapped over draws and jitted."""
  tx = bcopt.scale_by_adam_bc(
      problem.b1, problem.b2, problem.eps, cross_fit=scheme,
      inverse_correction=correction)
  return jax.jit(jax.vmap(
      lambda grads, state: tx.update(grads, state)[0], in_axes=(0, None)))


def _mean_and_se(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return x.mean(axis=0), x.std(axis=0, ddof=1) / np.sqrt(len(x))


def measure(
    problem: Problem = Problem(),
    *,
    microbatches: Sequence[int] = MICROBATCHES,
    schemes: Sequence[Optional[str]] = SCHEMES,
    corrections: Sequence[Optional[str]] = CORRECTIONS,
    draws: int = 8192,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
  """Runs the bias meter.

  Args:
    problem: the synthetic problem.
    microbatches: the values of M; each must divide the largest.
    schemes: ``cross_fit`` values.
    corrections: ``inverse_correction`` values.
    draws: Monte Carlo draws, shared by every configuration.
    seed: seed of the draws.
    progress: show a progress bar (on stderr).

  Returns:
    One dict per configuration with ``b2``, ``w2`` (the problem's),
    ``scheme``, ``correction``, ``M`` and the norms relative to ``||u*||`` of the bias ``total`` and its parts
    ``coupling``, ``inversion`` and ``group_size`` (exact), Monte Carlo
    errors ``total_se``, ``coupling_se``, ``inversion_se``, and ``shrink``
    (the bias along ``u*``, relative to ``||u*||^2``). A configuration bcopt
    rejects (too few microbatches) has ``skipped`` with the error instead.
  """
  if any(max(microbatches) % m for m in microbatches):
    raise ValueError(f"Every M must divide the largest, got {microbatches}.")
  pop = population(problem)
  target, norm = pop.target, np.linalg.norm(pop.target)
  w1, w2 = problem.fresh_weights
  c = np.sqrt(pop.expected_p) + problem.eps  # 1 / F(E[P(s)])
  # Lowering mu_state by (1 - b1^t) c / b1 lowers every numerator by c, so
  # u - u_shifted = c f = f / F(E[P(s)]): the inverse relative to u*'s.
  shifted = pop.state._replace(mu=pop.state.mu - jnp.asarray(
      (1 - problem.b1**problem.step) * c / problem.b1, jnp.float32))

  atoms = np.random.default_rng(seed).standard_normal(
      (draws, max(microbatches), problem.dim), dtype=np.float32)
  bar = _progress(len(microbatches) * len(schemes) * len(corrections),
                  progress)
  results = []
  for m in microbatches:
    grads_np = microbatch_gradients(pop, atoms, m)
    grads = jnp.asarray(grads_np)
    mean_a = grads_np[:, : m // 2].mean(axis=1, dtype=np.float64)
    mean_b = grads_np[:, m // 2:].mean(axis=1, dtype=np.float64)
    mean_all = grads_np.mean(axis=1, dtype=np.float64)
    for scheme in schemes:
      # Control variates: the first-order terms of N(a) / c and of c f in the
      # noise of the numerator's mean gradient a and of the preconditioner's
      # b (averaged over the folds). Both have mean zero exactly.
      a, b = {"twofold": (mean_a, mean_b),
              "symmetric": (0.5 * (mean_a + mean_b),) * 2}.get(
                  scheme, (mean_all, mean_all))
      first_order_n = w1 * (a - pop.mean) / c
      first_order_f = -w2 * pop.mean * (b - pop.mean) / c**2
      f_group = group_inverse(problem, pop, scheme, m)  # c f_G
      for correction in corrections:
        bar.set_description(f"M={m:<2} {scheme or 'standard'}/{correction}")
        record = {"b2": problem.b2, "w2": w2, "scheme": scheme,
                  "correction": correction, "M": m}
        update = compiled_update(problem, scheme, correction)
        try:
          u = np.asarray(update(grads, pop.state), np.float64)
        except ValueError as e:  # bcopt rejects it (too few microbatches)
          results.append(record | {"skipped": str(e)})
          bar.update()
          continue
        cf = u - np.asarray(update(grads, shifted), np.float64)
        total, total_se = _mean_and_se(
            u - target - first_order_n - target * first_order_f)
        coupling, coupling_se = _mean_and_se(u - target * cf - first_order_n)
        mean_cf, cf_se = _mean_and_se(cf - first_order_f)
        record |= {
            "total": np.linalg.norm(total) / norm,
            "total_se": np.linalg.norm(total_se) / norm,
            "coupling": np.linalg.norm(coupling) / norm,
            "coupling_se": np.linalg.norm(coupling_se) / norm,
            "inversion": np.linalg.norm(target * (mean_cf - f_group)) / norm,
            "inversion_se": np.linalg.norm(target * cf_se) / norm,
            "group_size": np.linalg.norm(target * (f_group - 1)) / norm,
            "shrink": total @ target / norm**2,
        }
        results.append({k: float(v) if isinstance(v, np.floating) else v
                        for k, v in record.items()})
        bar.update()
  bar.close()
  return results


def _progress(total: int, enabled: bool):
  """A tqdm bar on stderr, or a silent stand-in."""

  class Silent:
    def set_description(self, _): ...
    def update(self): ...
    def close(self): ...

  if not enabled:
    return Silent()
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return Silent()
  return tqdm(total=total, unit="config", leave=False, file=sys.stderr)


def _label(scheme, correction) -> str:
  return f"{scheme or 'standard':<10} {correction or 'none':<10}"


def _cell(record: Optional[dict], key: str, digits: int = 2) -> str:
  width = 12 + digits
  if record is None or "skipped" in record:
    return f"{'-':>{width}}"
  if key + "_se" in record:
    return (f"{100 * record[key]:7.{digits}f}"
            f" ±{100 * record[key + '_se']:{digits + 3}.{digits}f}")
  return f"{100 * record[key]:{width}.{digits}f}"


def format_tables(results: list[dict], breakdown_m: int) -> str:
  """The total bias by M, and its three parts at ``breakdown_m``."""
  ms = sorted({r["M"] for r in results})
  rows = list(dict.fromkeys((r["scheme"], r["correction"]) for r in results))
  by_key = {(r["scheme"], r["correction"], r["M"]): r for r in results}
  header = f"{'scheme':<10} {'correction':<10}"
  lines = ["Relative bias ||E[u] - u*|| / ||u*|| in % (± Monte Carlo error)",
           "", header + "".join(f"{'M=' + str(m):>15}" for m in ms)]
  for row in rows:
    lines.append(_label(*row) + "".join(
        " " + _cell(by_key.get(row + (m,)), "total") for m in ms))
  parts = ("total", "coupling", "inversion", "group_size", "shrink")
  lines += ["", f"Its parts at M={breakdown_m}, % of ||u*|| (they add as"
            " vectors; shrink < 0: E[u] is shorter than u*)", "",
            header + "".join(f"{p.replace('_', ' '):>15}" for p in parts)]
  for row in rows:
    lines.append(_label(*row) + "".join(
        " " + _cell(by_key.get(row + (breakdown_m,)), p) for p in parts))
  return "\n".join(lines)


def format_b2_tables(results: list[dict], breakdown_m: int,
                     rows: Sequence[tuple] = B2_ROWS) -> str:
  """The total bias of ``rows`` by b2 and M, and its parts at ``breakdown_m``."""
  b2s = list(dict.fromkeys(r["b2"] for r in results))
  ms = sorted({r["M"] for r in results})
  by_key = {(r["b2"], r["scheme"], r["correction"], r["M"]): r
            for r in results}
  w2 = {r["b2"]: r["w2"] for r in results}
  rows = [row for row in rows
          if any((b2,) + row + (m,) in by_key for b2 in b2s for m in ms)]
  label = lambda b2, row: f"{b2:<6g} {w2[b2]:<7.3g} " + _label(*row)
  header = f"{'b2':<6} {'w2':<7} {'scheme':<10} {'correction':<10}"
  # One more digit than format_tables: late in training the biases are small.
  lines = ["Relative bias ||E[u] - u*|| / ||u*|| in % (± Monte Carlo error)",
           "", header + "".join(f"{'M=' + str(m):>16}" for m in ms)]
  for b2 in b2s:
    for row in rows:
      lines.append(label(b2, row) + "".join(
          " " + _cell(by_key.get((b2,) + row + (m,)), "total", 3)
          for m in ms))
  parts = ("total", "coupling", "inversion", "group_size", "shrink")
  lines += ["", f"Its parts at M={breakdown_m}, % of ||u*|| (they add as"
            " vectors; shrink < 0: E[u] is shorter than u*)", "",
            header + "".join(f"{p.replace('_', ' '):>16}" for p in parts)]
  for b2 in b2s:
    for row in rows:
      lines.append(label(b2, row) + "".join(
          " " + _cell(by_key.get((b2,) + row + (breakdown_m,)), p, 3)
          for p in parts))
  return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path, breakdown_m: int) -> None:
  """Total bias against M per correction (top), its parts at one M (bottom)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  done = [r for r in results if "skipped" not in r]
  corrections = list(dict.fromkeys(r["correction"] for r in done))
  schemes = list(dict.fromkeys(r["scheme"] for r in done))
  fig = plt.figure(figsize=(13, 8))
  grid = fig.add_gridspec(2, len(corrections))
  top = [fig.add_subplot(grid[0, 0])]
  top += [fig.add_subplot(grid[0, i], sharey=top[0])
          for i in range(1, len(corrections))]
  styles = {None: ("o", "-"), "twofold": ("s", "--"),
            "symmetric": ("^", "-"), "loo": ("D", "-")}
  for ax, correction in zip(top, corrections):
    for k, scheme in enumerate(schemes):
      rows = sorted((r for r in done if r["scheme"] == scheme
                     and r["correction"] == correction), key=lambda r: r["M"])
      shift = 1 + 0.03 * (k - (len(schemes) - 1) / 2)  # keep bars apart
      marker, line = styles.get(scheme, ("o", "-"))
      ax.errorbar([r["M"] * shift for r in rows],
                  [100 * r["total"] for r in rows],
                  yerr=[200 * r["total_se"] for r in rows], marker=marker,
                  linestyle=line, capsize=3, label=scheme or "standard")
    standard = sorted((r for r in done if r["scheme"] is None
                       and r["correction"] is None), key=lambda r: r["M"])
    if standard and correction is not None:
      ax.plot([r["M"] for r in standard], [100 * r["total"] for r in standard],
              "k:", label="standard, no correction")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("microbatches M")
    ax.set_title(f"inverse_correction={correction!r}")
    ax.grid(alpha=0.3)
  top[0].set_ylabel("||E[u] - u*|| / ||u*|| (%)")
  top[-1].legend(fontsize=8)

  bottom = fig.add_subplot(grid[1, :])
  at_m = [r for r in done if r["M"] == breakdown_m]
  x = np.arange(len(at_m))
  for i, part in enumerate(("coupling", "inversion", "group_size")):
    bottom.bar(x + (i - 1) * 0.27, [100 * r[part] for r in at_m], 0.27,
               yerr=[200 * r.get(part + "_se", 0.0) for r in at_m],
               capsize=2, label=part.replace("_", " "))
  bottom.plot(x, [100 * r["total"] for r in at_m], "kD", label="total")
  bottom.set_xticks(x, [f"{r['scheme'] or 'standard'}\n"
                        f"{r['correction'] or 'none'}" for r in at_m],
                    fontsize=8)
  bottom.set_ylabel(f"% of ||u*|| at M={breakdown_m}")
  bottom.legend(fontsize=8)
  bottom.grid(alpha=0.3, axis="y")
  fig.suptitle("Bias of the expected Adam update against the population"
               " update u* (error bars: 2 Monte Carlo errors)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_b2(results: list[dict], path: pathlib.Path, breakdown_m: int,
            rows: Sequence[tuple] = B2_ROWS) -> None:
  """Total bias (left) and its parts (right) at one M against ``1 - b2``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  at_m = [r for r in results if "skipped" not in r and r["M"] == breakdown_m]
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
  for row in rows:
    line = sorted((r for r in at_m if (r["scheme"], r["correction"]) == row),
                  key=lambda r: r["b2"])
    if not line:
      continue
    name = f"{row[0] or 'standard'}, {row[1] or 'none'}"
    left.errorbar([1 - r["b2"] for r in line],
                  [100 * r["total"] for r in line],
                  yerr=[200 * r["total_se"] for r in line], marker="o",
                  capsize=3, label=name)
    if row in ((None, None), ("loo", "jackknife")):
      for part, marker in (("coupling", "s"), ("inversion", "^")):
        right.errorbar([1 - r["b2"] for r in line],
                       [100 * r[part] for r in line],
                       yerr=[200 * r[part + "_se"] for r in line],
                       marker=marker, capsize=3, label=f"{name}: {part}")
  w2 = {r["b2"]: r["w2"] for r in at_m}
  for ax, title in ((left, "total"), (right, "coupling and inversion parts")):
    ax.set_xscale("log")
    ax.set_xticks([1 - b2 for b2 in w2],
                  [f"{b2:g}\nw2={w:.3g}" for b2, w in w2.items()])
    ax.minorticks_off()
    ax.set_xlabel("b2 (log scale of 1 - b2)")
    ax.set_title(f"{title} at M={breakdown_m}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  left.set_ylabel("% of ||u*||")
  fig.suptitle("Bias of the expected Adam update against b2"
               " (error bars: 2 Monte Carlo errors)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """Parses and checks the flags (argparse exits on a bad one); runs nothing."""
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n", 1)[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--draws", type=int, default=8192,
                      help="Monte Carlo draws per configuration")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the Monte Carlo draws")
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path("bias_demo_out"),
                      help="directory for bias.png and bias.json")
  parser.add_argument("--microbatches", type=int, nargs="+",
                      default=list(MICROBATCHES),
                      help="values of M (each must divide the largest)")
  parser.add_argument("--quick", action="store_true",
                      help="M in {4, 16} and a quarter of the draws")
  parser.add_argument("--step", type=int, default=Problem.step,
                      help="the step t whose update is measured")
  parser.add_argument("--kappa", type=float, default=Problem.kappa,
                      help="nu_state remembers kappa x today's E[gbar^2]")
  parser.add_argument("--b2", type=float, nargs="+", default=[Problem.b2],
                      help="Adam's b2, each in (0, 1); several add a b2 axis")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar")
  args = parser.parse_args(argv)
  if args.step < 2:
    parser.error("--step must be at least 2 (step 1 has no state).")
  if args.draws < 2 or any(max(args.microbatches) % m
                           for m in args.microbatches):
    parser.error("--draws must be at least 2 and every M must divide the"
                 " largest.")
  if not all(0 < b2 < 1 for b2 in args.b2):
    parser.error(f"--b2 must lie in (0, 1), got {args.b2}.")
  return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  """Parses flags, runs :func:`measure`, prints and saves the results."""
  args = parse_args(argv)

  b2s = list(dict.fromkeys(args.b2))
  problems = [Problem(step=args.step, kappa=args.kappa, b2=b2) for b2 in b2s]
  microbatches = sorted(set((4, 16) if args.quick else args.microbatches))
  draws = max(args.draws // 4, 2) if args.quick else args.draws
  start = time.perf_counter()
  results = [r for problem in problems  # the same draws for every b2
             for r in measure(problem, microbatches=microbatches, draws=draws,
                              seed=args.seed, progress=not args.no_progress)]
  seconds = time.perf_counter() - start
  breakdown_m = 16 if 16 in microbatches else microbatches[-1]

  problem = problems[0]
  w1, w2 = problem.fresh_weights
  b2_text = (f"b2={problem.b2}" if len(problems) == 1
             else f"b2 in {{{', '.join(f'{b2:g}' for b2 in b2s)}}}")
  w2_text = f", w2={w2:.2f}" if len(problems) == 1 else ""
  print(f"Adam (b1={problem.b1}, {b2_text}) at step t={problem.step}"
        f" (w1={w1:.2f}{w2_text}), kappa={problem.kappa},"
        f" d={problem.dim}; {draws} draws per configuration,"
        f" {len(results)} configurations in {seconds:.0f} s\n")
  args.out.mkdir(parents=True, exist_ok=True)
  if len(problems) == 1:
    print(format_tables(results, breakdown_m))
    plot(results, args.out / "bias.png", breakdown_m)
  else:
    print(format_b2_tables(results, breakdown_m))
    plot_b2(results, args.out / "bias.png", breakdown_m)
  with open(args.out / "bias.json", "w") as f:
    json.dump({"problem": dataclasses.asdict(problem) | {
        "b2": b2s if len(b2s) > 1 else b2s[0]}, "draws": draws,
               "seed": args.seed, "seconds": seconds, "results": results},
              f, indent=1)
  print(f"\nWrote {args.out / 'bias.png'} and {args.out / 'bias.json'}")
  return results


if __name__ == "__main__":
  main()
