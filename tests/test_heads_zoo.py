"""Attention heads of more model styles prune exactly: Hugging Face DistilBERT, timm ViT (fused qkv), GPT-2
(Conv1D, fused c_attn) and Llama-style grouped-query attention (whole key/value groups). Random weights (no
downloads), ~40% of each layer's head groups zeroed, then pruned: fewer parameters, the same outputs (float32
1e-5 and float64 1e-10 relative to the output scale), and the slim model still runs at another length."""
import pytest
import torch
from torch import nn

from structkit import group_parameters, load_slim, prune, save_slim, verify

from .test_structure import one_thread  # noqa: F401  (autouse fixture)
from .test_structure import zero_some_groups

HEADS = {"kind": "heads", "lam": 1e-3}


def tokens(vocab: int, length: int, batch: int = 2, mask: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(0, vocab, (batch, length), generator=g)}
    if mask:
        x["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
        x["attention_mask"][-1, length - 2:] = 0
    return x


def distilbert():
    t = pytest.importorskip("transformers")
    cfg = t.DistilBertConfig(vocab_size=60, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=32)
    return t.DistilBertModel(cfg), tokens(60, 9), tokens(60, 13, seed=1)


def gpt2():
    t = pytest.importorskip("transformers")
    cfg = t.GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    return t.GPT2Model(cfg), {**tokens(60, 9), "use_cache": False}, {**tokens(60, 13, seed=1), "use_cache": False}


def llama():
    t = pytest.importorskip("transformers")
    cfg = t.LlamaConfig(vocab_size=60, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    return t.LlamaModel(cfg), {**tokens(60, 9), "use_cache": False}, {**tokens(60, 13, seed=1), "use_cache": False}


def vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=4, num_classes=5, dynamic_img_size=True)
    g = torch.Generator().manual_seed(0)
    return model, torch.randn(2, 3, 32, 32, generator=g), torch.randn(1, 3, 48, 48, generator=g)


STYLES = {"distilbert": distilbert, "timm vit": vit, "gpt2": gpt2, "llama gqa": llama}


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (HF zero-initialises biases; norms start at weight 1, bias 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = p.dim() == 1 and "norm" in name.lower() and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if norm_weight else 0.0))


def pruned(style: str, dtype=torch.float32):
    model, x, other = STYLES[style]()
    randomize(model)
    model = model.to(dtype).eval()
    gs = group_parameters(model, x, [HEADS])
    zero_some_groups(gs, 0.4, torch.Generator().manual_seed(0))
    slim, report = prune(model, gs, x, verify_dtype=torch.float64)
    return model, slim, report, gs, x, other


@pytest.mark.transformers
@pytest.mark.parametrize("style", list(STYLES))
def test_heads_of_each_style_prune_exactly(style):
    model, slim, report, gs, x, other = pruned(style)
    assert len(gs.blocks) == 2 and not gs.skipped, gs.describe()
    assert report.params_after < report.params_before
    assert all(e["unit"] == "heads" and e["after"] < e["before"] for e in report.layers.values())
    assert verify(model, slim, x) <= 1e-5
    assert verify(model, slim, x, dtype=torch.float64) <= 1e-10
    assert verify(model, slim, other, dtype=torch.float64) <= 1e-10  # another sequence length / image size
    assert report.verify_rel_diff <= 1e-10 and report.verify_dtype == "float64"


@pytest.mark.transformers
def test_llama_removes_whole_key_value_groups():
    model, slim, report, gs, x, _ = pruned("llama gqa")
    for dense, thin in zip(model.layers, slim.layers):
        a, b = dense.self_attn, thin.self_attn
        groups = b.k_proj.out_features // b.head_dim
        assert groups < a.k_proj.out_features // a.head_dim
        assert b.q_proj.out_features == b.o_proj.in_features == groups * a.num_key_value_groups * b.head_dim
        assert b.v_proj.out_features == groups * b.head_dim and b.num_key_value_groups == a.num_key_value_groups
    assert next(iter(report.layers.values()))["total_groups"] == 4  # key/value groups, not query heads


