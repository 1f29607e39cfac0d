"""Tests of examples/lm/data.py: corpus, held-out plays, batches, errors."""

import numpy as np
import pytest

from examples.lm import data as data_lib

SHAPE = dict(microbatches=4, batch_size=3, seq_len=127)   # T + 1 = 2 blocks


@pytest.fixture(scope="module")
def corpus():
  return data_lib.load_corpus(seq_len=128)


def test_held_out_plays_are_whole_and_disjoint(corpus):
  plays = data_lib.shakespeare_plays()
  assert len(plays) == 38
  val, test = set(data_lib.VALIDATION_PLAYS), set(data_lib.TEST_PLAYS)
  assert val <= set(plays) and test <= set(plays) and not val & test
  train = corpus.train.tobytes()
  sizes = {n: p.stat().st_size for n, p in plays.items()}
  sep = len(b"\n\n")
  train_plays = [n for n in plays if n not in val | test]
  assert len(train) == sum(sizes[n] for n in train_plays) + sep * (
      len(train_plays) - 1)
  assert len(corpus.val) == sum(sizes[n] for n in val) + sep * (len(val) - 1)
  for name in val | test:     # no passage of a held-out play is trained on
    text = plays[name].read_bytes()
    for start in range(0, len(text) - 400, len(text) // 5):
      assert train.find(text[start:start + 400]) == -1, name
  assert corpus.test.tobytes().find(
      plays["macbeth"].read_bytes()[:1000]) != -1
  assert corpus.vocab_size == 256 and corpus.train.dtype == np.uint8


def test_train_batches_are_a_pure_function_of_seed_and_step(corpus):
  a = data_lib.train_batch(corpus.train, seed=1, step=7, **SHAPE)
  b = data_lib.train_batch(corpus.train, seed=1, step=7, **SHAPE)
  assert a.shape == (4, 3, 128) and a.dtype == np.int32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, data_lib.train_batch(
      corpus.train, seed=1, step=8, **SHAPE))
  assert not np.array_equal(a, data_lib.train_batch(
      corpus.train, seed=2, step=7, **SHAPE))
  train = corpus.train.tobytes()
  for window in a.reshape(-1, 128):       # contiguous spans of the stream
    assert train.find(window.astype(np.uint8).tobytes()) != -1


def test_noise_replaces_20_to_40_percent_of_blocks(corpus):
  shape = dict(microbatches=8, batch_size=8, seq_len=639)   # 10 blocks of 64
  clean = data_lib.train_batch(corpus.train, seed=0, step=3, **shape)
  noisy = data_lib.train_batch(corpus.train, seed=0, step=3, noise=1.0,
                               **shape)
  half = data_lib.train_batch(corpus.train, seed=0, step=3, noise=0.5,
                              **shape)
  blocks = lambda x: x.reshape(64, 10, 64)
  changed = (blocks(clean) != blocks(noisy)).any(-1).sum(-1)
  assert changed.min() >= 1 and changed.max() <= 4      # round(0.2..0.4 * 10)
  assert changed.mean() >= 2
  frac_noisy = (half != clean).any(-1).mean()
  assert 0.25 < frac_noisy < 0.75
  train = corpus.train.tobytes()
  for i, j in zip(*np.nonzero((blocks(clean) != blocks(noisy)).any(-1))):
    span = blocks(noisy)[i, j].astype(np.uint8).tobytes()
    assert train.find(span) != -1        # replaced by a span of the corpus


def test_eval_batches_are_fixed_and_cover_the_split(corpus):
  a = data_lib.eval_batches(corpus.val, num_batches=2, **SHAPE)
  np.testing.assert_array_equal(
      a, data_lib.eval_batches(corpus.val, num_batches=2, **SHAPE))
  assert a.shape == (2, 4, 3, 128)
  flat = a.reshape(-1, 128)
  np.testing.assert_array_equal(flat[0], corpus.val[:128])
  np.testing.assert_array_equal(flat[-1], corpus.val[-128:])


