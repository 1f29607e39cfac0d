"""Tests of examples/lm/config.py: the flags, the derived field sets,
config.json, and the checks that run before anything compiles.

The flags are checked against what earlier code recorded: the commands and
full settings of the runs in benchmarks/results (made before the flags were
generated from the dataclass) must parse to the same values.
"""

import dataclasses
import json
import pathlib
import shlex

import optax
import pytest

from examples.lm import config as config_lib
from examples.lm import optimizer as optimizer_lib
from examples.lm import train

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def recorded_runs():
  """(command, recorded args) of every run whose summary kept its config."""
  found = []

  def walk(x):
    if isinstance(x, dict):
      if "command" in x and "args" in x.get("config", {}):
        found.append((x["command"], x["config"]["args"]))
      for v in x.values():
        walk(v)
    elif isinstance(x, list):
      for v in x:
        walk(v)

  for name in ("finetune_averaging.json", "finetune_averaging_quick.json"):
    walk(json.loads((RESULTS / name).read_text()))
  return found


def argv_of(command: str, out: str = "/tmp/run") -> list[str]:
  words = shlex.split(command.replace("{out}", out))
  assert words[:3] == ["python", "-m", "examples.lm.train"]
  return words[3:]


def test_recorded_runs_parse_to_their_recorded_settings():
  runs = recorded_runs()
  assert len(runs) >= 9
  for command, recorded in runs:
    cfg = train.parse_args(argv_of(command))
    # Same names, types and defaults as the code that recorded them.
    args = config_lib.run_config(cfg, config_lib.model_config(cfg, 256))["args"]
    assert {k: args.get(k) for k in recorded} == recorded, command


def test_recorded_quality_commands_parse_to_their_flags():
  runs = json.loads((RESULTS / "lm_quality.json").read_text())["runs"]
  assert len(runs) >= 104
  for run in runs:
    argv = argv_of(run["command"])
    cfg = train.parse_args(argv)
    flags = [i for i, word in enumerate(argv) if word.startswith("--")]
    for i, j in zip(flags, flags[1:] + [len(argv)]):
      got = getattr(cfg, argv[i][2:].replace("-", "_"))
      if j == i + 1:   # a switch
        assert got is True, argv[i]
      elif isinstance(got, tuple):   # repeatable (--hparam NAME=VALUE)
        assert argv[i + 1] in got, (argv[i], argv[i + 1])
      else:
        assert str(got) == argv[i + 1] or got == type(got)(argv[i + 1]), (
            argv[i], argv[i + 1])
    assert (cfg.optimizer.split("_")[0], cfg.lr, cfg.seed) == (
        run["family"], run["lr"], run["seed"])


def test_every_field_is_a_flag_with_its_default():
  assert train.parse_args([]) == config_lib.Config()
  text = config_lib.parser("prog", "description").format_help()
  for field in dataclasses.fields(config_lib.Config):
    flag = "--" + field.name.replace("_", "-")
    assert flag in text
  cfg = train.parse_args(["--microbatch-size", "3", "--fast-compile",
                          "--model", "d_ff=96", "--model", "num_layers=1",
                          "--cross-fit", "none", "--average", "bema , ema",
                          "--stop-at", "5"])
  assert (cfg.microbatch_size, cfg.fast_compile, cfg.cross_fit) == (
      3, True, "none")
  assert cfg.model == ("d_ff=96", "num_layers=1")
  assert cfg.average == "ema,bema" and cfg.averages == ("ema", "bema")
  assert cfg.stop_at == 5 and cfg.vocab_size is None


@pytest.mark.parametrize("argv,match", [
    (["--optimizer", "lion"], "invalid choice"),
    (["--preset", "huge"], "invalid choice"),
    (["--schedule", "linear"], "invalid choice"),
    (["--average", "ema,swa"], "comma-separated list"),
    (["--steps", "ten"], "invalid int value"),
])
def test_bad_flag_syntax_exits_with_usage(capsys, argv, match):
  with pytest.raises(SystemExit):
    train.parse_args(argv)
  assert match in capsys.readouterr().err


def test_help_lists_every_flag(capsys):
  with pytest.raises(SystemExit):
    train.parse_args(["--help"])
  text = capsys.readouterr().out
  assert text.startswith("usage: python -m examples.lm.train")
  for field in dataclasses.fields(config_lib.Config):
    assert "--" + field.name.replace("_", "-") in text


def test_derived_field_sets():
  # The settings that may change between a run and its --resume, and those
  # the compiled programs never see (train.build reads none of them: see
  # test_lm_train.py).
  assert config_lib.RESUMABLE == {
      "resume", "stop_at", "devices", "mesh", "microbatch_mode", "out",
      "checkpoint_every", "eval_every", "progress", "dry_run", "fast_compile",
      "distributed", "coordinator", "num_processes", "process_id"}
  assert config_lib.NOT_COMPILED == {
      "seed", "data", "noise", "eval_every", "eval_batches",
      "checkpoint_every", "resume", "stop_at", "out", "progress", "dry_run",
      "curvature_every", "distributed", "coordinator", "num_processes",
      "process_id", "train_plays", "val_plays", "test_plays", "init_from",
      "eval_test"}