@pytest.mark.transformers
def test_gpt2_and_timm_update_their_head_counts():
    _, slim, *_ = pruned("gpt2")
    for block in slim.h:
        a = block.attn
        assert a.split_size == a.num_heads * a.head_dim == a.c_proj.nx
        assert a.c_attn.nf == 3 * a.split_size == a.c_attn.weight.shape[1]
    _, slim, *_ = pruned("timm vit")
    for block in slim.blocks:
        a = block.attn
        assert a.attn_dim == a.num_heads * a.head_dim == a.proj.in_features and a.qkv.out_features == 3 * a.attn_dim


@pytest.mark.transformers
@pytest.mark.parametrize("style", list(STYLES))
def test_slim_models_of_each_style_save_and_load(style, tmp_path):
    model, slim, _, _, x, other = pruned(style)
    save_slim(slim, tmp_path / "slim.pt")
    build = (lambda: STYLES[style]()[0]) if style == "timm vit" else None  # timm models record no source
    loaded = load_slim(tmp_path / "slim.pt", build=build)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in slim.parameters())
    assert verify(model, loaded, other, dtype=torch.float64) <= 1e-10


class OddAttention(nn.Module):
    """Looks like fused attention but keeps a per-head parameter the layouts do not know (like BEiT's
    relative position bias): must be refused, not pruned."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.head_bias = nn.Parameter(torch.randn(heads))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) + self.head_bias[:, None, None]).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, N, -1))


class Unknown(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.n_head, self.to_qkv, self.out = 4, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.out(self.to_qkv(x)[..., :16])


def test_unrecognised_attention_is_refused_with_a_reason():
    model = nn.Sequential(OddAttention(), nn.Linear(16, 16), Unknown())
    with pytest.raises(ValueError, match="produced no group") as err:
        group_parameters(model, torch.randn(2, 5, 16), [HEADS])
    assert "head_bias" in str(err.value) and "not a recognised layout" in str(err.value)
    gs = group_parameters(nn.Sequential(OddAttention(), MHA()), torch.randn(2, 5, 16), [HEADS])
    text = gs.describe()
    assert "0: has parameters of its own (head_bias)" in text and [b.label for b in gs.blocks] == ["1.attn"]


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.transformers
def test_gpt2_cross_attention_is_refused():
    t = pytest.importorskip("transformers")
    cfg = t.GPT2Config(vocab_size=60, n_embd=32, n_layer=1, n_head=4, n_positions=32, add_cross_attention=True,
                       bos_token_id=0, eos_token_id=0)
    model = t.GPT2Model(cfg).eval()
    x = {**tokens(60, 6, mask=False), "encoder_hidden_states": torch.randn(2, 4, 32), "use_cache": False}
    gs = group_parameters(model, x, [HEADS])
    assert [b.label for b in gs.blocks] == ["h.0.attn"]
    assert "h.0.crossattention: cross-attention (q_attn) is not supported" in gs.describe()


class Hidden(nn.Module):
    """A Hugging Face model called with positional (input_ids, attention_mask), returning the last hidden state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        extra = {} if type(self.model).__name__.startswith("DistilBert") else {"use_cache": False}
        return self.model(input_ids=ids, attention_mask=mask, **extra).last_hidden_state


@pytest.mark.transformers
@pytest.mark.parametrize("style", list(STYLES))
def test_slim_models_of_each_style_export_to_onnx(style, tmp_path):
    pytest.importorskip("onnxruntime")
    from structkit.deploy import export_onnx

    _, slim, _, _, x, _ = pruned(style)
    if isinstance(x, torch.Tensor):
        info = export_onnx(slim, x, tmp_path / "slim.onnx")
    else:
        info = export_onnx(Hidden(slim), (x["input_ids"], x["attention_mask"]), tmp_path / "slim.onnx")
    assert info["max_abs_diff"] is not None and info["bytes"] > 0


def test_timm_attention_with_a_norm_over_all_heads_or_a_gate_is_refused():
    pytest.importorskip("timm")
    from timm.layers.attention import Attention

    model = nn.Sequential(Attention(16, 4, scale_norm=True, norm_layer=nn.LayerNorm), Attention(16, 4, gated=True),
                          Attention(16, 4, qk_norm=True, norm_layer=nn.LayerNorm))
    gs = group_parameters(model, torch.randn(2, 5, 16), [HEADS])
    assert [b.label for b in gs.blocks] == ["2"]  # q_norm / k_norm act on each head alone: fine
    text = gs.describe()
    assert "0: a norm over all heads (scale_norm) is not supported" in text
    assert "1: a gated attention output (gate) is not supported" in text
