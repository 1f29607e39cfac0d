"""Every command of the ```bash blocks in README.md and docs/*.md parses.

A block line is split at ``&&`` (outside quotes); backslash continuations are joined, ``#``
comments dropped and leading ``VAR=value`` assignments set aside. Then each
command is checked by its kind:

* ``python -m MODULE ARGS``: MODULE is imported and ``MODULE.parse_args(ARGS)``
  must accept ARGS (every runnable module exposes ``parse_args(argv=None)``).
  For ``python -m examples.lm.train ARGS`` also ``main(ARGS + ["--dry-run"])``
  runs: it builds the model, the optimizer state and the train steps
  abstractly, without data or output files. Here the steps are traced
  (``jax.eval_shape``), not compiled, to keep the test fast
  (test_lm_mesh.py checks the compiled memory of the tiny run); a command
  whose ``--mesh`` needs more devices than this process simulates (8) is
  only parsed.
* ``python -m pytest ARGS``: the paths among ARGS exist.
* Launchers for clusters, which cannot run here: ``gcloud ... --command=CMD``
  and ``srun [OPTIONS] python ...`` are checked through the command they
  start (``CMD`` split at ``&&``, where ``cd DIR`` is allowed).
* Environment setup (``python3.11 -m venv``, ``. .venv/bin/activate``,
  ``pip install ...``) is not run here: CI's ``.ci/run`` installs the
  project from scratch into a fresh virtualenv and runs the test command.
  Only the extras that ``pip install`` names are checked against
  pyproject.toml.

Any other command fails the test, so no unchecked command enters the docs.
The python blocks run in tests/test_docs.py.
"""

import contextlib
import importlib
import io
import math
import pathlib
import re
import shlex
import tomllib

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SETUP = (("python3.11", "-m", "venv"), ("python3", "-m", "venv"),
         (".",), ("source",), ("pip", "install"),
         ("python", "-m", "pip", "install"))
DRY_RUN = {"examples.lm.train"}


def split_and(words: list[str]) -> list[list[str]]:
  """A command line's words as the commands joined by ``&&``."""
  parts = [[]]
  for word in words:
    if word == "&&":
      parts.append([])
    else:
      parts[-1].append(word)
  return parts


def commands(page: pathlib.Path):
  """``(line, words)`` of every command in the ```bash blocks of ``page``."""
  text = page.read_text()
  found = []
  for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
    first = text.count("\n", 0, block.start()) + 2
    body = block.group(1).replace("\\\n", " ")
    for offset, line in enumerate(body.splitlines()):
      for words in split_and(shlex.split(line, comments=True)):
        while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
          words = words[1:]
        if words:
          found.append((first + offset, words))
  return found


COMMANDS = [(page, line, words) for page in PAGES
            for line, words in commands(page)]


def command_id(command) -> str:
  page, line, words = command
  return f"{page.relative_to(ROOT)}:{line}: {' '.join(words)}"


def test_the_docs_have_commands():
  assert len(COMMANDS) >= 5, [command_id(c) for c in COMMANDS]


def extras() -> set:
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  return set(pyproject["project"]["optional-dependencies"])


def check_setup(words):
  if words[:2] == ["pip", "install"] or words[2:4] == ["pip", "install"]:
    for spec in words:
      named = re.fullmatch(r"\.\[([\w,-]+)\]", spec)
      if named:
        unknown = set(named.group(1).split(",")) - extras()
        assert not unknown, f"pip install names unknown extras {unknown}"


def check_pytest(args):
  paths = [a for a in args if not a.startswith("-") and not a.isdigit()]
  missing = [p for p in paths if not (ROOT / p.split("::")[0]).exists()]
  assert not missing, f"pytest paths {missing} do not exist"


def parse(module, args):
  """``module.parse_args(args)``; --help (exit 0) counts as parsed."""
  assert hasattr(module, "parse_args"), (
      f"{module.__name__} has no parse_args(argv=None)")
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      module.parse_args(args)
  except SystemExit as e:
    assert e.code in (0, None), f"{module.__name__} rejected {args}"
    return False
  return True


def traced_memory(cfg, model_cfg):
  """``train.step_memory`` traced instead of compiled (no sizes)."""
  from examples.lm import train   # pylint: disable=g-import-not-at-top
  prog = train.build(cfg, model_cfg)
  inputs = train.abstract_inputs(cfg, prog, model_cfg)
  for step in prog.train_steps.values():
    jax.eval_shape(step, *inputs)
  return {}


def launched(words):
  """The commands a cluster launcher line starts (``gcloud``, ``srun``)."""
  if words[0] == "srun":
    return [words[words.index("python"):]]
  (cmd,) = [w.split("=", 1)[1] for w in words if w.startswith("--command=")]
  return [part for part in split_and(shlex.split(cmd)) if part[0] != "cd"]


@pytest.mark.parametrize("command", COMMANDS, ids=command_id)
def test_command(command, monkeypatch):
  page, line, words = command
  if words[0] in ("gcloud", "srun"):
    for inner in launched(words):
      test_command((page, line, inner), monkeypatch)
    return
  if any(tuple(words[:len(s)]) == s for s in SETUP):
    check_setup(words)
    return
  assert words[:2] == ["python", "-m"] and len(words) >= 3, (
      f"{command_id(command)}: not a `python -m MODULE` command or an"
      " environment setup line; this test cannot check it")
  name, args = words[2], words[3:]
  if name == "pytest":
    check_pytest(args)
    return
  module = importlib.import_module(name)
  if (parse(module, args) and name in DRY_RUN and math.prod(
      module.parse_args(args).mesh_shape.values()) <= jax.device_count()):
    monkeypatch.setattr(module, "step_memory", traced_memory)
    with contextlib.redirect_stdout(io.StringIO()) as out:
      module.main(args + ["--dry-run"])
    assert "params:" in out.getvalue()