def test_text_file_folder_and_npy(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "b.txt").write_text("b" * 300)
  (tmp_path / "docs" / "a.txt").write_text("é" * 150)      # 2 bytes each
  (tmp_path / "docs" / ".hidden").write_text("x" * 999)
  c = data_lib.load_corpus(str(tmp_path / "docs"), seq_len=10)
  stream = np.concatenate([c.train, c.val, c.test])
  assert stream.tobytes() == ("é" * 150 + "\n\n" + "b" * 300).encode()
  assert len(c.val) + len(c.test) == int(len(stream) * 0.1)
  ids = np.arange(5000) % 1000
  np.save(tmp_path / "ids.npy", ids)
  c = data_lib.load_corpus(str(tmp_path / "ids.npy"), vocab_size=1000,
                           seq_len=16)
  np.testing.assert_array_equal(c.train, ids[:4500])
  np.testing.assert_array_equal(c.val, ids[4500:4750])
  np.testing.assert_array_equal(c.test, ids[4750:])
  assert c.vocab_size == 1000


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    data_lib.load_corpus(str(tmp_path / "missing.txt"), seq_len=8)
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="empty"):
    data_lib.load_corpus(str(tmp_path / "empty.txt"), seq_len=8)
  (tmp_path / "short.txt").write_text("to be or not to be " * 5)
  with pytest.raises(ValueError, match="shorter than one sequence"):
    data_lib.load_corpus(str(tmp_path / "short.txt"), seq_len=64)
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(ValueError, match="no files"):
    data_lib.load_corpus(str(tmp_path / "empty_dir"), seq_len=8)
  np.save(tmp_path / "ids.npy", np.arange(100))
  with pytest.raises(ValueError, match="--vocab-size"):
    data_lib.load_corpus(str(tmp_path / "ids.npy"), seq_len=8)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    data_lib.load_corpus(str(tmp_path / "ids.npy"), vocab_size=50, seq_len=8)
  with pytest.raises(ValueError, match="unknown plays"):
    data_lib.load_plays(["hamlet", "not-a-play"])


def test_play_lists_expand_genres_and_keep_held_out_plays_out():
  plays = data_lib.shakespeare_plays()
  tragedies = sorted(n for n, p in plays.items()
                     if p.parent.name == "tragedies")
  assert data_lib.select_plays("tragedies") == tuple(tragedies)
  assert data_lib.select_plays("macbeth,tragedies,macbeth")[0] == "macbeth"
  assert len(data_lib.select_plays("macbeth,tragedies")) == len(tragedies)
  assert "macbeth" not in data_lib.select_plays("tragedies",
                                                exclude={"macbeth"})
  c = data_lib.load_corpus(seq_len=128, train_plays="comedies,hamlet",
                           val_plays="king-lear",
                           test_plays="macbeth,romeo-and-juliet")
  comedies = [n for n, p in plays.items() if p.parent.name == "comedies"]
  sep = b"\n\n"
  assert c.train.tobytes() == sep.join(
      plays[n].read_bytes() for n in comedies + ["hamlet"])
  assert c.val.tobytes() == plays["king-lear"].read_bytes()
  assert c.test.tobytes() == sep.join(
      plays[n].read_bytes() for n in ("macbeth", "romeo-and-juliet"))
  # A genre skips the default held-out plays; the default lists still apply.
  c = data_lib.load_corpus(seq_len=128, train_plays="comedies")
  held = set(data_lib.VALIDATION_PLAYS) | set(data_lib.TEST_PLAYS)
  assert c.train.tobytes() == sep.join(
      plays[n].read_bytes() for n in comedies if n not in held)
  assert c.test.tobytes() == sep.join(
      plays[n].read_bytes() for n in data_lib.TEST_PLAYS)


@pytest.mark.parametrize("kwargs,match", [
    (dict(train_plays="macbeth"), "held out"),
    (dict(train_plays="hamlet", val_plays="othello", test_plays="othello"),
     "both the validation and the test"),
    (dict(train_plays="sonnets"), "unknown play or genre"),
    (dict(train_plays="twelfth-night,henry-v",
          test_plays="twelfth-night,henry-v"), "held out"),
    (dict(train_plays=" , "), "unknown play or genre"),
])
def test_bad_play_lists(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data_lib.load_corpus(seq_len=128, **kwargs)


def test_play_lists_need_the_shakespeare_corpus(tmp_path):
  (tmp_path / "a.txt").write_text("x" * 1000)
  with pytest.raises(ValueError, match="cannot be used with --data"):
    data_lib.load_corpus(str(tmp_path / "a.txt"), seq_len=8,
                         train_plays="hamlet")
