"""Jane Austen's six novels, read offline from Debian's ``r-cran-janeaustenr`` package.

The R package stores its data as a lazy-load database: ``Rdata.rdx`` (an index, compressed) and
``Rdata.rdb`` (each object zlib-compressed after a 4-byte length header, at the offset the index gives).
The PyPI package ``rdata`` (the ``transformers`` extra) decodes R's serialisation format.

* :func:`austen_novels` -> ``{title: [line, ...]}``;
* :func:`austen_sentences` -> deduplicated sentences, deterministically split into train / held-out;
* the registered data set ``austen_chars``: a character-level language-modelling task (inputs: ``seq_len``
  characters, labels: the next character at every position), split by position in the text so validation
  and test text is never trained on.
"""
from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .data import Splits, register_dataset

AUSTEN_DB = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")
_FIX = "install it with 'apt-get install r-cran-janeaustenr' and 'pip install rdata' (the transformers extra)"


def _unpack(blob: bytes):
    import rdata  # optional dependency
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rdata warns that the stream has no file header
        return rdata.conversion.convert(rdata.parser.parse_data(blob, expand_altrep=True))


def austen_novels(db: str | Path = AUSTEN_DB) -> dict[str, list[str]]:
    """The six novels as lists of text lines (title -> lines), in the package's order."""
    db = Path(db)
    rdx, rdb = db.with_suffix(".rdx"), db.with_suffix(".rdb")
    if not rdx.exists() or not rdb.exists():
        raise FileNotFoundError(f"Jane Austen's novels not found at {db}.rd[xb]: {_FIX}.")
    try:
        import rdata  # noqa: F401
    except ImportError as e:
        raise ImportError(f"reading Jane Austen's novels needs the 'rdata' package: {_FIX}.") from e
    raw = rdx.read_bytes()
    index = _unpack(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:]))
    data = rdb.read_bytes()
    novels = {}
    for title, (offset, length) in index["variables"].items():
        blob = data[int(offset): int(offset) + int(length)]
        try:
            novels[str(title)] = [str(line) for line in _unpack(zlib.decompress(blob[4:]))]
        except (zlib.error, ValueError) as e:
            raise ValueError(f"{rdb} is corrupt at object {title!r} ({e}); reinstall r-cran-janeaustenr.") from e
    return novels


def austen_sentences(min_words: int = 5, max_words: int = 60, held_out_fraction: float = 0.2,
                     seed: int = 0) -> tuple[list[str], list[str]]:
    """Deduplicated sentences of 5-60 words from all six novels, shuffled with ``seed`` and split into
    (train, held_out); no sentence appears in both."""
    text = " ".join(" ".join(lines) for lines in austen_novels().values())
    text = re.sub(r"\s+", " ", text)
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text)
    seen, unique = set(), []
    for s in sentences:
        s = s.strip()
        if min_words <= len(s.split()) <= max_words and s not in seen and not s.isupper():
            seen.add(s)
            unique.append(s)
    order = np.random.default_rng(seed).permutation(len(unique))
    n_held = int(round(held_out_fraction * len(unique)))
    held = [unique[i] for i in order[:n_held]]
    train = [unique[i] for i in order[n_held:]]
    return train, held


@register_dataset("austen_chars")
def austen_chars(seq_len: int = 128, limit_chars: int | None = None, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, seed: int = 0) -> Splits:
    """Character-level language modelling on the novels: non-overlapping windows of ``seq_len`` characters;
    the last ``val_fraction + test_fraction`` of the text (by position) is held out. ``num_classes`` is the
    vocabulary size; inputs and labels are int64 ``[N, seq_len]`` (labels shifted by one character)."""
    text = "\n".join("\n".join(lines) for lines in austen_novels().values())
    if limit_chars:
        text = text[:limit_chars]
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1: n * seq_len + 1].view(n, seq_len)
    n_test, n_val = int(n * test_fraction), int(n * val_fraction)
    n_train = n - n_val - n_test
    g = torch.Generator().manual_seed(seed)
    train_idx = torch.randperm(n_train, generator=g)
    return Splits(train=TensorDataset(x[train_idx], y[train_idx]),
                  val=TensorDataset(x[n_train:n_train + n_val], y[n_train:n_train + n_val]),
                  test=TensorDataset(x[n_train + n_val:], y[n_train + n_val:]),
                  input_shape=(seq_len,), num_classes=len(vocab), name="austen_chars")
