"""Complex attention: the fused kernel equals the complex64 reference, masks behave.
Run: python -m pytest tests/test_attention.py"""
import math

import pytest
import torch

from attention import ComplexAttention, additive_mask, attend_reference, rotary_phases
from matching import with_weights


def make(B=2, nh=3, T=12, hs=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, nh, T, hs, generator=g).to(dtype) for _ in range(3))
    cos, sin = rotary_phases(T, hs // 2)
    return q, k, v, cos, sin


def naive(q, k, v, cos, sin, attention_mask, scale):
    """Loops over batch, head, query and key with Python complex numbers."""
    B, nh, T, hs = q.shape
    dc = hs // 2
    out = torch.zeros(B, nh, T, hs, dtype=torch.float64)
    for b in range(B):
        for h in range(nh):
            qc = [[complex(q[b, h, t, j], q[b, h, t, dc + j]) * complex(cos[t, j], sin[t, j]) for j in range(dc)] for t in range(T)]
            kc = [[complex(k[b, h, t, j], k[b, h, t, dc + j]) * complex(cos[t, j], sin[t, j]) for j in range(dc)] for t in range(T)]
            for t in range(T):
                keys = [s for s in range(t + 1) if attention_mask is None or attention_mask[b, s] == 1]
                if not keys:
                    continue  # no visible key: zeros
                scores = [sum(a * c.conjugate() for a, c in zip(qc[t], kc[s])).real * scale for s in keys]
                m = max(scores)
                w = [math.exp(x - m) for x in scores]
                z = sum(w)
                for s, ws in zip(keys, w):
                    out[b, h, t] += ws / z * v[b, h, s].double()
    return out


def padding_mask():
    am = torch.ones(2, 12, dtype=torch.long)
    am[0, :4] = 0  # left padding: queries 0-3 of row 0 see no real key at all
    am[1, 9:] = 0  # right padding
    return am


def test_reference_matches_naive_loops():
    q, k, v, cos, sin = make(B=2, nh=2, T=6, hs=4)
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    scale = 1 / math.sqrt(4)
    mask = additive_mask(am, 6, q.device)
    mask = mask.masked_fill(torch.isneginf(mask).all(-1, keepdim=True), 0.0)
    got = attend_reference(q, k, v, cos, sin, mask, scale)
    want = naive(q, k, v, cos, sin, am, scale)
    real_rows = am.bool().view(2, 1, 6, 1).expand_as(got)  # fully masked rows are zeroed by the module, not the kernel
    assert torch.allclose(got[real_rows].double(), want[real_rows], atol=1e-5)


@pytest.mark.parametrize('padded', [False, True])
def test_sdpa_equals_reference_fp32(padded):
    torch.manual_seed(0)
    am = padding_mask() if padded else None
    x = torch.randn(2, 12, 48, requires_grad=True)
    outs, grads = [], []
    for impl in ('reference', 'sdpa'):
        torch.manual_seed(1)
        attn = ComplexAttention(48, 3, 16, attn_impl=impl)
        xi = x.detach().clone().requires_grad_(True)
        mask = None if am is None else additive_mask(am, 12, x.device)
        y = attn(xi, mask)
        y.square().sum().backward()
        outs.append(y)
        grads.append((xi.grad, attn.qkv.weight.grad))
    assert torch.allclose(outs[0], outs[1], atol=1e-5), (outs[0] - outs[1]).abs().max()
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-4)


def test_sdpa_equals_reference_bf16():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 48)
    mask = additive_mask(padding_mask(), 12, x.device)
    ys = []
    for impl in ('reference', 'sdpa'):
        torch.manual_seed(1)
        attn = ComplexAttention(48, 3, 16, attn_impl=impl)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = attn(x, mask)
        assert y.dtype == torch.bfloat16  # the reference casts its complex64 result back
        ys.append(y.float())
    # both round to bf16 at different points: agree to bf16 precision
    assert torch.allclose(ys[0], ys[1], atol=2e-2, rtol=2e-2), (ys[0] - ys[1]).abs().max()


@pytest.mark.parametrize('impl', ['reference', 'sdpa'])
def test_fully_masked_rows_are_zero_not_nan(impl):
    torch.manual_seed(0)
    attn = ComplexAttention(48, 3, 16, attn_impl=impl)
    x = torch.randn(2, 12, 48, requires_grad=True)
    am = padding_mask()
    y = attn(x, additive_mask(am, 12, x.device))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    before_proj = y[0, :4]  # proj has no bias, so a zero attention output stays zero
    assert torch.equal(before_proj, torch.zeros_like(before_proj))


def test_padding_keys_change_nothing():
    """What sits in a padded position must not reach any real query."""
    torch.manual_seed(0)
    attn = ComplexAttention(48, 3, 16)
    am = padding_mask()
    x = torch.randn(2, 12, 48)
    x2 = x.clone()
    x2[am == 0] = torch.randn(int((am == 0).sum()), 48) * 10
    mask = additive_mask(am, 12, x.device)
    real = am.bool()
    assert torch.allclose(attn(x, mask)[real], attn(x2, mask)[real], atol=1e-6)


