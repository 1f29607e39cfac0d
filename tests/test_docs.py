"""README.md and docs/*.md: every python block runs, every link resolves.

Each ```python block is executed on its own, in a fresh namespace, so every
block must be self-contained. Blocks use the library only: they may import
bcopt, jax, optax, chex, numpy and the standard library (the library's test
suite needs nothing else). Blocks that use several devices build their mesh
from ``jax.devices()``; conftest.py simulates 8 CPU devices.

The ```bash blocks are checked by examples/tests/test_doc_commands.py (their
commands need the example's dependencies).
"""

import ast
import inspect
import pathlib
import re
import sys

import pytest

import bcopt

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
ALLOWED_IMPORTS = {"bcopt", "jax", "optax", "chex", "numpy"}
README_MAX_LINES = 250


def code_blocks(page: pathlib.Path, language: str):
  """``(line, code)`` of every top-level ```language block of ``page``."""
  text = page.read_text()
  pattern = re.compile(rf"^```{language}\n(.*?)^```", re.S | re.M)
  return [(text.count("\n", 0, m.start()) + 1, m.group(1))
          for m in pattern.finditer(text)]


BLOCKS = [(page, line, code) for page in PAGES
          for line, code in code_blocks(page, "python")]


def block_id(block) -> str:
  page, line, _ = block
  return f"{page.relative_to(ROOT)}:{line}"


def imported_modules(code: str) -> set:
  names = set()
  for node in ast.walk(ast.parse(code)):
    if isinstance(node, ast.Import):
      names.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module.split(".")[0])
  return names


def test_every_page_has_been_found():
  assert len(PAGES) >= 2, PAGES
  assert len(BLOCKS) >= 5, [block_id(b) for b in BLOCKS]


@pytest.mark.parametrize("block", BLOCKS, ids=block_id)
def test_python_block_runs(block):
  page, line, code = block
  outside = {name for name in imported_modules(code)
             if name not in ALLOWED_IMPORTS
             and name not in sys.stdlib_module_names}
  assert not outside, (
      f"{block_id(block)} imports {sorted(outside)}; docs blocks may use only"
      f" {sorted(ALLOWED_IMPORTS)} and the standard library")
  # Pad with blank lines so tracebacks give the line number in the page.
  source = "\n" * line + code
  exec(compile(source, str(page), "exec"), {"__name__": f"doc_{line}"})


def test_readme_is_short():
  lines = README.read_text().count("\n")
  assert lines <= README_MAX_LINES, (
      f"README.md has {lines} lines; keep it at most {README_MAX_LINES} and"
      " move detail to docs/")


def test_readme_links_every_docs_page():
  text = README.read_text()
  missing = [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in text]
  assert not missing, f"README.md does not link {missing}"


def test_readme_names_the_public_api():
  """The API list in README.md is bcopt's public names, no more, no less."""
  public = {name for name in dir(bcopt) if not name.startswith("_")
            and not inspect.ismodule(getattr(bcopt, name))}
  text = README.read_text()
  section = text.split("\n## API", 1)[1].split("\n## ", 1)[0]
  listed = set(re.findall(r"`bcopt\.(\w+)`", section))
  assert listed == public, (
      f"not in README's API list: {sorted(public - listed)}; listed but not"
      f" public: {sorted(listed - public)}")


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: pathlib.Path) -> set:
  """GitHub's anchors of the headings of a markdown page."""
  result = set()
  for heading in re.findall(r"^#+ (.+)$", page.read_text(), re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    result.add(slug)
  return result


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(page):
  text = page.read_text()
  assert "SPEC" not in text, (
      f"{page.name} refers to SPEC, which is not part of the repository;"
      " restate what is needed in docs/algorithms.md")
  broken = []
  for target in LINK.findall(text):
    if re.match(r"[a-z]+:", target):   # https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.exists() or ROOT not in resolved.parents:
      broken.append(target)
    elif anchor and resolved.suffix == ".md" and anchor not in anchors(
        resolved):
      broken.append(target)
  assert not broken, f"{page.name}: broken links {broken}"
