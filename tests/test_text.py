"""Jane Austen's novels read offline (skipped where the Debian package or rdata is missing)."""
import pytest

from structkit.text import AUSTEN_DB, austen_chars, austen_sentences

pytestmark = pytest.mark.skipif(not AUSTEN_DB.with_suffix(".rdb").exists(),
                                reason="r-cran-janeaustenr is not installed")
pytest.importorskip("rdata")


def test_sentences_are_split_without_overlap_and_deterministic():
    train, held = austen_sentences(seed=0)
    assert len(train) > 10_000 and len(held) > 2_000
    assert not set(train) & set(held)
    assert austen_sentences(seed=0)[1][:5] == held[:5]
    assert all(5 <= len(s.split()) <= 60 for s in held[:200])


def test_char_lm_labels_are_next_characters_and_splits_are_disjoint_by_position():
    s = austen_chars(seq_len=32, limit_chars=20_000)
    x, y = s.train.tensors
    assert x.shape[1] == 32 and (x[:, 1:] == y[:, :-1]).all()
    assert len(s.val) > 0 and len(s.test) > 0 and s.num_classes > 30