def test_config_json_round_trip():
  cfg = train.parse_args(["--model", "d_ff=96", "--average", "bema",
                          "--init-from", "runs/pre", "--lr", "1e-3"])
  model_cfg = config_lib.model_config(cfg, 300)
  saved = json.loads(json.dumps(config_lib.run_config(cfg, model_cfg)))
  assert config_lib.from_dict(saved["args"]) == cfg
  assert saved["model"]["d_ff"] == 96 and saved["model"]["vocab_size"] == 300
  assert saved["args"]["model"] == ["d_ff=96"]
  assert list(saved["args"]) == sorted(saved["args"])


def test_resume_refuses_changed_settings_that_are_not_resumable():
  def saved(*argv):
    cfg = train.parse_args(list(argv))
    return config_lib.run_config(cfg, config_lib.model_config(cfg, 256))

  old = saved("--lr", "1e-3", "--out", "a")
  assert config_lib.changed_on_resume(old, saved(
      "--lr", "1e-3", "--out", "b", "--mesh", "data=2,fsdp=2", "--stop-at",
      "3", "--eval-every", "7", "--resume", "--fast-compile",
      "--microbatch-mode", "scan")) == []
  assert config_lib.changed_on_resume(old, saved(
      "--lr", "1e-3", "--grad-dtype", "bfloat16")) == ["grad_dtype"]
  assert config_lib.changed_on_resume(old, saved(
      "--lr", "2e-3", "--seed", "1", "--out", "a")) == ["lr", "seed"]
  assert config_lib.changed_on_resume(old, saved(
      "--lr", "1e-3", "--model", "d_ff=96")) == ["model"]


def test_model_overrides():
  cfg = train.parse_args(["--preset", "small", "--model", "head_dim=none",
                          "--model", "rope_theta=5e5", "--model", "d_ff=96"])
  model_cfg = config_lib.model_config(cfg, 300)
  assert (model_cfg.d_model, model_cfg.head_dim, model_cfg.rope_theta,
          model_cfg.d_ff, model_cfg.vocab_size) == (384, None, 5e5, 96, 300)
  for bad in ("d_ff", "width=3"):
    with pytest.raises(ValueError, match="expected FIELD=VALUE"):
      config_lib.model_config(train.parse_args(["--model", bad]), 256)


@pytest.mark.parametrize("extra,match", [
    (["--average", "bema", "--average-every", "0"], "update_every"),
    (["--average", "ema", "--average-lag", "-5"], "lag"),
    (["--optimizer", "adamw_bc", "--microbatches", "1"], "cannot use"),
    (["--optimizer", "sophia_bc", "--microbatches", "2"], "cannot use"),
    (["--optimizer", "shampoo_bc", "--cross-fit", "loo"], "loo"),
    (["--devices", "3"], "data=3 must divide --microbatches 4"),
    (["--devices", "16", "--microbatches", "16"], "only 8 here"),
    (["--mesh", "data=2,fsdp=4"], "fsdp=4 must divide --microbatch-size 2"),
    (["--mesh", "fsdp=2", "--vocab-size", "257"],
     "fsdp=2 must divide dimension 257 of the parameter"),
    (["--mesh", "data=2", "--devices", "2"], "give one"),
    (["--coordinator", "localhost:1234"], "give all of --coordinator"),
    (["--stop-at", "99"], "--stop-at"),
    (["--noise", "1.5"], "--noise"),
    (["--seq-len", "0"], "--seq-len must be >= 1"),
    (["--model", "num_kv_heads=3"], "multiple of num_kv_heads"),
    (["--vocab-size", "100"], "--vocab-size 100 is too small"),
])
def test_bad_settings_fail_before_compiling(tiny, tmp_path, monkeypatch,
                                            extra, match):
  def no_build(*args):
    raise AssertionError("compiled despite bad settings")
  monkeypatch.setattr(train, "build", no_build)
  with pytest.raises(ValueError, match=match):
    train.main(tiny.flags(tmp_path, "adamw") + extra)
  assert not (tmp_path / "checkpoints").exists()


def test_mesh_flag():
  parse = lambda *argv: train.parse_args(list(argv))
  assert parse().mesh_shape == {"data": 1, "fsdp": 1}
  assert parse("--devices", "4").mesh_shape == {"data": 4, "fsdp": 1}
  cfg = parse("--mesh", "fsdp=2, data=4")
  assert (cfg.mesh, cfg.mesh_name) == ("data=4,fsdp=2", "data=4,fsdp=2")
  assert parse("--mesh", "fsdp=8").mesh_shape == {"data": 1, "fsdp": 8}


@pytest.mark.parametrize("bad", ["data", "data=0", "data=-2", "data=2x",
                                 "model=2", "data=2,data=2", "data=2;fsdp=2",
                                 ""])
def test_bad_mesh_values_are_refused_by_the_parser(bad, capsys):
  with pytest.raises(SystemExit):
    train.parse_args(["--mesh", bad])
  assert "expected data=D[,fsdp=F]" in capsys.readouterr().err


def test_a_switch_the_optimizer_lacks_is_refused(monkeypatch):
  no_switches = optimizer_lib.Optimizer(
      optimizer_lib.mean_gradient(optax.adamw), {})
  monkeypatch.setitem(optimizer_lib.OPTIMIZERS, "adamw", no_switches)
  cfg = dataclasses.replace(config_lib.Config(), optimizer="adamw",
                            inverse_correction="none")
  with pytest.raises(ValueError, match="--inverse-correction: --optimizer "
                     "adamw has no such switch"):
    config_lib.validate(cfg)
