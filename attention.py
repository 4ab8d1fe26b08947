"""
Complex-valued causal self-attention, the heart of the indra student.

Each head works on complex vectors: real linear maps give Re and Im of q, k, v, position
enters as a phase rotation of q and k (rotary embedding *is* a complex multiplication), the
score is Re(q . conj(k)) / sqrt(head_dim), and a real linear map takes [Re, Im] of the output
back to n_embd. Two interchangeable kernels compute the same thing (tests hold them equal):

    reference  the two matmuls in complex64, upcasting half-precision inputs and casting the
               result back (seed 000: CUDA has no ComplexHalf matmul). Readable, slow.
    sdpa       Re(q . conj(k)) = [Re q | Im q] . [Re k | Im k], and softmax weights are real,
               so one fused F.scaled_dot_product_attention over the stacked real features
               computes scores and output at once, in bf16/fp16, with fused kernels.

A third, attend_explicit, is the sdpa computation as plain ops; forward(need_weights=True) uses it
to hand back the attention probabilities too (attention matching, matching.py).

Shapes: a head has head_dim real features = head_dim // 2 complex numbers ("dc" below), so
a student of width n_embd has as many attention parameters as a real GPT of that width. With
n_kv_head < n_head, each key/value head serves a group of query heads (grouped-query attention).
Rotary embedding as Llama and Qwen2 compute it pairs the features (i, i + head_dim / 2): that is
[Re | Im] here, so their heads are these heads, weight for weight (inherit.py).
python -m pytest tests/test_attention.py
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def additive_mask(attention_mask, T, device, dtype=torch.float32):
    """Causal + padding mask as one additive tensor, (B, 1, T, T): 0 where a query may look, -inf where not.

    attention_mask: (B, T) with 1 for real tokens and 0 for padding, or None (no padding).
    Seed 000: the padding mask becomes additive (1 -> 0, 0 -> -inf) and is added to the causal
    mask, so a key that is in the future *or* padding gets -inf and softmax weight 0.
    """
    return cached_mask(None if attention_mask is None else attention_mask[:, :T], T, 0, device, dtype)


def rotary_phases(T, dc, base=10000.0, device=None):
    """cos and sin of position * frequency, (T, dc): the unit complex numbers q and k are rotated by."""
    freq = base ** (-torch.arange(dc, device=device, dtype=torch.float32) / dc)  # (dc,)
    angle = torch.outer(torch.arange(T, device=device, dtype=torch.float32), freq)  # (T, dc)
    return angle.cos(), angle.sin()


def attend_reference(q, k, v, cos, sin, mask, scale):
    """The plain kernel: complex64 tensors, two complex matmuls.

    q, k, v: (B, nh, T, 2*dc) real, laid out [Re | Im]; cos, sin: (T, dc); mask: (B|1, 1, T, T) additive.
    Returns (B, nh, T, 2*dc) in the input dtype, laid out [Re | Im].
    """
    in_dtype = q.dtype
    dc = q.size(-1) // 2

    def as_complex(x):  # upcast: there is no complex bf16, and CUDA has no ComplexHalf matmul
        x = x.float()
        return torch.complex(x[..., :dc], x[..., dc:])  # (B, nh, T, dc) complex64

    phase = torch.complex(cos, sin)  # (T, dc) e^{i * pos * freq}
    qc, kc, vc = as_complex(q) * phase, as_complex(k) * phase, as_complex(v)
    scores = (qc @ kc.conj().transpose(-2, -1)).real * scale + mask.float()  # (B, nh, T, T)
    att = torch.softmax(scores, dim=-1)
    y = att.to(torch.complex64) @ vc  # (B, nh, T, dc)
    return torch.cat([y.real, y.imag], dim=-1).to(in_dtype)


def rotate(x, cos, sin):
    """Multiply [Re | Im] by e^{i angle} in real arithmetic (so the sdpa path stays all-real and compiles)."""
    dc = x.size(-1) // 2
    re, im = x[..., :dc], x[..., dc:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([re * cos - im * sin, re * sin + im * cos], dim=-1)


def attend_sdpa(q, k, v, cos, sin, mask, scale):
    """The fast kernel: one fused scaled_dot_product_attention over the stacked real features.

    [Re q | Im q] . [Re k | Im k] = Re(q . conj(k)), and att @ [Re v | Im v] = [Re(att @ v) | Im(att @ v)].
    mask=None means causal only (lets PyTorch pick its fastest causal kernel).
    """
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)


def attend_explicit(q, k, v, cos, sin, mask, scale):
    """The sdpa computation spelled out, for when the attention probabilities themselves are wanted (attention
    matching, matching.py): scores and softmax as plain ops, so gradients flow through the probabilities.

    mask: (B|1, 1, T, T) additive, never None. Returns y (B, nh, T, hs) in the input dtype and the
    probabilities (B, nh, T, T) in fp32 (a KL over keys takes their log; bf16 would round them).
    """
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    scores = (q @ k.transpose(-2, -1)) * scale + mask.to(q.dtype)  # (B, nh, T, T)
    att = torch.softmax(scores.float(), dim=-1)
    return att.to(v.dtype) @ v, att


KERNELS = {'reference': attend_reference, 'sdpa': attend_sdpa}


class ComplexAttention(nn.Module):
    """n_head query heads over n_kv_head key/value heads (grouped-query attention when fewer: each k, v head serves
    n_head // n_kv_head query heads in a row, as in Llama and Qwen2), head_dim real features per head."""

    def __init__(self, n_embd, n_head, block_size, attn_impl='sdpa', dropout=0.0, rope_base=10000.0, n_kv_head=0,
                 head_dim=0, bias=False):
        super().__init__()
        assert head_dim or n_embd % n_head == 0, f"n_embd={n_embd} is not divisible by n_head={n_head}: set head_dim"
        n_kv_head, head_dim = n_kv_head or n_head, head_dim or n_embd // n_head
        assert head_dim % 2 == 0, f"head_dim={head_dim} must be even (Re and Im halves)"
        assert n_head % n_kv_head == 0, f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}"
        assert attn_impl in KERNELS, f"attn_impl={attn_impl!r}: choose one of {sorted(KERNELS)}"
        self.n_head, self.n_kv_head, self.head_dim, self.attn_impl = n_head, n_kv_head, head_dim, attn_impl
        # Re and Im of q for every query head, then of k and of v for every key/value head
        self.qkv = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * head_dim, bias=bias)
        self.proj = nn.Linear(n_head * head_dim, n_embd, bias=False)  # [Re, Im] of the output back to n_embd
        self.resid_dropout = nn.Dropout(dropout)
        cos, sin = rotary_phases(block_size, head_dim // 2, rope_base)
        self.register_buffer('cos', cos, persistent=False)
        self.register_buffer('sin', sin, persistent=False)

    def forward(self, x, mask=None, need_weights=False, cache=None):
        """x: (B, T, C); mask: additive (B|1, 1, T, T) from additive_mask(), or None for causal only.

        Returns (B, T, C); with need_weights, (output, attention probabilities (B, nh, T, T) fp32) from
        attend_explicit instead of the attn_impl kernel (same output, tests hold them equal; T x T per head
        is materialized, so ask only for the layers that need it). A query that sees no key gets zero weights.

        cache: a dict kept by the caller between calls (generation): x holds the tokens after those already in it,
        mask is (B|1, 1, T, T_past + T) (cached_mask), and the keys and values of all of them stay in it (cached()).
        """
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, nkv, hs).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hs)
        scale = 1.0 / math.sqrt(self.head_dim)  # Re(q . conj k) sums head_dim real products
        if cache is not None:
            return self.cached(q, k, v, mask, scale, cache)
        if nkv < nh:  # grouped-query attention: each key/value head serves nh // nkv query heads in a row
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        cos, sin = self.cos[:T], self.sin[:T]
        empty = None
        if mask is not None:
            # A query with no visible key (a left-padding position) would softmax over all -inf
            # and give NaN. Let it see everything, then zero its output: no NaN forward or backward.
            empty = torch.isneginf(mask).all(dim=-1, keepdim=True)  # (B, 1, T, 1)
            mask = mask.masked_fill(empty, 0.0)
        elif self.attn_impl == 'reference' or need_weights:
            mask = additive_mask(None, T, x.device)
        if need_weights:
            y, att = attend_explicit(q, k, v, cos, sin, mask, scale)
        else:
            y = KERNELS[self.attn_impl](q, k, v, cos, sin, mask, scale)  # (B, nh, T, hs)
        if empty is not None:
            y = y.masked_fill(empty, 0.0)
        y = self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, nh * hs)))
        if not need_weights:
            return y
        return y, (att if empty is None else att.masked_fill(empty, 0.0))

    def cached(self, q, k, v, mask, scale, cache):
        """Attention of new tokens over every key so far, the earlier ones read from cache. q, k, v: (B, heads, T, hs)
        of the new tokens, at positions P..P+T-1 after the P cached. k is kept rotated and before the grouped-query
        repeat, so a step costs one token's projections. It is the sdpa kernel's computation whatever attn_impl is
        (the two kernels are held equal), with forward's zeros for a query that sees no key."""
        B, _, T, hs = q.shape
        past = cache['k'].size(2) if cache else 0
        assert past + T <= self.cos.size(0), f"{past + T} positions > block_size {self.cos.size(0)}: no phase for them"
        cos, sin = self.cos[past:past + T], self.sin[past:past + T]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache:
            k, v = torch.cat([cache['k'], k], dim=2), torch.cat([cache['v'], v], dim=2)
        cache['k'], cache['v'] = k, v  # (B, nkv, past + T, hs)
        if self.n_kv_head < self.n_head:
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
        empty = torch.isneginf(mask).all(dim=-1, keepdim=True)  # (B, 1, T, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.masked_fill(empty, 0.0).to(q.dtype), scale=scale)
        y = y.masked_fill(empty, 0.0).transpose(1, 2).reshape(B, T, self.n_head * hs)
        return self.resid_dropout(self.proj(y))


def cached_mask(attention_mask, T, past, device, dtype=torch.float32):
    """additive_mask for T new queries at positions past..past+T-1 over all past + T keys, (B|1, 1, T, past + T):
    query i sees keys up to past + i, and no padding. attention_mask: (B, past + T) or None."""
    causal = torch.full((T, past + T), float('-inf'), device=device, dtype=dtype).triu(past + 1)  # (T, past + T)
    if attention_mask is None:
        return causal.view(1, 1, T, past + T)
    pad = torch.zeros(attention_mask.shape, device=device, dtype=dtype).masked_fill(attention_mask == 0, float('-inf'))
    return causal.view(1, 1, T, past + T) + pad.view(-1, 1, 1, past + T)
