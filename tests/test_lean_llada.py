"""LLaDA's own layers run fused (``entrgi.lean_llada``): a model in the shape of LLaDA's
remote code (its block, norm and rotary modules, restated here with its arithmetic)
gives the stock logits and tokens with its blocks, norms and rotary modules swapped;
calls the swaps do not cover, and blocks they do not reproduce, run stock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import entrgi.lean
import entrgi.lean_llada
from entrgi import Denoiser, GuidanceConfig, generate, load_reward
from entrgi.attention import additive_mask
from entrgi.layers import LayerRunner, swapped_attributes
from entrgi.lean import lean_forwards
from entrgi.lean_llada import llada_forwards
from helpers import SWAPS_MUST_REPRODUCE, graphed_runs_match_eager

pytestmark = SWAPS_MUST_REPRODUCE
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the triton backend: native, or the interpreter
WIDTH, HEADS, HIDDEN, LAYERS = 32, 4, 48, 2


class RMSLayerNorm(torch.nn.Module):
    """LLaDA's norm: statistics in float32, cast back, then the weight (LLaDA's own have
    no bias; OLMo's code adds one where configured)."""

    def __init__(self, width: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.eps, self.weight = eps, torch.nn.Parameter(1 + 0.2 * torch.randn(width))
        self.bias = torch.nn.Parameter(torch.randn(width)) if bias else None

    def forward(self, x):
        wide = x.float()
        scaled = self.weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return scaled if self.bias is None else scaled + self.bias


class RotaryEmbedding(torch.nn.Module):
    """LLaDA's rotary module: angles of absolute positions 0..T-1, (1, 1, T, D) sin and
    cos in float32; with ``rope_full_precision`` q and k rotate in float32."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def get_rotary_embedding(self, length: int, device):
        dim = self.config.d_model // self.config.n_heads
        inverse = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim))
        angles = torch.arange(length, device=device).float()[:, None] * inverse
        angles = torch.cat([angles, angles], -1)[None, None]
        return angles.sin(), angles.cos()

    def forward(self, q, k):
        q_, k_ = (q.float(), k.float()) if self.config.rope_full_precision else (q, k)
        sin, cos = (t.type_as(q_) for t in self.get_rotary_embedding(k_.shape[-2], q.device))
        half, first = q.shape[-1] // 2, k.shape[-2] - q.shape[-2]  # queries: the last positions

        def rotate(t, cos, sin):
            return (t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin).to(t.dtype)

        return rotate(q_, cos[:, :, first:], sin[:, :, first:]).type_as(q), rotate(k_, cos, sin).type_as(k)


class LLaDALlamaBlock(torch.nn.Module):
    """LLaDA's block: pre-norm attention with its own rotary module and an additive
    bias cast to the activations' dtype, then a SwiGLU MLP (``ff_proj`` the gate)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.attn_norm, self.ff_norm = RMSLayerNorm(WIDTH), RMSLayerNorm(WIDTH)
        for name, rows, columns in (("q_proj", WIDTH, WIDTH), ("k_proj", WIDTH, WIDTH), ("v_proj", WIDTH, WIDTH),
                                    ("attn_out", WIDTH, WIDTH), ("ff_proj", HIDDEN, WIDTH),
                                    ("up_proj", HIDDEN, WIDTH), ("ff_out", WIDTH, HIDDEN)):  # fmt: skip
            setattr(self, name, torch.nn.Linear(columns, rows, bias=False))
        self.act, self.dropout, self.rotary_emb = torch.nn.SiLU(), torch.nn.Dropout(0.0), RotaryEmbedding(config)

    def attention(self, q, k, v, attention_bias=None, layer_past=None, use_cache=False):
        batch, length, width = q.shape
        q, k, v = (t.view(batch, length, HEADS, width // HEADS).transpose(1, 2) for t in (q, k, v))
        if layer_past is not None:
            k, v = torch.cat((layer_past[0], k), dim=-2), torch.cat((layer_past[1], v), dim=-2)
        present = (k, v) if use_cache else None
        q, k = self.rotary_emb(q, k)
        if attention_bias is not None:
            attention_bias = attention_bias.to(q.dtype)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)
        return self.attn_out(attended.transpose(1, 2).reshape(batch, length, width)), present

    def forward(self, x, attention_bias=None, layer_past=None, use_cache=False):
        normed = self.attn_norm(x)
        q, k, v = self.q_proj(normed), self.k_proj(normed), self.v_proj(normed)
        attended, cache = self.attention(q, k, v, attention_bias, layer_past=layer_past, use_cache=use_cache)
        x = x + self.dropout(attended)
        normed = self.ff_norm(x)
        gate, up = self.ff_proj(normed), self.up_proj(normed)
        return x + self.dropout(self.ff_out(self.act(gate) * up)), cache


class LLaDAModelLM(torch.nn.Module):
    """The blocks between an embedding and LLaDA's final norm and output head, called as
    LLaDA's model calls them (keywords), taking ``attention_bias`` as LLaDA's does."""

    def __init__(self, vocab: int, mask_token_id: int, full_precision: bool = True):
        super().__init__()
        self.config = SimpleNamespace(d_model=WIDTH, n_heads=HEADS, rope_theta=10_000.0, mask_token_id=mask_token_id,
                                      rope_full_precision=full_precision, max_sequence_length=128)  # fmt: skip
        self.wte = torch.nn.Embedding(vocab, WIDTH)
        self.blocks = torch.nn.ModuleList(LLaDALlamaBlock(self.config) for _ in range(LAYERS))
        self.ln_f, self.ff_out = RMSLayerNorm(WIDTH), torch.nn.Linear(WIDTH, vocab, bias=False)

    def forward(self, input_ids, attention_bias=None, use_cache=False, return_dict=True):
        x = self.wte(input_ids)
        for block in self.blocks:
            x, _ = block(x, attention_bias=attention_bias, layer_past=None, use_cache=use_cache)
        return SimpleNamespace(logits=self.ff_out(self.ln_f(x)))

    def get_output_embeddings(self):
        return self.ff_out


def _model(vocab=64, dtype=torch.float32, full_precision=True, seed=0) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return LLaDAModelLM(vocab, vocab - 1, full_precision).to(DEVICE, dtype).eval().requires_grad_(False)


def _padded_inputs(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 9) ids and their additive (3, 1, 9, 9) float32 bias, two rows padded on the left."""
    ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    keep = (torch.arange(9) >= torch.tensor([[0], [3], [5]])).to(DEVICE)
    return ids, additive_mask(keep[:, None, None, :], torch.float32).expand(-1, 1, 9, -1)


def _fused_swaps(model) -> list[tuple[torch.nn.Module, str, object]]:
    return [(module, "forward", forward) for module, forward in lean_forwards(model, "triton")
            + llada_forwards(model, "triton")]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("full_precision", [True, False])
def test_fused_llada_blocks_give_the_stock_logits(dtype, full_precision):
    model = _model(dtype=dtype, full_precision=full_precision)
    swaps = _fused_swaps(model)
    swapped = {type(module).__name__ for module, _, _ in swaps}
    assert swapped == {"LLaDALlamaBlock", "RotaryEmbedding", "RMSLayerNorm"} and len(swaps) == 2 + 2 + 5
    ids, bias = _padded_inputs(64)
    want = model(ids, attention_bias=bias).logits
    calls = []
    stock_forward = LLaDALlamaBlock.forward
    with pytest.MonkeyPatch.context() as patch, swapped_attributes(swaps):
        patch.setattr(LLaDALlamaBlock, "forward", lambda *a, **k: calls.append(1) or stock_forward(*a, **k))
        got = model(ids, attention_bias=bias).logits
    assert not calls  # every block ran its fused forward
    keep = bias[:, 0, 0] == 0
    scale = want[keep].abs().max().item()
    # bfloat16: each module within FUSED_ULPS of its stock self, one-ulp moves carried on by the next layer
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=tolerance * scale)


def test_a_llada_norm_with_a_bias_runs_stock():
    plain, biased = RMSLayerNorm(WIDTH), RMSLayerNorm(WIDTH, bias=True)
    norms = torch.nn.ModuleList([plain, biased]).to(DEVICE).requires_grad_(False)
    assert [module for module, _ in lean_forwards(norms, backend="triton")] == [plain]  # without a warning


@pytest.mark.parametrize("full_precision", [True, False])
def test_fused_llada_rotary_rotates_as_its_module_does(full_precision):
    model = _model(dtype=torch.bfloat16, full_precision=full_precision)
    rotary = model.blocks[0].rotary_emb
    forward = dict((module, f) for module, f in llada_forwards(model, "triton"))[rotary]
    generator = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, HEADS, 6, WIDTH // HEADS, generator=generator).bfloat16().to(DEVICE) for _ in range(2))
    for got, want in zip(forward(q, k), rotary(q, k)):
        assert got.dtype == torch.bfloat16 and (got == want).double().mean() > 0.99
        torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * want.abs().max().item())
    calls = []
    with pytest.MonkeyPatch.context() as patch:  # fewer queries than keys (a cache): the stock forward
        patch.setattr(RotaryEmbedding, "forward", lambda *a: calls.append(1) or ("stock",))
        assert forward(q[:, :, :2], k) == ("stock",) and calls == [1]


def test_llada_block_calls_the_swap_does_not_cover_run_stock():
    model = _model()
    block = model.blocks[0]
    forward = dict(llada_forwards(model, "triton"))[block]
    x = torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    past = (torch.randn(2, HEADS, 3, WIDTH // HEADS).to(DEVICE),) * 2
    calls = []
    stock_forward = LLaDALlamaBlock.forward
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LLaDALlamaBlock, "forward", lambda *a, **k: calls.append(sorted(k)) or stock_forward(*a, **k))
        out, cache = forward(x, attention_bias=None, layer_past=past, use_cache=True)
        assert cache[0].shape[-2] == 8 and out.shape == x.shape
        _, cache = forward(x, attention_bias=None, layer_past=None, use_cache=True)  # a cache to start
        assert cache[0].shape[-2] == 5
        forward(x, None)  # positional
        with pytest.raises(TypeError, match="unknown"):  # a keyword the block's own forward may take
            forward(x, attention_bias=None, unknown=1)
        block.train()
        forward(x, attention_bias=None)
        block.eval()
        block._activation_checkpoint_fn = lambda function, *args, **kwargs: function(*args, **kwargs)  # LLaDA's own
        forward(x, attention_bias=None)
        del block._activation_checkpoint_fn
        cached = ["attention_bias", "layer_past", "use_cache"]
        assert calls == [cached, cached, [], ["attention_bias", "unknown"], ["attention_bias"], ["attention_bias"]]
        forward(x, attention_bias=None, layer_past=None, use_cache=False)
        assert len(calls) == 6


def test_a_llada_block_whose_weights_moved_projects_with_its_new_ones():
    model = _model()
    block = model.blocks[0]
    forward = dict(llada_forwards(model, "triton"))[block]
    block.k_proj.weight = torch.nn.Parameter(torch.randn_like(block.k_proj.weight), requires_grad=False)  # new storage
    x = torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = block(x, attention_bias=None)[0]
    torch.testing.assert_close(forward(x, attention_bias=None)[0], want, rtol=0, atol=2e-5 * want.abs().max().item())


@pytest.mark.parametrize("change", ["a forward of its own", "a hook on its activation"])
def test_a_llada_block_with_a_forward_or_hook_of_its_own_runs_stock(change):
    model = _model()
    block = model.blocks[0]
    if change == "a forward of its own":
        block.forward = block.forward  # as an offloading library installs its own
    else:
        block.act.register_forward_hook(lambda *args: None)  # the fused gate would skip it
    swapped = dict(llada_forwards(model, "triton"))
    assert block not in swapped and model.blocks[1] in swapped


def test_llada_blocks_the_fused_forward_does_not_reproduce_stay_stock_with_a_warning():
    class ScaledBlock(LLaDALlamaBlock):  # an MLP branch the fused forward does not compute
        def forward(self, x, attention_bias=None, layer_past=None, use_cache=False):
            out, cache = super().forward(x, attention_bias, layer_past, use_cache)
            return 2 * out - x, cache

    model = _model()
    model.blocks[1].__class__ = ScaledBlock
    with pytest.warns(UserWarning, match=r"did not reproduce the stock forward of 1 x ScaledBlock \("):
        swapped = dict(llada_forwards(model, "triton"))
    assert model.blocks[0] in swapped and model.blocks[1] not in swapped
    assert model.blocks[1].rotary_emb in swapped  # its rotary module still fits
    assert llada_forwards(model, "torch") == []  # off the triton backend the stock code runs


@pytest.fixture
def forced_triton(monkeypatch):
    """The swaps CUDA makes, forced here (the interpreter on CPU)."""
    for module in (entrgi.lean, entrgi.lean_llada):
        monkeypatch.setattr(module, "resolve_backend", lambda backend, device: "triton")


def test_a_llada_denoiser_runs_its_blocks_fused(chat_tokenizer, forced_triton):
    vocab = len(chat_tokenizer)
    stock = Denoiser(_model(vocab), chat_tokenizer, kind="llada", fused_layers=False)
    fused = Denoiser(_model(vocab), chat_tokenizer, kind="llada")
    assert fused.layers.describe() == "lean: 5 x RMSLayerNorm, 2 x RotaryEmbedding, 2 x LLaDALlamaBlock"
    assert stock.layers.describe() == "stock" and isinstance(fused.layers, LayerRunner)
    ids = torch.randint(1000, 2000, (3, 9), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    mask = (torch.arange(9) >= torch.tensor([[0], [3], [5]])).to(DEVICE)
    want, got = stock.logits(ids, mask), fused.logits(ids, mask)
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=2e-5 * want[mask].abs().max().item())


def test_fused_llada_blocks_generate_the_stock_tokens(chat_tokenizer, classifier_path, forced_triton):
    vocab = len(chat_tokenizer)
    reward = load_reward(classifier_path, lean_activations=False, device=DEVICE)
    config = GuidanceConfig(steps=4, max_new_tokens=8, num_samples=2, guidance_steps=2, block_length=4,
                            remasking="low_confidence", seed=6)  # fmt: skip
    prompts = ["red car", "a much longer prompt than the other"]
    results = [generate(prompts, denoiser=Denoiser(_model(vocab), chat_tokenizer, kind="llada", fused_layers=fused),
                        reward=reward, config=config, progress=False) for fused in (False, True)]  # fmt: skip
    assert [r.response_ids for r in results[1]] == [r.response_ids for r in results[0]]
    torch.testing.assert_close([r.rewards for r in results[1]], [r.rewards for r in results[0]], rtol=1e-4,
                               atol=1e-5)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_llada_blocks_denoise_in_cuda_graphs(chat_tokenizer, classifier_path):
    denoiser = Denoiser(_model(len(chat_tokenizer), dtype=torch.bfloat16), chat_tokenizer, kind="llada")
    assert "2 x LLaDALlamaBlock" in denoiser.layers.describe()
    reward = load_reward(classifier_path, device="cuda", dtype=torch.bfloat16)
    replays = graphed_runs_match_eager(["hello there", "what is the weather like today in the big city"], denoiser,
                                       reward, steps=4, max_new_tokens=8, block_length=4, remasking="low_confidence",
                                       num_samples=2, guidance_steps=2, seed=4)  # fmt: skip
    assert replays == [3]
