"""
The indra student: a GPT-shaped decoder with complex-valued attention (attention.py). Token
embedding tied to the output head (or a head of its own), pre-norm blocks (RMSNorm -> attention,
RMSNorm -> MLP, GELU or SwiGLU), rotary phases for position. Its vocabulary is the teacher's, so
their logits align token for token; with SwiGLU and grouped key/value heads it has a Llama's
shapes (with q/k/v biases, a Qwen2's), so it can start as the teacher (inherit.py) and be pruned
(prune.py). The Cognate student is this one with options (cognate.py).

    model = Indra(IndraConfig(vocab_size=49152, n_layer=6, n_head=6, n_embd=384))
    print(model.param_report())
    logits, loss = model(idx, attention_mask=mask, targets=targets)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import cognate
from attention import ComplexAttention, additive_mask
from kvcache import KVCache

# the sizes in a shape; the rest of it (mlp, qkv_bias, tie_head, ...) is architecture
SIZES = ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'head_dim', 'mlp_hidden')


@dataclass
class IndraConfig:
    vocab_size: int = 49152  # the teacher's logit width
    block_size: int = 256  # longest sequence (rotary phases are precomputed up to it)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_kv_head: int = 0  # key/value heads, each for n_head // n_kv_head query heads; 0 = n_head
    head_dim: int = 0  # real features per head (Re and Im halves); 0 = n_embd // n_head
    mlp: str = 'gelu'  # 'gelu': proj(gelu(fc x)) | 'swiglu': proj(silu(gate x) * up x) (Llama's)
    mlp_hidden: int = 0  # 0 = 4 n_embd (gelu), or 8/3 n_embd rounded up to 64 (swiglu)
    qkv_bias: bool = False  # biases on q, k and v (Qwen2 has them)
    tie_head: bool = True  # the output head is the token embedding; False: a head of its own
    norm_eps: float = 0.0  # RMSNorm's epsilon; 0 = the machine epsilon of the activations' dtype
    dropout: float = 0.0
    attn_impl: str = 'sdpa'  # 'sdpa' (fused) | 'reference' (complex64 matmuls)
    rope_base: float = 10000.0
    gradient_checkpointing: bool = False  # recompute blocks in backward: less memory, ~30% slower
    logit_clamp: float = 0.0  # > 0: logits become c * tanh(logits / c), bounded in (-c, c)
    # the Cognate student's options (cognate.py); the defaults are the plain student
    recursions: int = 1  # the blocks applied this many times with shared weights (TRM)
    act: bool = False  # a halting head after each pass mixes the passes (ACT); recursions > 1
    act_ponder_weight: float = 0.01  # + this x the mean expected passes (Graves' ponder cost)
    act_diversity_weight: float = 0.01  # + this x max(0, act_target_variance - halting variance)
    act_target_variance: float = 0.1  # above 0.05: tokens halt differently
    ltm: bool = False  # a gated long-term memory in every block (Titans, MAG)
    ltm_dim: int = 64  # the memory's width
    ltm_decay: float = 0.9  # m_t = decay m_(t-1) + (1 - decay) c_t; 0.9 remembers ~10 tokens

    def __post_init__(self):
        assert self.mlp in ('gelu', 'swiglu'), f"mlp={self.mlp!r}: choose 'gelu' or 'swiglu'"
        cognate.check(self)
        self.n_kv_head = self.n_kv_head or self.n_head  # the sizes of 0 become what they mean
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        swiglu = 64 * math.ceil(8 * self.n_embd / 3 / 64)  # 8/3 n_embd rounded up to 64
        self.mlp_hidden = self.mlp_hidden or (4 * self.n_embd if self.mlp == 'gelu' else swiglu)

    def describe(self):
        """The shape in one line, e.g. '30 layers of 576, 9 query heads over 3 key/value ...'."""
        eps = f'{self.norm_eps:g}' if self.norm_eps else 'machine epsilon'
        return (f"{self.n_layer} layers of {self.n_embd}, {self.n_head} query heads over "
                f"{self.n_kv_head} key/value heads of {self.head_dim}"
                f"{', q/k/v biases' * self.qkv_bias}, {self.mlp} MLP of {self.mlp_hidden}, "
                f"{'tied' if self.tie_head else 'untied'} head, rope base {self.rope_base:g}, "
                f"norm eps {eps}")


class MLP(nn.Module):
    """gelu: proj(gelu(fc x)). swiglu: fc holds gate and up stacked; proj(silu(gate x) * up x)."""

    def __init__(self, cfg):
        super().__init__()
        self.swiglu = cfg.mlp == 'swiglu'
        self.fc = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * cfg.mlp_hidden, bias=False)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.dropout(self.proj(F.silu(gate) * up))
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps or None)
        self.attn = ComplexAttention(cfg.n_embd, cfg.n_head, cfg.block_size, cfg.attn_impl,
                                     cfg.dropout, cfg.rope_base, cfg.n_kv_head, cfg.head_dim,
                                     cfg.qkv_bias)
        self.norm2 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps or None)
        self.mlp = MLP(cfg)
        self.memory = cognate.memory(self, cfg)  # ltm: added after the MLP (cognate.py); else None

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class Indra(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps or None)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_head:
            self.lm_head.weight = self.wte.weight  # tied: one matrix embeds tokens and scores them
        self.halt = cognate.halting_head(cfg)  # act: a halting head (cognate.py); else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith('proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer * cfg.recursions))
        cognate.init(self)  # the halting head's bias; the figures of the last forward

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx, attention_mask=None):
        """The final normed hidden states (B, T, n_embd), before the head."""
        T = idx.size(1)
        mask = None if attention_mask is None else additive_mask(attention_mask, T, idx.device)
        x = self.drop(self.wte(idx))  # (B, T, C)
        if cognate.on(self.config):  # the blocks several times over, passes mixed, memories
            return self.norm_f(cognate.passes(self, x, lambda k, b, x: self.run(b, x, mask)))
        for block in self.blocks:
            x = self.run(block, x, mask)
        return self.norm_f(x)

    def run(self, block, *args):
        """block(*args), recomputed in backward under gradient_checkpointing when training."""
        if self.config.gradient_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, idx, attention_mask=None, targets=None):
        """idx: (B, T) token ids; attention_mask: (B, T) 1 real / 0 pad, or None; targets: (B, T)
        the next tokens (-1 ignored), for plain language-model training (distillation: losses.py).
        Returns logits (B, T, vocab) and the mean cross-entropy (or None)."""
        logits = self.head(self.hidden_states(idx, attention_mask))
        if targets is None:
            return logits, None
        flat = logits.float().view(-1, logits.size(-1))
        return logits, F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1)

    def head(self, h):
        """Logits from hidden states, bounded when logit_clamp is set (as losses.py bounds them)."""
        logits, c = self.lm_head(h), self.config.logit_clamp
        return c * torch.tanh(logits / c) if c > 0 else logits

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # a tied matrix is counted once

    def param_report(self):
        """Parameter count with the embedding's share (what it takes, the blocks do not have)."""
        total, emb, c = self.num_params(), self.wte.weight.numel(), self.config
        head = '' if c.tie_head else f" + head {self.lm_head.weight.numel() / 1e6:.2f}M"
        block = sum(p.numel() for p in self.blocks[0].parameters()) / 1e6
        return (f"student: {total / 1e6:.2f}M parameters = embedding"
                f"{' (tied with head)' * c.tie_head} {emb / 1e6:.2f}M ({100 * emb / total:.1f}%)"
                f"{head} + {c.n_layer} blocks x {block:.2f}M{cognate.report(c)} + final norm "
                f"{self.norm_f.weight.numel()}")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 attention_mask=None, use_cache=True, generator=None):
        """Sample up to max_new_tokens after idx (B, T) (left-padded prompts: attention_mask (B, T)
        1 real / 0 pad); temperature 0 is greedy; generator: a torch.Generator on idx's device, or
        None for torch's. A row that emits eos_id keeps emitting it; all rows have: it stops.
        use_cache: a KVCache keeps what later tokens need of earlier ones (the same tokens, at one
        token's forward each) until block_size; then the window slides, every position moves."""
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        cache, n = (KVCache(self) if use_cache else None), self.config.block_size
        for _ in range(max_new_tokens):
            cache = cache if idx.size(1) <= n else None  # past block_size: uncached
            window = idx[:, -n:], None if attention_mask is None else attention_mask[:, -n:]
            h = cache.hidden_states(idx, attention_mask) if cache else self.hidden_states(*window)
            logits = self.head(h[:, -1, :]).float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            if eos_id is not None:
                nxt = nxt.masked_fill(finished.unsqueeze(1), eos_id)
                finished |= nxt.squeeze(1) == eos_id
            idx = torch.cat([idx, nxt], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
            if eos_id is not None and finished.all():
                break
        return idx


def filter_logits(logits, top_k=None, top_p=None):
    """The top_k largest logits and/or the fewest whose probability reaches top_p; -inf the rest."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        p = sorted_logits.softmax(dim=-1)
        drop = p.cumsum(dim=-1) - p >= top_p  # the mass before this token already reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float('-inf')))
    return logits
