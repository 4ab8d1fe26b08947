"""
Complex-valued causal self-attention, the heart of the indra student.

Each head works on complex vectors: real linear maps give Re and Im of q, k, v, position
enters as a phase rotation of q and k (rotary embedding *is* a complex multiplication), the
score is Re(q . conj(k)) / sqrt(head_dim), and a real linear map takes [Re, Im] of the output
back to n_embd. Two interchangeable kernels compute the same thing (tests hold them equal):

    reference  the two matmuls in complex64, upcasting half-precision inputs and casting the
               result back (CUDA has no ComplexHalf matmul). Readable, slow.
    sdpa       Re(q . conj(k)) = [Re q | Im q] . [Re k | Im k], and softmax weights are real,
               so one fused F.scaled_dot_product_attention over the stacked real features
               computes scores and output at once, in bf16/fp16, with fused kernels.

A head has head_dim real features = head_dim // 2 complex numbers ("dc" below): as many
parameters as a real GPT of the same width. Rotary embedding as Llama and Qwen2 compute it pairs
features (i, i + head_dim / 2), [Re | Im] here: their heads are these, weight for weight.
python -m pytest tests/test_attention.py
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def additive_mask(attention_mask, T, device, dtype=torch.float32):
    """Causal + padding mask as one additive tensor, (B|1, 1, T, T): 0 where a query may look,
    -inf where not, so a key in the future *or* padding gets softmax weight 0.
    attention_mask: (B, T), 1 for real tokens and 0 for padding, or None (no padding)."""
    causal = torch.full((T, T), float('-inf'), device=device, dtype=dtype).triu(1)  # keys after
    if attention_mask is None:
        return causal.view(1, 1, T, T)
    real = attention_mask[:, :T]
    pad = torch.zeros(real.shape, device=device, dtype=dtype).masked_fill(real == 0, float('-inf'))
    return causal.view(1, 1, T, T) + pad.view(-1, 1, 1, T)


def rotary_phases(T, dc, base=10000.0, device=None):
    """cos and sin of position * frequency, (T, dc): the unit complex numbers q and k turn by."""
    freq = base ** (-torch.arange(dc, device=device, dtype=torch.float32) / dc)  # (dc,)
    angle = torch.outer(torch.arange(T, device=device, dtype=torch.float32), freq)  # (T, dc)
    return angle.cos(), angle.sin()


def attend_reference(q, k, v, cos, sin, mask, scale):
    """The plain kernel: complex64 tensors, two complex matmuls. q, k, v: (B, nh, T, 2*dc) real,
    laid out [Re | Im]; cos, sin: (T, dc); mask: (B|1, 1, T, T) additive. Returns (B, nh, T, 2*dc)
    in the input dtype, laid out [Re | Im]."""
    dc = q.size(-1) // 2

    def as_complex(x):  # upcast: there is no complex bf16, and CUDA has no ComplexHalf matmul
        x = x.float()
        return torch.complex(x[..., :dc], x[..., dc:])  # (B, nh, T, dc) complex64

    phase = torch.complex(cos, sin)  # (T, dc) e^{i * pos * freq}
    qc, kc, vc = as_complex(q) * phase, as_complex(k) * phase, as_complex(v)
    scores = (qc @ kc.conj().transpose(-2, -1)).real * scale + mask.float()  # (B, nh, T, T)
    y = torch.softmax(scores, dim=-1).to(torch.complex64) @ vc  # (B, nh, T, dc)
    return torch.cat([y.real, y.imag], dim=-1).to(q.dtype)


def rotate(x, cos, sin):
    """Multiply [Re | Im] by e^{i angle} in real arithmetic (the sdpa path stays real, compiles)."""
    dc = x.size(-1) // 2
    re, im = x[..., :dc], x[..., dc:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([re * cos - im * sin, re * sin + im * cos], dim=-1)


def attend_sdpa(q, k, v, cos, sin, mask, scale):
    """The fast kernel: one fused scaled_dot_product_attention over the stacked real features,
    as [Re q | Im q] . [Re k | Im k] = Re(q . conj(k)) and att @ [Re v | Im v] = [Re | Im](att @ v).
    mask=None means causal only (lets PyTorch pick its fastest causal kernel)."""
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)


KERNELS = {'reference': attend_reference, 'sdpa': attend_sdpa}


class ComplexAttention(nn.Module):
    """n_head query heads over n_kv_head key/value heads (grouped-query attention when fewer: each
    k, v head serves n_head // n_kv_head query heads in a row, as in Llama and Qwen2). kernel: None
    for attn_impl's, or a function in its place (matching.py's keeps the probabilities)."""

    def __init__(self, n_embd, n_head, block_size, attn_impl='sdpa', dropout=0.0, rope_base=10000.0,
                 n_kv_head=0, head_dim=0, bias=False):
        super().__init__()
        assert head_dim or n_embd % n_head == 0, \
            f"n_embd={n_embd} is not divisible by n_head={n_head}: set head_dim"
        n_kv_head, head_dim = n_kv_head or n_head, head_dim or n_embd // n_head
        assert head_dim % 2 == 0, f"head_dim={head_dim} must be even (Re and Im halves)"
        assert n_head % n_kv_head == 0, \
            f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}"
        assert attn_impl in KERNELS, f"attn_impl={attn_impl!r}: choose one of {sorted(KERNELS)}"
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.attn_impl = attn_impl
        self.scale = 1.0 / math.sqrt(head_dim)  # Re(q . conj k) sums head_dim real products
        self.kernel = None
        # Re and Im of q for every query head, then of k and of v for every key/value head
        self.qkv = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * head_dim, bias=bias)
        self.proj = nn.Linear(n_head * head_dim, n_embd, bias=False)  # [Re, Im] back to n_embd
        self.resid_dropout = nn.Dropout(dropout)
        cos, sin = rotary_phases(block_size, head_dim // 2, rope_base)
        self.register_buffer('cos', cos, persistent=False)
        self.register_buffer('sin', sin, persistent=False)

    def forward(self, x, mask=None):
        """x: (B, T, C) -> (B, T, C); mask: additive (B|1, 1, T, T) from additive_mask(), or None
        for causal only."""
        T = x.size(1)
        assert T <= self.cos.size(0), f"sequence of {T} tokens > block_size {self.cos.size(0)}"
        q, k, v = self.heads(x)
        k, v = self.grouped(k, v)  # (B, nh, T, hs)
        empty = None
        if mask is not None:
            # A query with no visible key (a left-padding position) would softmax over all -inf
            # and give NaN. Let it see everything, then zero its output: no NaN forward or backward.
            empty = torch.isneginf(mask).all(dim=-1, keepdim=True)  # (B, 1, T, 1)
            mask = mask.masked_fill(empty, 0.0)
        elif self.attn_impl == 'reference':
            mask = additive_mask(None, T, x.device)
        attend = self.kernel or KERNELS[self.attn_impl]
        y = attend(q, k, v, self.cos[:T], self.sin[:T], mask, self.scale)  # (B, nh, T, hs)
        return self.out(y if empty is None else y.masked_fill(empty, 0.0))

    def heads(self, x):
        """(B, T, C) -> q (B, nh, T, hs), k and v (B, nkv, T, hs), each laid out [Re | Im] (heads,
        grouped and out serve the forward and the cached attention, kvcache.py)."""
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        k, v = (t.view(B, T, nkv, hs).transpose(1, 2) for t in (k, v))
        return q.view(B, T, nh, hs).transpose(1, 2), k, v

    def grouped(self, k, v):
        """(B, nkv, T, hs) -> (B, nh, T, hs): each k, v head once per query head it serves."""
        g = self.n_head // self.n_kv_head
        return (k, v) if g == 1 else (k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1))

    def out(self, y):
        """(B, nh, T, hs) -> (B, T, C): the heads side by side, through proj."""
        B, _, T, _ = y.shape
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, -1)))
