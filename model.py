"""
The indra student: a GPT-shaped decoder with complex-valued attention (attention.py).

Token embedding tied to the output head (or a head of its own), pre-norm blocks (RMSNorm -> complex attention,
RMSNorm -> MLP, GELU or SwiGLU), no learned position table (rotary phases carry position). The vocabulary is the
teacher's logit width, so teacher and student logits align token for token. With a SwiGLU MLP and grouped
key/value heads it has the shapes of a Llama (with q/k/v biases, of a Qwen2), so it can start as the teacher
itself (inherit.py) and be pruned from it (prune.py).

    from model import IndraConfig, Indra
    model = Indra(IndraConfig(vocab_size=49152, n_layer=6, n_head=6, n_embd=384))
    print(model.param_report())
    logits, loss = model(idx, attention_mask=mask, targets=targets)

Seed 001's Cognate student is this one with options (cognate.py): recursions > 1 applies the blocks several times,
act mixes the passes by a halting head, ltm adds a gated long-term memory to every block. All off by default.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import ComplexAttention, additive_mask, cached_mask
from cognate import Memory, act_stats, act_weights


SIZES = ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'head_dim', 'mlp_hidden')  # the rest of the shape is architecture


@dataclass
class IndraConfig:
    vocab_size: int = 49152  # the teacher's logit width
    block_size: int = 256  # longest sequence (rotary phases are precomputed up to it)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_kv_head: int = 0  # key/value heads, each shared by n_head // n_kv_head query heads (GQA); 0 = n_head
    head_dim: int = 0  # real features per head (Re and Im halves); 0 = n_embd // n_head
    mlp: str = 'gelu'  # 'gelu': proj(gelu(fc x)) | 'swiglu': proj(silu(gate x) * up x), as in Llama and Qwen2
    mlp_hidden: int = 0  # the MLP's hidden width; 0 = 4 n_embd (gelu), or 8/3 n_embd rounded up to 64 (swiglu)
    qkv_bias: bool = False  # biases on q, k and v (Qwen2 has them)
    tie_head: bool = True  # the output head is the token embedding (one matrix); False: a head of its own
    norm_eps: float = 0.0  # RMSNorm's epsilon; 0 = the machine epsilon of the activations' dtype
    dropout: float = 0.0
    attn_impl: str = 'sdpa'  # 'sdpa' (fused) | 'reference' (complex64 matmuls)
    rope_base: float = 10000.0
    gradient_checkpointing: bool = False  # recompute blocks in backward: less memory, ~30% slower
    logit_clamp: float = 0.0  # > 0: logits pass through c * tanh(logits / c), bounded in (-c, c) (seed 002 used 30)
    # Cognate (seed 001, cognate.py)
    recursions: int = 1  # the blocks applied this many times with shared weights (TRM); 1 = the plain student
    act: bool = False  # a halting head after each pass mixes the passes (ACT); needs recursions > 1
    act_ponder_weight: float = 0.01  # + this x the mean expected passes per counted token (Graves' ponder cost)
    act_diversity_weight: float = 0.01  # + this x max(0, act_target_variance - halting variance) (seed 001)
    act_target_variance: float = 0.1  # seed 001's target; it counts a variance above 0.05 as success
    ltm: bool = False  # a gated long-term memory in every block (Titans, MAG)
    ltm_dim: int = 64  # the memory's width
    ltm_decay: float = 0.9  # m_t = decay m_(t-1) + (1 - decay) c_t; 0.9 remembers ~10 tokens, 0.99 ~100

    def __post_init__(self):
        assert self.mlp in ('gelu', 'swiglu'), f"mlp={self.mlp!r}: choose 'gelu' or 'swiglu'"
        assert self.recursions >= 1 and (self.recursions > 1 or not self.act), \
            f"recursions={self.recursions}, act={self.act}: recursions must be >= 1, and > 1 for ACT to mix passes"
        assert 0.0 < self.ltm_decay < 1.0, f"ltm_decay={self.ltm_decay} must be in (0, 1)"
        self.n_kv_head = self.n_kv_head or self.n_head  # the sizes of 0 become what they mean
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if not self.mlp_hidden:
            self.mlp_hidden = 4 * self.n_embd if self.mlp == 'gelu' else 64 * math.ceil(8 * self.n_embd / 3 / 64)

    def describe(self):
        """The shape in one line, e.g. '30 layers of 576, 9 query heads over 3 key/value heads of 64, ...'."""
        return (f"{self.n_layer} layers of {self.n_embd}, {self.n_head} query heads over {self.n_kv_head} key/value "
                f"heads of {self.head_dim}{', q/k/v biases' * self.qkv_bias}, {self.mlp} MLP of {self.mlp_hidden}, "
                f"{'tied' if self.tie_head else 'untied'} head, rope base {self.rope_base:g}, "
                f"norm eps {f'{self.norm_eps:g}' if self.norm_eps else 'machine epsilon'}")


class MLP(nn.Module):
    """gelu: proj(gelu(fc x)). swiglu: fc holds gate and up stacked, one matmul; proj(silu(gate x) * up x)."""

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
        eps = cfg.norm_eps or None
        self.norm1 = nn.RMSNorm(cfg.n_embd, eps=eps)
        self.attn = ComplexAttention(cfg.n_embd, cfg.n_head, cfg.block_size, cfg.attn_impl, cfg.dropout, cfg.rope_base,
                                     cfg.n_kv_head, cfg.head_dim, cfg.qkv_bias)
        self.norm2 = nn.RMSNorm(cfg.n_embd, eps=eps)
        self.mlp = MLP(cfg)
        self.memory = Memory(cfg.n_embd, cfg.ltm_dim, cfg.ltm_decay, eps) if cfg.ltm else None

    def forward(self, x, mask, need_weights=False, cache=None, real=None):
        """(x, attention probabilities (B, nh, T, T) or None): one return type, so checkpoint() can wrap either.
        real: (B, T) 1 real / 0 pad, for the memory (a pad leaves it unchanged), or None."""
        if need_weights:
            a, att = self.attn(self.norm1(x), mask, need_weights=True)
        else:
            a, att = self.attn(self.norm1(x), mask, cache=cache), None
        x = x + a
        x = x + self.mlp(self.norm2(x))
        if self.memory is not None:
            x = x + self.memory(x, real, cache)
        return x, att


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
        self.halt = nn.Linear(cfg.n_embd, 1) if cfg.act else None  # ACT's halting head, one logit per token and pass
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth (passes x blocks)
            if name.endswith('proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer * cfg.recursions))
        if self.halt is not None:  # h = sigmoid(-3) = 0.05 per pass: at first the output is mostly the last pass
            nn.init.constant_(self.halt.bias, -3.0)
        self.cognate = {}  # the last forward's halting probabilities, ACT weights and memory gates (cognate_terms)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx, attention_mask=None, layers=(), attention_layers=(), cache=None):
        """The final normed hidden states (B, T, n_embd), before the tied head.

        layers, attention_layers: block numbers 1..n_layer whose output (B, T, n_embd), before any final
        norm, and attention probabilities (B, n_head, T, T) are wanted too (feature and attention matching,
        matching.py). If either is given, returns (h, {'hidden': {i: ...}, 'attention': {i: ...}}).
        Only the blocks in attention_layers leave the fused kernel to materialize their T x T weights.
        cache: one dict per block (generate): idx holds the tokens after those already cached, attention_mask
        (B, cached + T) all of them; the blocks keep their keys and values in it.
        """
        B, T = idx.shape
        past = cache[0]['k'].size(2) if cache and cache[0] else 0
        assert past + T <= self.config.block_size, f"sequence of {past + T} tokens > block_size {self.config.block_size}"
        n = self.config.n_layer
        wrong = sorted({*layers, *attention_layers} - set(range(1, n + 1)))
        if wrong:
            raise ValueError(f"student block {wrong[0]} does not exist: blocks are numbered 1..{n}")
        if cache is not None:
            mask = cached_mask(attention_mask, T, past, idx.device)
        else:
            mask = None if attention_mask is None else additive_mask(attention_mask, T, idx.device)
        extras = {'hidden': {}, 'attention': {}}
        real = None if attention_mask is None else attention_mask[:, -T:]  # the memory's: pads leave it unchanged
        x = self.drop(self.wte(idx))  # (B, T, C)
        passes, states, halts, gates = self.config.recursions, [], [], []
        for r in range(passes):  # the same blocks every pass (TRM); matching reads the last pass
            for i, block in enumerate(self.blocks, start=1):
                need = i in attention_layers and r == passes - 1
                if self.config.gradient_checkpointing and self.training:
                    x, att = checkpoint(block, x, mask, need, None, real, use_reentrant=False)
                else:
                    x, att = block(x, mask, need, None if cache is None else cache[r * n + i - 1], real)
                if need:
                    extras['attention'][i] = att
                if i in layers and r == passes - 1:
                    extras['hidden'][i] = x
                if block.memory is not None:
                    gates.append(block.memory.gate_mean)
            if self.halt is not None:
                states.append(x)
                if r < passes - 1:  # the last pass takes the remainder: no halting probability of its own
                    halts.append(torch.sigmoid(self.halt(F.rms_norm(x, (x.size(-1),)))).squeeze(-1).float())
        self.cognate = {'gate': torch.stack(gates).mean(0)} if gates else {}
        if self.halt is not None:  # ACT: each token's output is its passes weighted by where it halts
            h = torch.stack(halts, dim=-1)  # (B, T, N-1)
            p = act_weights(h)  # (B, T, N)
            x = sum(p[..., k, None].to(s.dtype) * s for k, s in enumerate(states))
            self.cognate.update(halt=h, p=p)
        h = self.norm_f(x)
        return (h, extras) if layers or attention_layers else h

    def cognate_terms(self, counted):
        """(the auxiliary loss of the last forward, its figures for the log) over the tokens counted (B, T) weighs
        (the loss's own, losses.counted_tokens: padding never counts). ACT: act_ponder_weight x the mean expected
        passes + act_diversity_weight x max(0, act_target_variance - the halting variance) (seed 001); the memory:
        the mean gate, over blocks and passes."""
        c, got = self.config, self.cognate
        loss, figures = torch.zeros((), device=counted.device), {}
        w = counted.float()
        if 'gate' in got:
            figures['gate'] = ((got['gate'] * w).sum() / w.sum().clamp(min=1.0)).detach()
        if 'halt' in got:
            passes, var = act_stats(got['halt'], got['p'], w)
            loss = c.act_ponder_weight * passes + c.act_diversity_weight * (c.act_target_variance - var).clamp(min=0)
            figures.update(passes=passes.detach(), halt_var=var.detach())
        return loss, figures

    def forward(self, idx, attention_mask=None, targets=None):
        """idx: (B, T) token ids; attention_mask: (B, T) 1 real / 0 pad, or None.

        targets: (B, T) next-token ids aligned with idx (targets[:, t] follows idx[:, t]; -1 is
        ignored), for plain language-model training. Distillation uses losses.DistillationLoss.
        Returns logits (B, T, vocab) and the mean cross-entropy (or None).
        """
        logits = self.head(self.hidden_states(idx, attention_mask))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def head(self, h):
        """Logits from hidden states, bounded when logit_clamp is set (losses.py applies the same bound)."""
        logits = self.lm_head(h)
        c = self.config.logit_clamp
        return c * torch.tanh(logits / c) if c > 0 else logits

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # a tied matrix is counted once

    def param_report(self):
        """Parameter count with the embedding's share (seed 001 watched it: 79% in embeddings starves the blocks)."""
        total, emb = self.num_params(), self.wte.weight.numel()
        c, per_block = self.config, sum(p.numel() for p in self.blocks[0].parameters())
        head = '' if c.tie_head else f" + head {self.lm_head.weight.numel() / 1e6:.2f}M"
        cognate = (f" (with a memory of {c.ltm_dim})" * c.ltm + f", applied {c.recursions} times" * (c.recursions > 1)
                   + f" + halting head {c.n_embd + 1}" * c.act)
        return (f"student: {total / 1e6:.2f}M parameters = embedding{' (tied with head)' * c.tie_head} "
                f"{emb / 1e6:.2f}M ({100 * emb / total:.1f}%){head} + {c.n_layer} blocks x "
                f"{per_block / 1e6:.2f}M{cognate} + final norm {self.norm_f.weight.numel()}")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, attention_mask=None,
                 use_cache=True, generator=None):
        """Sample up to max_new_tokens after idx (B, T). A row that emits eos_id keeps emitting it;
        generation stops once every row has. temperature 0 means greedy.
        attention_mask (B, T) marks real prompt tokens (prompts left-padded to one length).
        use_cache: keep every block's keys and values (per pass, with a Cognate memory's state), so each new token
        costs one token's forward, not the whole sequence's (tests/test_model.py, tests/test_cognate.py: the same
        tokens as without). Past block_size the window slides and every position moves, so from there on it runs
        uncached, on the last block_size tokens.
        generator: a torch.Generator to sample from (on idx's device); None: torch's global one."""
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        slots = len(self.blocks) * self.config.recursions  # one per block and pass: keys, values, memory state
        cache, cached = ([{} for _ in range(slots)] if use_cache else None), 0  # tokens of idx in the cache
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) > self.config.block_size:
                cache = None
            if cache is not None:
                h = self.hidden_states(idx[:, cached:], attention_mask, cache=cache)
                cached = idx.size(1)
            else:
                window = idx[:, -self.config.block_size:]
                mask = None if attention_mask is None else attention_mask[:, -self.config.block_size:]
                h = self.hidden_states(window, mask)
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
    """Keep the top_k largest logits and/or the smallest set whose probability reaches top_p; -inf the rest."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float('-inf')))
    return logits


class EMA:
    """An exponential moving average of the student's weights, in fp32, updated after every optimizer step:
        shadow = d * shadow + (1 - d) * weights,  d = min(decay, (1 + n) / (10 + n)) at update n
    The ramp on d (as in TensorFlow's ExponentialMovingAverage with num_updates) keeps a short run from
    averaging in its random initialization: with d = 0.999 fixed, 82% of the average after 200 steps is still
    the init. Seed 002 crashed evaluating an EMA whose tensors no longer matched the model; load_state_dict
    checks every name, shape and dtype and names the first that does not fit."""

    def __init__(self, model, decay):
        assert 0.0 < decay < 1.0, f"ema_decay={decay} must be in (0, 1)"
        self.decay, self.updates = decay, 0
        # named_parameters lists the tied embedding/head once (as wte.weight): one shadow for one matrix
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model):
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.float(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model):
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k])

    def state_dict(self):
        return {'decay': self.decay, 'updates': self.updates, 'shadow': self.shadow}

    def load_state_dict(self, state, where='the checkpoint'):
        """Take a saved EMA, onto this model's device; any mismatch is an error naming the parameter."""
        saved = state['shadow']
        for k, mine in self.shadow.items():
            if k not in saved:
                raise ValueError(f"EMA in {where} has no {k}; it was saved for another model")
            if saved[k].shape != mine.shape:
                raise ValueError(f"EMA in {where}: {k} has shape {tuple(saved[k].shape)}, "
                                 f"the model's is {tuple(mine.shape)}")
            if saved[k].dtype != torch.float32:
                raise ValueError(f"EMA in {where}: {k} is {saved[k].dtype}, expected torch.float32")
        extra = sorted(set(saved) - set(self.shadow))
        if extra:
            raise ValueError(f"EMA in {where} has {extra[0]}, which the model does not; it was saved for another model")
        self.shadow = {k: saved[k].to(mine.device) for k, mine in self.shadow.items()}
        self.updates = state['updates']

    @contextmanager
    def applied(self, model):
        """Inside the block the model holds the EMA weights; its own come back afterwards."""
        own = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(own[k])