def test_causal_future_changes_nothing():
    torch.manual_seed(0)
    attn = ComplexAttention(48, 3, 16, attn_impl='reference')
    x = torch.randn(1, 12, 48)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(1, 5, 48)
    assert torch.allclose(attn(x)[:, :7], attn(x2)[:, :7], atol=1e-6)


def test_additive_mask_values():
    m = additive_mask(torch.tensor([[0, 1, 1]]), 3, 'cpu')
    assert m.shape == (1, 1, 3, 3)
    visible = ~torch.isneginf(m[0, 0])
    assert visible.tolist() == [[False, False, False], [False, True, False], [False, True, True]]
    assert (m[0, 0][visible] == 0).all()


def test_rotary_is_relative():
    """Scores depend on positions only through their difference (shift q and k together: same scores)."""
    q, k, v, cos, sin = make(B=1, nh=1, T=16, hs=8)
    qc = torch.complex(q[..., :4], q[..., 4:])
    kc = torch.complex(k[..., :4], k[..., 4:])
    phase = torch.complex(cos, sin)
    s0 = (qc[..., 3, :] * phase[3] * (kc[..., 1, :] * phase[1]).conj()).sum(-1).real
    s5 = (qc[..., 3, :] * phase[8] * (kc[..., 1, :] * phase[6]).conj()).sum(-1).real
    assert torch.allclose(s0, s5, atol=1e-5)


@pytest.mark.parametrize('padded', [False, True])
def test_need_weights_equals_sdpa_and_gives_the_probabilities(padded):
    """The explicit path (attention matching) computes the same output and gradients as the fused kernel,
    and its weights are distributions over the visible keys that gradients flow through."""
    am = padding_mask() if padded else None
    mask = None if am is None else additive_mask(am, 12, 'cpu')
    torch.manual_seed(0)
    x = torch.randn(2, 12, 48)
    outs, grads = [], []
    for need in (False, True):
        torch.manual_seed(1)
        attn = ComplexAttention(48, 3, 16, attn_impl='sdpa')
        xi = x.clone().requires_grad_(True)
        if need:
            y, att = with_weights(attn, xi, mask)
        else:
            y = attn(xi, mask)
        y.square().sum().backward()
        outs.append(y)
        grads.append((xi.grad, attn.qkv.weight.grad))
    assert torch.allclose(outs[0], outs[1], atol=1e-5), (outs[0] - outs[1]).abs().max()
    for a, b in zip(*grads):
        assert torch.isfinite(b).all() and torch.allclose(a, b, atol=1e-4)
    assert att.shape == (2, 3, 12, 12) and att.dtype == torch.float32
    visible = torch.ones(12, 12).tril().bool().expand(2, 3, 12, 12)
    if am is not None:
        visible = visible & am.bool().view(2, 1, 1, 12)
    assert (att[~visible] == 0).all()
    rows = att.sum(-1)  # (B, nh, T): 1 for a query that sees a key, 0 for a left-padding query that sees none
    assert torch.allclose(rows, visible.any(-1).float(), atol=1e-6)
    attn.zero_grad()
    _, att = with_weights(attn, x, mask)
    (att * torch.randn_like(att)).sum().backward()  # a loss on the weights alone reaches q and k
    assert torch.isfinite(attn.qkv.weight.grad).all() and attn.qkv.weight.grad[:96].abs().sum() > 0


@pytest.mark.parametrize('padded', [False, True])
def test_grouped_kv_heads_are_shared_by_their_query_heads(padded):
    """n_kv_head < n_head: the module equals the one with a k/v head per query head whose k and v weights repeat
    each group's (query heads 0-2 read k/v head 0, 3-5 head 1), with both kernels; a head_dim other than
    n_embd / n_head and q/k/v biases as well."""
    am = padding_mask() if padded else None
    mask = None if am is None else additive_mask(am, 12, 'cpu')
    x = torch.randn(2, 12, 24, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    grouped = ComplexAttention(24, 6, 16, n_kv_head=2, head_dim=10, bias=True)
    full = ComplexAttention(24, 6, 16, head_dim=10, bias=True)
    with torch.no_grad():
        for name in ('weight', 'bias'):
            q, k, v = getattr(grouped.qkv, name).split([60, 20, 20])  # 6 query heads, 2 k and 2 v heads, of 10
            each = lambda t: t.unflatten(0, (2, 10)).repeat_interleave(3, 0).flatten(0, 1)  # head j -> 3j .. 3j + 2
            getattr(full.qkv, name).copy_(torch.cat([q, each(k), each(v)]))
        full.proj.weight.copy_(grouped.proj.weight)
    assert grouped.qkv.weight.shape == (100, 24) and grouped.proj.weight.shape == (24, 60)
    outs = []
    for impl in ('sdpa', 'reference'):
        for m in (grouped, full):
            m.attn_impl = impl
            outs.append(m(x, mask))
    for y in outs[1:]:
        assert torch.allclose(outs[0], y, atol=1e-5), (outs[0] - y).abs().max()
