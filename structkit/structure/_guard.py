"""Guards around torch-pruning's dependency graph: a time limit, a cycle guard, cleanup and rollback.

Every call structkit makes into torch-pruning (``build_dependency``, ``get_pruning_group``, ``Group.prune``)
goes through :func:`graph_call`, which

* runs it under a **time limit** (default :data:`DEFAULT_GRAPH_TIMEOUT` = 60 s; ``None`` or ``0`` disables it);
* runs it under a **cycle guard**: ``get_pruning_group`` walks the graph with a stack and stops only when it
  meets a (dependency, indices) pair it has seen; index mappings through reshapes can produce new index
  lists forever, or multiply them (each "flatten" mapping repeats every index by its stride: Swin's window
  reshapes grow them geometrically). The guard counts the entries a group search adds and stops it past
  ``10 x`` the number of dependencies in the graph plus 1,000 (a search that terminates adds each dependency
  a few times at most), or past :data:`MAX_GROUP_ENTRIES` indices in all;
* turns a timeout, a cycle, or any exception raised inside torch-pruning into a :class:`GraphError` whose
  one-line message names the layer and what went wrong, chained to the original error (``raise ... from``);
* removes forward hooks torch-pruning registered but could not remove because it was interrupted.

How the time limit works. torch-pruning is pure Python, so a loop in it can be interrupted between two
bytecodes:

* in the **main thread** (POSIX), a ``SIGALRM`` timer (``signal.setitimer(ITIMER_REAL)``) whose handler
  raises :class:`GraphTimeout`; no overhead while the call runs. If another ``ITIMER_REAL`` timer is already
  armed (e.g. pytest-timeout's signal method), structkit does not touch it and uses the trace method below;
* in **other threads** (signals are delivered to the main thread only) and on platforms without
  ``SIGALRM``, a ``sys.settrace`` function of the calling thread that checks the clock on every Python call
  and every line (except inside torch's own modules); it raises :class:`GraphTimeout` in the traced frame.
  This slows the guarded call down (a few times for Python-heavy code such as tracing a large model),
  replaces a debugger's or coverage tool's trace function of that thread while the call runs (restored
  afterwards), and cannot stop a loop that never leaves torch's own Python code.

Neither method can interrupt a single long call into C (a huge convolution): the limit is checked when it
returns. torch-pruning's own loops are Python, so both stop them.

Rollback: :class:`ModuleSnapshot` records the attributes of the modules (and torch-pruning's concat/split
bookkeeping objects) a pruning group touches, so a group whose removal fails half-way is put back exactly as
it was and the model stays consistent (its zero channels are then kept, which is still exact).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

#: default time limit, in seconds, of one call into torch-pruning's dependency graph
DEFAULT_GRAPH_TIMEOUT = 60.0


class GraphError(RuntimeError):
    """torch-pruning's dependency graph failed, looped or ran out of time on a layer (message names it)."""


class GraphTimeout(GraphError):
    """A call into the dependency graph ran past its time limit."""


class GraphCycle(GraphError):
    """A group search of the dependency graph kept finding new entries (a cycle through index mappings)."""


class GraphStop(GraphError):
    """A group search stopped early by the caller's ``stop`` check (its message is the caller's reason)."""


