"""File writing shared by the pipeline, the report, distillation and the slim-model format: atomic writes, JSON
with the encodings structkit needs (numpy scalars, paths, dtypes, devices), and ``torch.load`` restricted to
weights (tensors and plain data; never unpickles code)."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "write_text", "write_json", "json_default", "json_dumps", "save_torch", "load_weights"]


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, then ``os.replace`` it onto
    ``path``: a reader sees the old file or the complete new one, never a partial one. The temporary file is
    named ``.NAME.PID.RANDOM.tmp`` (a killed writer leaves such files; they are never complete files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars as numbers, paths / dtypes / devices as strings,
    tuples and sets as lists (sets sorted); anything else is a TypeError naming its type."""
    import numpy as np
    import torch

    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def json_dumps(data: Any, indent: int | None = 2) -> str:
    return json.dumps(data, indent=indent, default=json_default)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json_dumps(data) + "\n")


def save_torch(path: str | Path, data: Any) -> None:
    """``torch.save(data)`` atomically (see :func:`atomic_write`)."""
    import torch
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def load_weights(path: str | Path, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain Python data (dicts, lists, tuples, numbers,
    strings, None) only; a file holding anything else -- pickled classes or functions, numpy arrays -- is refused
    before any of it runs. Every failure (missing, truncated, tampered, not a torch file) is a ValueError that
    names the file and says it is not a usable ``what``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # an object weights-only loading refuses: nothing of it was run
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        refers = f" (it refers to {found.group(1)})" if found else ""
        raise ValueError(f"{path} is not a usable {what}: it holds pickled Python objects{refers}, which structkit "
                         f"never loads; a {what} holds tensors and plain data only. Nothing in the file was run."
                         ) from None
    except Exception as err:  # RuntimeError (truncated zip), EOFError, OSError ...
        detail = " ".join(str(err).split())[:200]
        raise ValueError(f"{path} is not a usable {what}: it is truncated, corrupt or not a torch file "
                         f"({type(err).__name__}: {detail}).") from None
