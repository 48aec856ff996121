"""The fused solver kernels (structkit/kernels.py): the arithmetic cube root against numpy's, the compiled kernels
against the eager ones, and the fallback when torch.compile fails or is switched off."""
import numpy as np
import pytest
import torch

from structkit import kernels
from structkit.kernels import _FusedKernel, cube_root, dual_point, dual_step


@pytest.mark.parametrize("dtype, lo, hi, ulps", [(torch.float32, -45, 38, 2.5), (torch.float64, -320, 300, 4.0)])
def test_cube_root_is_within_a_few_ulp_of_numpy_everywhere(dtype, lo, hi, ulps):
    """Over the whole positive range (subnormals, the rescaled tiny inputs, huge values), and 0 -> 0."""
    x = torch.logspace(lo, hi, 200_001, dtype=torch.float64).to(dtype)
    x = torch.cat([x[(x > 0) & torch.isfinite(x)], torch.tensor([0.0, 1.0, 8.0, 27.0], dtype=dtype)])
    y = cube_root(x)
    ref = torch.from_numpy(np.cbrt(x.double().numpy()))
    rel = ((y.double() - ref).abs() / ref.clamp_min(torch.finfo(torch.float64).tiny))
    assert y[-4] == 0 and torch.allclose(y[-3:].double(), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
                                         rtol=ulps * torch.finfo(dtype).eps, atol=0)
    assert rel.max() <= ulps * torch.finfo(dtype).eps, (rel.max(), x[rel.argmax()])


def _state(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(n, generator=g, dtype=dtype)
    U = torch.rand(n, generator=g, dtype=dtype) * 1e-2
    U[:7] = 0  # entries that never had a gradient
    W0 = torch.randn(n, generator=g, dtype=dtype)
    grad = torch.randn(n, generator=g, dtype=dtype) * 1e-2
    grad[:3] = 0
    return grad, V, U, W0


@pytest.mark.parametrize("scaled", [False, True])
def test_the_compiled_dual_step_equals_the_eager_one_and_the_formula(scaled, monkeypatch):
    """float32 (what the compiled kernels run on), at a size the compiled path takes."""
    dtype, n, s, eps = torch.float32, kernels.MIN_NUMEL + 7, 0.03, 1e-6
    if not dual_step.enabled(torch.zeros(n, dtype=dtype)):
        pytest.skip("torch.compile is switched off here (STRUCTKIT_COMPILE=0)")
    grad, V, U, W0 = _state(n, dtype)
    outs = {}
    for name, fn in {"fused": dual_step, "eager": kernels._dual_step_eager}.items():
        z, Vc, Uc, P = grad.clone(), V.clone(), U.clone(), torch.empty_like(V)
        fn(z, Vc, Uc, W0, s, eps, P, scaled)
        outs[name] = (z, Vc, Uc, P)
    assert dual_step._compiled is not None and not dual_step._broken  # the compiled kernel ran
    V_ref, U_ref = (V.double() + s * grad.double()), (U.double() + s * grad.double() ** 2)
    P_ref = torch.from_numpy(np.cbrt(U_ref.numpy())) + eps
    z_ref = P_ref * W0.double() - V_ref if scaled else W0.double() - V_ref / P_ref
    tol = 3e-6
    for z, Vc, Uc, P in outs.values():
        for got, ref in ((z, z_ref), (Vc, V_ref), (Uc, U_ref), (P, P_ref)):
            assert torch.allclose(got.double(), ref, rtol=tol, atol=tol), (got.double() - ref).abs().max()
    # the screening point is the same quantity without the update
    P2, z2 = torch.empty_like(V), torch.empty_like(V)
    dual_point(outs["fused"][2], outs["fused"][1], W0, eps, P2, z2, scaled)
    assert torch.equal(P2, outs["fused"][3]) and torch.allclose(z2, outs["fused"][0], rtol=tol, atol=tol)


def test_a_failing_compile_warns_once_and_the_eager_kernel_takes_over(monkeypatch):
    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler\nsecond line")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.delenv("STRUCTKIT_COMPILE", raising=False)
    kernel = _FusedKernel(kernels._dual_step_fused, kernels._dual_step_eager)
    monkeypatch.setattr(kernels, "MIN_NUMEL", 1)
    grad, V, U, W0 = _state(100, torch.float32)
    P = torch.empty_like(V)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*RuntimeError: no C\\+\\+ compiler.*STRUCTKIT_COMPILE=0"):
        kernel(grad.clone(), V.clone(), U.clone(), W0, 0.1, 1e-6, P, True)
    assert kernel._broken and not kernel.enabled(V)
    z, Vc, Uc = grad.clone(), V.clone(), U.clone()
    kernel(z, Vc, Uc, W0, 0.1, 1e-6, P, True)  # no second warning (pytest's filter would turn it into an error)
    assert torch.allclose(Vc, V + 0.1 * grad)


def test_small_float64_or_non_cpu_vectors_and_structkit_compile_0_use_the_eager_kernels(monkeypatch):
    kernel = _FusedKernel(kernels._dual_step_fused, kernels._dual_step_eager)
    x = torch.zeros(kernels.MIN_NUMEL)
    monkeypatch.setenv("STRUCTKIT_COMPILE", "0")
    assert not kernel.enabled(x)
    monkeypatch.setenv("STRUCTKIT_COMPILE", "1")
    assert kernel.enabled(x) and not kernel.enabled(x[1:]) and not kernel.enabled(x.double())
    assert not kernel.enabled(x.to(torch.bfloat16)) and not kernel.enabled(x.to("meta"))