def check_timeout(timeout: float | None) -> float | None:
    """Validate a ``graph_timeout`` keyword: a positive number of seconds, or None / 0 for no limit."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(f"graph_timeout must be a number of seconds >= 0 (0 or None: no limit); got {timeout!r}.")
    return float(timeout) or None


# ------------------------------------------------------------------------------------------ time limit
class _Expired(BaseException):
    """Raised by the timer inside the guarded call; a BaseException so that torch-pruning's own
    ``except Exception`` blocks (its tracer has a bare ``try`` around the forward) cannot swallow it.
    Converted into :class:`GraphTimeout` at the boundary."""


_TORCH_DIR = None


def _torch_dir() -> str:
    global _TORCH_DIR
    if _TORCH_DIR is None:
        import torch
        _TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
    return _TORCH_DIR


@contextlib.contextmanager
def _signal_limit(seconds: float) -> Iterator[None]:
    state = {"armed": True}

    def expire(signum, frame):
        if state["armed"]:
            state["armed"] = False
            raise _Expired()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        state["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _trace_limit(seconds: float) -> Iterator[None]:
    deadline = time.monotonic() + seconds
    torch_dir = _torch_dir()
    clock = time.monotonic

    def local(frame, event, arg):
        if clock() > deadline:
            raise _Expired()
        return local

    def on_call(frame, event, arg):
        if clock() > deadline:
            raise _Expired()
        # line events too, except in torch's own frames (many, short, and they always return)
        return None if frame.f_code.co_filename.startswith(torch_dir) else local

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def _limit(seconds: float | None):
    if not seconds:
        return contextlib.nullcontext()
    main = threading.current_thread() is threading.main_thread()
    if main and hasattr(signal, "setitimer") and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0):
        return _signal_limit(seconds)
    return _trace_limit(seconds)


# ------------------------------------------------------------------------------------------ cycle guard
_patch_lock = threading.RLock()


#: most index entries one group search may hold (each is a small Python object: ~100 bytes)
MAX_GROUP_ENTRIES = 1_000_000


def broken_nodes(graph) -> dict:
    """Nodes of ``graph`` whose index mapping torch-pruning failed to compute (node -> error, one line). Their
    dependencies keep the identity mapping, so any group through them is wrong: callers refuse those groups."""
    return graph.__dict__.setdefault("_structkit_broken", {}) if graph is not None else {}


def _safe_update_index_mapping(graph) -> None:
    """torch-pruning's ``update_index_mapping`` node by node: a node whose update raises (a concat whose input
    widths it cannot infer, a reshape it divides by zero on) is recorded in :func:`broken_nodes` instead of
    aborting the whole graph, so the rest of the model can still be grouped."""
    import torch
    from torch_pruning import ops
    from torch_pruning.dependency import index_mapping as im

    updates = {ops.OPTYPE.CONCAT: im.update_concat_index_mapping, ops.OPTYPE.SPLIT: im.update_split_index_mapping,
               ops.OPTYPE.RESHAPE: im.update_reshape_index_mapping, ops.OPTYPE.UNBIND: im.update_unbind_index_mapping,
               ops.OPTYPE.SLICE: im.update_slice_index_mapping}
    if torch.__version__ >= "1.8":
        updates[ops.OPTYPE.EXPAND] = im.update_expand_index_mapping
    broken = broken_nodes(graph)
    for node in list(graph.module2node.values()):
        update = updates.get(node.type)
        if update is None:
            continue
        try:
            update(graph, node)
        except Exception as err:  # torch-pruning's shape inference failed on this node only
            broken[node] = f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"


@contextlib.contextmanager
def _patched(graph, reuse_mapping: bool, stop: Callable[[Any], str | None] | None = None) -> Iterator[None]:
    """Patch torch-pruning (module attributes looked up at call time) while a guarded call runs:

    * ``index_mapping.update_index_mapping`` -> :func:`_safe_update_index_mapping` (or nothing, with
      ``reuse_mapping``: valid while the model does not change between group searches; it costs O(graph)
      per call, which dominates the search on large graphs);
    * with a ``graph``: its ``Group`` class -> a subclass that counts added entries and their indices and
      raises :class:`GraphCycle` past the limits, and :class:`GraphStop` when ``stop(dependency)`` returns a
      reason (the caller would refuse the group anyway: no need to finish a search that can take minutes)."""
    from torch_pruning.dependency import graph as tp_graph

    base, mapping = tp_graph.Group, tp_graph.index_mapping.update_index_mapping
    nodes = getattr(graph, "module2node", None) or {}
    limit = 10 * sum(len(n.dependencies) for n in nodes.values()) + 1000
    counter = [0, 0]

    class CountingGroup(base):
        def add_dep(self, dep, idxs):
            counter[0] += 1
            counter[1] += len(idxs)
            if counter[0] > limit:
                raise GraphCycle(f"the group search added more than {limit} entries without finishing "
                                 "(a cycle through torch-pruning's index mappings)")
            if counter[1] > MAX_GROUP_ENTRIES:
                raise GraphCycle(f"the group search built more than {MAX_GROUP_ENTRIES:,} indices (index mappings "
                                 "through reshapes multiply them; the coupling it describes is not channel-wise)")
            if stop is not None:
                reason = stop(dep)
                if reason:
                    raise GraphStop(reason)
            super().add_dep(dep, idxs)

    with _patch_lock:
        if graph is not None:
            tp_graph.Group = CountingGroup
        tp_graph.index_mapping.update_index_mapping = (lambda g: None) if reuse_mapping else _safe_update_index_mapping
        try:
            yield
        finally:
            tp_graph.Group = base
            tp_graph.index_mapping.update_index_mapping = mapping


# ------------------------------------------------------------------------------------------ hooks
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs")


def _hook_keys(model: nn.Module | None) -> dict[nn.Module, dict[str, set]]:
    if model is None:
        return {}
    return {m: {d: set(getattr(m, d, {}) or {}) for d in _HOOK_DICTS} for m in model.modules()}


def _drop_new_hooks(before: dict[nn.Module, dict[str, set]]) -> None:
    for m, dicts in before.items():
        for d, keys in dicts.items():
            hooks = getattr(m, d, None)
            if hooks:
                for k in [k for k in hooks if k not in keys]:
                    del hooks[k]


# ------------------------------------------------------------------------------------------ the boundary
def graph_call(fn: Callable[[], Any], what: str, *, timeout: float | None, graph=None,
               model: nn.Module | None = None, reuse_mapping: bool = False,
               stop: Callable[[Any], str | None] | None = None) -> Any:
    """Run ``fn()`` (a call into torch-pruning) under the time limit and the cycle guard.

    ``what`` names the call in messages ("tracing the model", "the group of layer 'features.3'", ...);
    ``graph`` is the dependency graph a group search runs on (enables the cycle guard); ``reuse_mapping``:
    the model has not changed since the graph's index mappings were last refreshed, so the search may skip
    refreshing them; ``stop(dependency) -> reason or None`` ends a group search early with :class:`GraphStop`
    (message: the reason); ``model``: forward hooks registered on its modules during a call that fails are
    removed. Raises :class:`GraphTimeout`,
    :class:`GraphCycle` or :class:`GraphError` with a one-line message, chained to the original error.
    """
    hooks = _hook_keys(model)
    guard = _patched(graph, reuse_mapping, stop)
    try:
        with guard, _limit(timeout):
            return fn()
    except _Expired as err:
        _drop_new_hooks(hooks)
        raise GraphTimeout(f"torch-pruning did not finish {what} within {timeout:g} s (graph_timeout)") from err
    except GraphStop:
        raise
    except GraphCycle as err:
        _drop_new_hooks(hooks)
        raise GraphCycle(f"torch-pruning looped on {what}: {err}") from err
    except Exception as err:  # anything raised inside the third-party graph library
        _drop_new_hooks(hooks)
        detail = " ".join(str(err).split())
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise GraphError(f"torch-pruning failed on {what}: {type(err).__name__}"
                         + (f": {detail}" if detail else "")) from err


# ------------------------------------------------------------------------------------------ rollback
class ModuleSnapshot:
    """The attributes of some modules (and of torch-pruning's op objects: concat/split sizes, slice bounds),
    so a half-done removal can be undone with :meth:`restore`. torch-pruning replaces parameters and buffers
    instead of resizing them in place, so a shallow copy of each ``__dict__`` (with its dicts and lists
    copied one level down) is enough."""

    def __init__(self, objects):
        self._saved = []
        seen = set()
        for obj in objects:
            if id(obj) in seen or not hasattr(obj, "__dict__"):
                continue
            seen.add(id(obj))
            self._saved.append((obj, {k: _copy1(v) for k, v in vars(obj).items()}))

    def restore(self) -> None:
        for obj, state in self._saved:
            vars(obj).clear()
            vars(obj).update({k: _copy1(v) for k, v in state.items()})


def _copy1(value: Any) -> Any:
    return value.copy() if isinstance(value, (dict, list)) else value
