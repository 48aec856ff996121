"""Element-wise kernels of the RAMDA step, fused into one pass over memory by ``torch.compile`` on the CPU.

Most of a RAMDA step is element-wise work over the flat state: ``V += s g``, ``U += s g^2``, the metric
``P = U^(1/3) + eps`` and the subproblem's centre ``z = W0 - V / P`` (or its scaled form ``P z = P W0 - V``, what
the group lasso's solver starts from). Op by op that is eight passes over parameter-sized memory plus two
``_foreach`` calls over the parameters, and the eager cube root ``exp2(log2(U) / 3)`` is bound by its two
transcendental functions. :data:`dual_step` does it in one pass over flat vectors (the caller first gathers the
gradients end to end, one ``torch.cat``): Inductor fuses the expression into one vectorised C++ loop, and the
cube root is computed with arithmetic only (:func:`cube_root`: a bit-level first guess refined by Halley's
iteration), which vectorises and leaves the loop memory-bound. On resnet18 (11.2M regularized entries, 2 cores)
the whole RAMDA optimizer step went from 1.88x to 1.49x an AdamW step (``benchmarks/results/solver_overhead.json``;
1.2x-1.5x over four runs).

The compiled kernels run on float32 CPU vectors of at least :data:`MIN_NUMEL` entries. Everywhere else -- smaller
param groups, float64, CUDA (the fused path has not been tested on a GPU; eager GPU kernels are fast anyway),
``STRUCTKIT_COMPILE=0`` in the environment, or after ``torch.compile`` failed (no C++ compiler, for example: a
warning says so once and the eager kernels take over for the rest of the process) -- the same quantities are
computed op by op, with ``exp2(log2(U) / 3)``. Both cube roots are within a few ulp of the exact one (float32:
<= 2 ulp arithmetic, <= 23 ulp ``exp2(log2(U) / 3)``), so the two paths agree to rounding. The first compile
of each kernel takes about 15 s on 2 cores; Inductor caches it on disk, so later runs load it in a second or two.
"""
from __future__ import annotations

import os
import warnings

import torch

#: Halley iterations after the bit-level guess (relative error <= 3.3%): the error is cubed by each one, so two
#: reach float32's rounding and three float64's
_HALLEY_ITERS = {torch.float32: 2, torch.float64: 3}
#: per float type: the integer type of the same width, and the bit pattern added to one third of the input's
#: bits (the exponent divided by 3, plus the bias that division lost); Kahan's constants for cbrt
_BITS = {torch.float32: (torch.int32, 709921077), torch.float64: (torch.int64, 3071306043645493747)}


def cube_root(x: torch.Tensor) -> torch.Tensor:
    r"""``x^(1/3)`` for ``x >= 0`` (float32 / float64), with arithmetic only.

    First guess: the bits of ``x`` read as an integer, divided by 3, plus a constant -- dividing the exponent by
    3 -- which is within 3.3% of the root. Then Halley's iteration for ``y^3 = x``,
    :math:`y \leftarrow y\,(y^3 + 2x) / (2y^3 + x)`, cubes the relative error each time. Inputs below
    :math:`2^{-96}` are scaled by :math:`2^{96}` first (the root by :math:`2^{-32}` after), so that ``y^3``
    never underflows; 0 maps to 0. Worth it only inside a fused kernel: op by op it is ~15 passes."""
    int_type, magic = _BITS[x.dtype]
    tiny = x < 2.0 ** -96
    xs = torch.where(tiny, x * 2.0 ** 96, x)
    y = ((xs.view(int_type).to(x.dtype) * (1 / 3)).to(int_type) + magic).view(x.dtype)
    for _ in range(_HALLEY_ITERS[x.dtype]):
        y3 = y * y * y
        y = y * ((y3 + 2 * xs) / (2 * y3 + xs))
    y = torch.where(tiny, y * 2.0 ** -32, y)
    return torch.where(x > 0, y, x)


def _point(u, v, W0, eps, scaled):
    p = cube_root(u) + eps
    return p, (p * W0 - v if scaled else W0 - v / p)


def _dual_point_fused(U, V, W0, eps, P, z, scaled) -> None:
    p, centre = _point(U, V, W0, eps, scaled)
    P.copy_(p)
    z.copy_(centre)


def _dual_point_eager(U, V, W0, eps, P, z, scaled) -> None:
    torch.log2(U, out=P).mul_(1 / 3).exp2_().add_(eps)
    if scaled:
        torch.addcmul(V, P, W0, value=-1, out=z).neg_()
    else:
        torch.addcdiv(W0, V, P, value=-1, out=z)


def _dual_step_fused(z, V, U, W0, s, eps, P, scaled) -> None:
    v = V + s * z
    u = U + s * z * z
    p, centre = _point(u, v, W0, eps, scaled)
    V.copy_(v)
    U.copy_(u)
    P.copy_(p)
    z.copy_(centre)


def _dual_step_eager(z, V, U, W0, s, eps, P, scaled) -> None:
    V.add_(z, alpha=s)
    U.addcmul_(z, z, value=s)
    _dual_point_eager(U, V, W0, eps, P, z, scaled)


#: the smallest flat vector the compiled kernels run on: below it a step costs little either way, and the one-time
#: compile (about 15 s per kernel on 2 cores, then cached on disk by Inductor) would not pay for itself
MIN_NUMEL = 1 << 20


class _FusedKernel:
    """``fused`` compiled by Inductor on CPU tensors, else ``eager``; a failed compile warns once and leaves the
    eager kernel in charge for the rest of the process."""

    def __init__(self, fused, eager):
        self._fused, self._eager = fused, eager
        self._compiled = None
        self._broken = False

    def enabled(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() >= MIN_NUMEL and not self._broken
                and os.environ.get("STRUCTKIT_COMPILE", "1") != "0")

    def __call__(self, *args) -> None:
        if self.enabled(args[0]):
            if self._compiled is None:
                self._compiled = torch.compile(self._fused, dynamic=True)
            try:
                return self._compiled(*args)
            except Exception as error:  # noqa: BLE001 - any compile failure: the eager kernel is always correct
                self._broken = True
                warnings.warn(f"structkit: torch.compile failed for the fused solver kernel ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); the solvers fall back to "
                              "eager kernels, which are correct but slower. Set STRUCTKIT_COMPILE=0 to skip the "
                              "attempt.", RuntimeWarning, stacklevel=2)
        return self._eager(*args)


#: ``dual_point(U, V, W0, eps, P, z, scaled)``: writes ``P = U^(1/3) + eps`` and the subproblem's centre
#: ``z = W0 - V / P`` into ``z``, or with ``scaled=True`` its scaled form ``P z = P W0 - V`` (no division; what the
#: group lasso's solver starts from). Flat tensors of one size; ``eps`` a float.
dual_point = _FusedKernel(_dual_point_fused, _dual_point_eager)

#: ``dual_step(z, V, U, W0, s, eps, P, scaled)``: RAMDA's dual update and point in one pass. ``z`` holds the
#: gradient on entry; then ``V += s z``, ``U += s z^2`` and :data:`dual_point` of the new state, its centre (or
#: scaled centre) written into ``z``. Flat tensors of one size; ``s`` and ``eps`` floats.
dual_step = _FusedKernel(_dual_step_fused, _dual_step_eager)
