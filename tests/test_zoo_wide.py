"""A wide model zoo: every architecture either prunes exactly or is refused with a structkit message.

Each model (random weights, eval mode, float64, BatchNorm weights, biases and running statistics randomised so
that a wrong removal shows) gets a ``channels`` rule on every layer; 40% of every block's groups are zeroed;
then ``prune``. A model is

* **exact** when the slim model has fewer parameters and agrees with the trained one to ``1e-10`` relative
  (``verify(..., dtype=torch.float64)``);
* **refused** when ``group_parameters`` raises structkit's ValueError because every layer had to be left out,
  each with a reason (a model whose graph torch-pruning cannot trace, for instance).

Anything else fails the test: a wrong result (which ``prune`` would have raised on), a raw third-party error,
or a hang (every dependency-graph call runs under ``graph_timeout``). ``REFUSED`` lists the models expected to
be refused (with a fragment of the reason), and at most 10% of the zoo may be in it.
"""
from __future__ import annotations

import time

import pytest
import torch
import torchvision

from structkit import group_parameters, prune, verify

from .test_structure import one_thread  # noqa: F401  (autouse fixture)
from .test_structure import randomize_batchnorm, zero_some_groups

pytestmark = pytest.mark.slow

# name -> input side (pixels). "tv:" = torchvision, else timm. Comments say which failure class the model covers.
ZOO: dict[str, int] = {
    # torchvision
    "tv:resnet18": 64,
    "tv:mobilenet_v2": 64,
    "tv:mobilenet_v3_small": 64,           # squeeze-excitation, hardswish
    "tv:shufflenet_v2_x0_5": 64,           # channel shuffle, chunk
    "tv:squeezenet1_1": 64,                # concatenation (fire modules)
    "tv:mnasnet0_5": 64,
    "tv:efficientnet_b0": 64,
    "tv:regnet_y_400mf": 64,               # grouped convs + SE
    "tv:googlenet": 64,                    # Inception-style concatenation
    "tv:inception_v3": 75,                 # Inception (minimum input 75)
    "tv:swin_t": 64,                       # group search blows up in torch-pruning (guarded)
    # timm: the failure classes of issue 15
    "ghostnet_050": 64,                    # ghost modules: concat + slice
    "repghostnet_050": 64,                 # re-parameterisable ghost modules
    "mixnet_s": 64,                        # mixed kernels: stored split sizes
    "res2net50_14w_8s": 64,                # multi-scale residual splits
    "fasternet_t0": 64,                    # partial convolution (split + cat)
    "dpn48b": 64,                          # dual-path (slices of a concatenated state)
    "dpn68": 64,                           # dual-path; torch-pruning cannot infer some concat widths
    "efficientnet_b0": 64,                 # BatchNormAct2d (fused norm + activation)
    "tf_efficientnet_lite0": 64,           # BatchNormAct2d with ReLU6
    "mobilenetv3_small_050": 64,
    "lcnet_050": 64,
    "mobilenetv4_conv_small_050": 64,
    "hardcorenas_a": 64,
    "semnasnet_050": 64,
    "regnetx_002": 64,
    "resnet10t": 64,
    "seresnext26d_32x4d": 64,              # grouped convs, SE, avg-pool downsample
    "skresnet18": 64,                      # selective kernels (softmax over branches)
    "cspresnet50": 64,                     # cross-stage partial (split)
    "dla46_c": 64,                         # deep layer aggregation (concat)
    "hrnet_w18_small": 64,                 # multi-resolution fusion (upsampling adds)
    "ese_vovnet19b_slim_dw": 64,           # one-shot aggregation (concat) + eSE
    "selecsls42b": 64,
    "tinynet_e": 64,
    "mobileone_s0": 64,
    "repvgg_a0": 64,
    "tresnet_m": 64,                       # space-to-depth stem, anti-aliasing functional conv
    "cs3darknet_focus_s": 64,              # focus (space-to-depth) stem, CSP splits
    "hgnetv2_b0": 64,                      # aggregation (concat) with learnable affine activations
    "ghostnetv3_050": 64,                  # ghost modules with re-parameterisable branches
    "test_byobnet": 64,
    "test_resnet": 64,
    "test_efficientnet_gn": 64,            # GroupNorm
    "test_efficientnet_ln": 64,            # LayerNorm2d
    "test_convnext": 64,                   # LayerNorm + permutes, layer scale
    "test_nfnet": 64,                      # scaled weight standardisation (weight transform, gain)
    "test_vit": 64,                        # fused qkv, attention
    "test_vit_relpos": 64,
    "vit_tiny_patch16_224": 64,
    "swin_tiny_patch4_window7_224": 56,    # hierarchical windows (reshape / roll)
    "levit_128s": 64,                      # attention with BatchNorm, hierarchical token mixing
    "mobilevit_xxs": 64,                   # unfold / fold transformers inside a CNN
    "edgenext_xx_small": 64,
    "poolformer_s12": 64,                  # GroupNorm(1) token mixer
    "fastvit_t8": 64,
}

# models expected to be refused as a whole, with a fragment of the reason
REFUSED: dict[str, str] = {}


def build(name: str):
    side = ZOO[name]
    torch.manual_seed(0)
    if name.startswith("tv:"):
        kwargs = {"num_classes": 10}
        if name in ("tv:googlenet", "tv:inception_v3"):
            kwargs.update(aux_logits=False, init_weights=False)
        model = getattr(torchvision.models, name[3:])(**kwargs)
    else:
        timm = pytest.importorskip("timm")
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10, img_size=side)
        except TypeError:  # models without an img_size argument
            model = timm.create_model(name, pretrained=False, num_classes=10)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    return model, x


def test_the_zoo_is_wide_and_at_most_a_tenth_is_refused():
    assert len(ZOO) >= 40
    assert set(REFUSED) <= set(ZOO)
    assert len(REFUSED) <= 0.1 * len(ZOO)


@pytest.mark.parametrize("name", list(ZOO))
def test_model_prunes_exactly_or_is_refused_with_a_reason(name):
    start = time.perf_counter()
    model, x = build(name)
    gen = torch.Generator().manual_seed(0)
    model, x = model.double().eval(), x.double()
    randomize_batchnorm(model, gen)
    try:
        gs = group_parameters(model, x, {"kind": "channels", "lam": 1e-3})
    except ValueError as err:
        message = str(err)
        assert name in REFUSED, f"{name} refused unexpectedly: {message[:500]}"
        assert message.startswith("the rules produced no group") and REFUSED[name] in message
        return
    assert name not in REFUSED, f"{name} was expected to be refused but got {len(gs)} groups"
    # every layer left out is listed with a reason
    assert all(module and reason for module, reason in gs.skipped)
    zero_some_groups(gs, 0.4, gen)
    slim, report = prune(model, gs, x, verify_dtype=torch.float64)
    assert report.params_after < report.params_before, f"{name}: nothing removed; kept: {report.skipped[:5]}"
    assert report.verify_rel_diff <= 1e-10
    assert verify(model, slim, x, dtype=torch.float64) <= 1e-10
    elapsed = time.perf_counter() - start
    print(f"{name}: exact, {len(gs)} groups, params {report.params_before:,} -> {report.params_after:,}, "
          f"{len(gs.skipped)} layers left out, {elapsed:.1f} s")
