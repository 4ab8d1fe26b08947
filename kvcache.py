"""
The key/value cache of generation (Indra.generate): for every block, and every pass of a Cognate student
(cognate.py), the rotated keys and values of the tokens so far, and the state a Cognate memory reached after
them. Each new token then costs one token's forward rather than the whole sequence's, and gives what the full
forward gives (tests/test_model.py, tests/test_cognate.py hold them equal token for token).

    cache = KVCache(model)
    h = cache.hidden_states(idx[:, :5], attention_mask[:, :5])  # (B, 5, C): the prompt, now cached
    h = cache.hidden_states(idx[:, :6], attention_mask[:, :6])  # (B, 1, C): only the token after it

The cached attention is the sdpa kernel's computation whatever attn_impl is (the two kernels are held equal).
"""
import torch
import torch.nn.functional as F

import cognate
from attention import additive_mask, rotate


def cached_mask(attention_mask, T, past, device, dtype=torch.float32):
    """additive_mask's rows for T new queries at positions past..past+T-1 over all past + T keys,
    (B|1, 1, T, past + T): query i sees keys up to past + i, and no padding. attention_mask: (B, past + T) or None."""
    causal = additive_mask(None, past + T, device, dtype)[:, :, past:]  # (1, 1, T, past + T)
    if attention_mask is None:
        return causal
    pad = torch.zeros(attention_mask.shape, device=device, dtype=dtype).masked_fill(attention_mask == 0, float('-inf'))
    return causal + pad.view(-1, 1, 1, past + T)


def attend(attn, x, mask, slot):
    """The ComplexAttention attn over x (B, T, C), the tokens after the `past` ones whose keys and values the dict
    slot holds, which it then holds too; mask: cached_mask's (B|1, 1, T, past + T). Keys are kept rotated and before
    the grouped-query repeat, so a step costs one token's projections. A query that sees no key gets zeros."""
    q, k, v = attn.heads(x)  # (B, nh, T, hs), (B, nkv, T, hs) twice
    past, T = (slot['k'].size(2) if slot else 0), q.size(2)
    assert past + T <= attn.cos.size(0), f"{past + T} positions > block_size {attn.cos.size(0)}: no phase for them"
    cos, sin = attn.cos[past:past + T], attn.sin[past:past + T]
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if slot:
        k, v = torch.cat([slot['k'], k], dim=2), torch.cat([slot['v'], v], dim=2)
    slot['k'], slot['v'] = k, v  # (B, nkv, past + T, hs)
    k, v = attn.grouped(k, v)
    empty = torch.isneginf(mask).all(dim=-1, keepdim=True)  # (B, 1, T, 1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.masked_fill(empty, 0.0).to(q.dtype), scale=attn.scale)
    return attn.out(y.masked_fill(empty, 0.0))


class KVCache:
    """What an Indra model's generation keeps between steps: one dict per block and pass ('k', 'v', and 'm' for a
    memory) and how many tokens they hold."""

    def __init__(self, model):
        self.model, self.length = model, 0
        self.slots = [{} for _ in range(len(model.blocks) * model.config.recursions)]

    def hidden_states(self, idx, attention_mask=None):
        """The final normed hidden states (B, T, n_embd) of idx's last T tokens, those after the self.length
        already cached, which are cached then. idx: (B, self.length + T); attention_mask: (B, self.length + T)
        1 real / 0 pad (prompts left-padded), or None."""
        model, past = self.model, self.length
        T = idx.size(1) - past
        n = model.config.block_size
        assert past + T <= n, f"sequence of {past + T} tokens > block_size {n}"
        mask = cached_mask(attention_mask, T, past, idx.device)
        real = None if attention_mask is None else attention_mask[:, -T:]  # for a memory: pads leave it unchanged

        def step(k, block, x):  # Block.forward, with the cache's attention and the memory's state
            slot = self.slots[k]
            x = x + attend(block.attn, block.norm1(x), mask, slot)
            x = x + block.mlp(block.norm2(x))
            if block.memory is not None:
                read, m = block.memory(x, real, slot.get('m'))
                slot['m'] = m[:, -1]  # (B, ltm_dim): where the next tokens continue from
                x = x + read
            return x

        h = model.norm_f(cognate.passes(model, model.drop(model.wte(idx[:, past:])), step))
        self.length = idx.size(1)
        return h
