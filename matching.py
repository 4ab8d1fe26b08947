"""
Feature matching and attention matching: the student's blocks learn from the teacher's layers, not only
from its logits (seed 003: "feature matching across mapped layers", "hidden state projection when
dimensions differ", "GQA-aware attention pattern matching").

Layers are paired (layer_map): by default student block i of Ns follows teacher layer round(i * Nt / Ns),
evenly spaced, the last on the last (TinyBERT's uniform mapping, Jiao et al. 2020).

Features (FeatureMatcher), per pair (s, t) and real token, with a learned W_s (student width -> teacher
width, FitNets' regressor, Romero et al. 2015):
    mse     mean_c (W_s h_s - rms_norm(h_t))_c^2         rms_norm(x) = x / sqrt(mean_c x_c^2)
    cosine  1 - cos(W_s h_s, h_t)

Attention (attention_loss), per pair, matched head unit u (head_groups) and real query position:
    KL(P_u || Q_u) = sum_k P_u[k] log(P_u[k] / Q_u[k])
where P_u is the mean of the teacher's attention distributions over the query heads of unit u and Q_u
the mean of the student's over its heads of unit u (a mean of distributions is a distribution). A KL
between attention distributions, rather than an MSE on them, follows MiniLM (Wang et al. 2020).
Each loss is the mean over pairs of the mean over real tokens (attention_mask == 1), in fp32.

    from matching import FeatureMatcher, attention_loss, head_groups, layer_map, student_internals, teacher_internals
    tc = teacher.config
    pairs = layer_map(student.config.n_layer, tc.num_hidden_layers)  # e.g. 6 of 30: [(1, 5), ..., (6, 30)]
    head_groups(student.config.n_head, tc.num_attention_heads, tc.num_key_value_heads)  # fails early if no match
    matcher = FeatureMatcher(pairs, student.config.n_embd, tc.hidden_size)  # its weights go to the optimizer
    s_layers, t_layers = [s for s, _ in pairs], [t for _, t in pairs]
    with torch.no_grad():
        t_last, t_in = teacher_internals(teacher, idx, am, layers=t_layers, attention_layers=t_layers)
    h, s_in = student_internals(student, idx, am, layers=s_layers, attention_layers=s_layers)
    loss = (distill(h, t_last) + w_feat * matcher(s_in['hidden'], t_in['hidden'], am)
            + w_att * attention_loss(s_in['attention'], t_in['attention'], pairs, am, tc.num_key_value_heads))

python -m pytest tests/test_matching.py
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import cognate
from attention import additive_mask, rotate

KINDS = ('mse', 'cosine')


def layer_map(n_student, n_teacher, pairs=None):
    """[(student_block, teacher_layer), ...]: evenly spaced by default, or the user's pairs, checked.

    Student blocks are numbered 1..n_student (student_internals). Teacher layers index Hugging Face's
    output_hidden_states: 0 is the embeddings, n_teacher the last layer; HF applies the final norm to that
    last entry (it is last_hidden_state), unlike the others: one reason FeatureMatcher normalizes targets.
    """
    if pairs is None:
        # i * Nt / Ns rounded half up in integers (round() would halve to even), never 0 (the embeddings)
        return [(i, max(1, (2 * i * n_teacher + n_student) // (2 * n_student))) for i in range(1, n_student + 1)]
    hint = (f"give a list of [student_block, teacher_layer] pairs, student_block in 1..{n_student} (each at "
            f"most once), teacher_layer in 0..{n_teacher} (0 = embeddings), e.g. [[1, {n_teacher // 2}], "
            f"[{n_student}, {n_teacher}]]")
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError(f"layer pairs {pairs!r}: {hint}")
    out = []
    for p in pairs:
        if not (isinstance(p, (list, tuple)) and len(p) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in p)):
            raise ValueError(f"layer pair {p!r} is not two integers: {hint}")
        s, t = p
        if not (1 <= s <= n_student and 0 <= t <= n_teacher):
            raise ValueError(f"layer pair {list(p)} is out of range: {hint}")
        if s in [a for a, _ in out]:
            raise ValueError(f"student block {s} is paired twice in {pairs!r}: {hint}")
        out.append((s, t))
    return out


def teacher_internals(model, idx, attention_mask=None, layers=(), attention_layers=()):
    """(last_hidden (B, T, C), {'hidden': {t: (B, T, C)}, 'attention': {t: (B, Hq, T, T)}}) from one forward.

    layers: hidden-state indices 0..Nt (see layer_map); attention_layers: layers 1..Nt, whose attention
    probabilities are wanted. last_hidden is what teacher.teacher_hidden returns.
    Cost: attention weights need the eager implementation (sdpa and flash never form them), so the model is
    switched to it for good, announced once; eager is slower, and HF returns every layer's (B, Hq, T, T)
    weights before we keep the requested ones: SmolLM2-135M at 16 x 256 tokens holds 30 x 38 MB in fp32.
    """
    n = model.config.num_hidden_layers
    wrong = [t for t in layers if not 0 <= t <= n] + [t for t in attention_layers if not 1 <= t <= n]
    if wrong:
        raise ValueError(f"teacher layer {wrong[0]} does not exist: hidden states are 0..{n} (0 = embeddings), "
                         f"attention layers 1..{n}")
    if attention_layers and model.config._attn_implementation != 'eager':
        print(f"indra: switching the teacher from {model.config._attn_implementation} to eager attention "
              f"(attention matching needs its weights; slower)")
        model.set_attn_implementation('eager')
    out = model.base_model(input_ids=idx, attention_mask=attention_mask,
                           output_hidden_states=bool(layers), output_attentions=bool(attention_layers))
    extras = {'hidden': {t: out.hidden_states[t] for t in layers}, 'attention': {}}
    if attention_layers:
        if not out.attentions or any(a is None for a in out.attentions):
            raise RuntimeError(f"the teacher ({type(model).__name__}, attention implementation "
                               f"{model.config._attn_implementation!r}) returned no attention weights; attention "
                               f"matching needs a model that supports output_attentions: turn it off for this teacher")
        extras['attention'] = {t: out.attentions[t - 1] for t in attention_layers}  # attentions[0] is layer 1's
    return out.last_hidden_state, extras


def student_internals(model, idx, attention_mask, layers, attention_layers):
    """(h, {'hidden': {i: (B, T, n_embd)}, 'attention': {i: (B, n_head, T, T)}}) from one forward of the Indra model:
    h its final normed hidden states (Indra.hidden_states), and the output (before any final norm) of each block
    in layers and the attention probabilities of each in attention_layers, blocks numbered 1..n_layer (of the last
    pass, for a Cognate student). Only the blocks in attention_layers leave the fused kernel to materialize their
    T x T weights (with_weights); gradient checkpointing recomputes them as they ran."""
    n = model.config.n_layer
    wrong = sorted({*layers, *attention_layers} - set(range(1, n + 1)))
    if wrong:
        raise ValueError(f"student block {wrong[0]} does not exist: blocks are numbered 1..{n}")
    T = idx.size(1)
    assert T <= model.config.block_size, f"sequence of {T} tokens > block_size {model.config.block_size}"
    mask = None if attention_mask is None else additive_mask(attention_mask, T, idx.device)
    inside, last = {'hidden': {}, 'attention': {}}, (model.config.recursions - 1) * n  # the last pass's first

    def step(k, block, x):
        i = k - last + 1  # the block's number in the last pass (below 1 in the passes before it)
        if i in attention_layers:
            x, inside['attention'][i] = model.run(with_weights, block, x, mask)
        else:
            x = model.run(block, x, mask)
        if i in layers:
            inside['hidden'][i] = x
        return x

    return model.norm_f(cognate.passes(model, model.drop(model.wte(idx)), step)), inside


def with_weights(module, x, mask):
    """(module(x, mask), the attention probabilities (B, n_head, T, T) fp32 of its ComplexAttention): a Block, whose
    attn it is, or a ComplexAttention. That attention computes through attend_explicit meanwhile (the same output
    as its kernel, within rounding), so gradients flow through the probabilities. A query that sees no key (a
    left-padding position) gets zero weights. Gradient checkpointing may call it again in backward: the same."""
    attn, kept = getattr(module, 'attn', module), []

    def kernel(q, k, v, cos, sin, m, scale):
        y, att = attend_explicit(q, k, v, cos, sin, m, scale)
        kept.append(att)
        return y

    attn.kernel = kernel
    try:
        x = module(x, mask)
    finally:
        attn.kernel = None
    att = kept[0]
    return x, (att if mask is None else att.masked_fill(torch.isneginf(mask).all(dim=-1, keepdim=True), 0.0))


def attend_explicit(q, k, v, cos, sin, mask, scale):
    """attention.attend_sdpa's computation spelled out, for when the probabilities themselves are wanted: scores
    and softmax as plain ops. mask: (B|1, 1, T, T) additive, or None for causal only. Returns y (B, nh, T, hs) in the
    input dtype and the probabilities (B, nh, T, T) in fp32 (a KL over keys takes their log; bf16 would round)."""
    if mask is None:
        mask = additive_mask(None, q.size(2), q.device)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    scores = (q @ k.transpose(-2, -1)) * scale + mask.to(q.dtype)  # (B, nh, T, T)
    att = torch.softmax(scores.float(), dim=-1)
    return att.to(v.dtype) @ v, att


def real_mean(x, attention_mask):
    """Mean of x (B, T) over real tokens (attention_mask == 1), over all when the mask is None.
    torch.where, not a product: a padded position's value never reaches the result, even if it is not finite."""
    if attention_mask is None:
        return x.mean()
    real = attention_mask.bool()
    return torch.where(real, x, 0.0).sum() / real.sum().clamp(min=1)


class FeatureMatcher(nn.Module):
    """Matches student block outputs to teacher hidden states through one learned projection per pair.

    The projections are trained with the student (their parameters are named projections.{k}.weight, k the
    pair's index) and thrown away afterwards: they only give the student's width a way to the teacher's.
    """

    def __init__(self, pairs, student_width, teacher_width, kind='mse'):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"feature matching kind {kind!r}: choose one of {', '.join(KINDS)}")
        self.pairs, self.kind = [tuple(p) for p in pairs], kind
        self.projections = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in self.pairs)

    def forward(self, student_hidden, teacher_hidden, attention_mask=None):
        """student_hidden {s: (B, T, Cs)}, teacher_hidden {t: (B, T, Ct)} -> scalar loss (fp32)."""
        losses = []
        # fp32 whatever the caller's autocast: the loss compares small differences of large vectors
        with torch.autocast(next(iter(student_hidden.values())).device.type, enabled=False):
            for (s, t), proj in zip(self.pairs, self.projections):
                hs = proj(student_hidden[s].float())  # (B, T, Ct)
                ht = teacher_hidden[t].detach().float()  # a target: no gradient to the teacher
                if self.kind == 'mse':
                    # The residual stream's norm grows with depth, and a few outlier dimensions carry huge
                    # values (Sun et al. 2024, "Massive activations in LLMs"): on raw targets the MSE would
                    # be the deep layers' and those dimensions'. Per-token RMS norm puts every layer and
                    # token on one scale (HF's last layer is already normed, the others are not).
                    per_token = (hs - F.rms_norm(ht, (ht.size(-1),))).square().mean(-1)  # (B, T)
                else:
                    per_token = 1 - F.cosine_similarity(hs, ht, dim=-1)
                losses.append(real_mean(per_token, attention_mask))
        return torch.stack(losses).mean()


def head_groups(n_student_heads, n_query_heads, n_kv_heads):
    """[(student heads, teacher query heads), ...]: one entry per matched unit, each side averaged over its heads.

    A student with a multiple of the teacher's query heads matches each query head with n_student / n_query
    consecutive student heads. Otherwise a multiple of the key/value heads matches per key/value group: the
    query heads sharing a kv head (consecutive in HF's repeat_kv layout: query head h reads kv head
    h // (n_query / n_kv)) see the same keys, so their patterns are the closest to average.
    """
    if n_query_heads % n_kv_heads:
        raise ValueError(f"teacher has {n_query_heads} query heads over {n_kv_heads} key/value heads: not a multiple")
    if n_student_heads % n_query_heads == 0:
        units = n_query_heads
    elif n_student_heads % n_kv_heads == 0:
        units = n_kv_heads
    else:
        raise ValueError(f"n_head={n_student_heads} cannot be matched to the teacher's {n_query_heads} query heads "
                         f"over {n_kv_heads} key/value heads: use a multiple of {n_kv_heads} "
                         f"({', '.join(str(n_kv_heads * m) for m in range(1, 5))}, ...)")
    s, t = n_student_heads // units, n_query_heads // units
    return [(tuple(range(u * s, (u + 1) * s)), tuple(range(u * t, (u + 1) * t))) for u in range(units)]


def group_mean(att, groups):
    """(B, H, T, T) -> (B, len(groups), T, T): the mean attention distribution of each group of heads."""
    return torch.stack([att[:, list(heads)].mean(1) for heads in groups], dim=1)


def attention_loss(student_att, teacher_att, pairs, attention_mask, n_kv_heads):
    """Mean over pairs, matched head units and real query positions of KL(teacher || student) over keys.

    student_att {s: (B, Hs, T, T)}, teacher_att {t: (B, Hq, T, T)}: probabilities, 0 on future and padded keys.
    """
    losses = []
    for s, t in pairs:
        a_s, a_t = student_att[s].float(), teacher_att[t].detach().float()
        assert a_s.shape[-2:] == a_t.shape[-2:], f"student {tuple(a_s.shape)} vs teacher {tuple(a_t.shape)} attention"
        groups = head_groups(a_s.size(1), a_t.size(1), n_kv_heads)
        q = group_mean(a_s, [g for g, _ in groups])  # (B, U, T, T)
        p = group_mean(a_t, [g for _, g in groups])
        # xlogy is 0 where p is 0 (future and padded keys); the clamp keeps log q finite where q is 0 there
        # too (0 * log 0 would be NaN in backward) and where a student probability underflowed
        kl = (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(torch.finfo(torch.float32).tiny))).sum(-1)  # (B, U, T)
        losses.append(real_mean(kl.mean(1), attention_mask))
    return torch.stack(losses).mean()


class Matching:
    """Which student blocks learn which teacher layers' insides, and the weighted losses on them (seed 003).
    Built from the settings; a layer map or head count that cannot work is a ValueError naming the fix.
    features: the FeatureMatcher whose projections train beside the student (None without feature matching)."""

    def __init__(self, n_layer, n_head, n_embd, teacher_config, pairs, feature_weight, attention_weight, kind='mse'):
        tc = teacher_config
        self.pairs = layer_map(n_layer, tc.num_hidden_layers, pairs or None)
        if attention_weight:
            head_groups(n_head, tc.num_attention_heads, tc.num_key_value_heads)
            if any(t == 0 for _, t in self.pairs):
                raise ValueError(f"layer_map {pairs}: teacher layer 0 is the embeddings, which have no attention")
        self.feature_weight, self.attention_weight, self.n_kv_heads = feature_weight, attention_weight, \
            tc.num_key_value_heads
        self.weight = {'feature': feature_weight, 'attention': attention_weight}
        blocks, layers = tuple(s for s, _ in self.pairs), tuple(t for _, t in self.pairs)
        # the student blocks and teacher layers whose hidden states (features) and attention (attention) are wanted
        self.student_layers, self.teacher_layers = (blocks, layers) if feature_weight else ((), ())
        self.student_att, self.teacher_att = (blocks, layers) if attention_weight else ((), ())
        self.features = FeatureMatcher(self.pairs, n_embd, tc.hidden_size, kind) if feature_weight else None

    @classmethod
    def for_run(cls, student_config, teacher_config, pairs, feature_weight, attention_weight, kind='mse'):
        """train.py's matching: None when both weights are 0; a map that cannot work is one line naming the fix;
        what is matched is printed."""
        if not (feature_weight or attention_weight):
            return None
        try:
            m = cls(student_config.n_layer, student_config.n_head, student_config.n_embd, teacher_config, pairs,
                    feature_weight, attention_weight, kind)
        except ValueError as e:
            raise SystemExit(f"indra: {e}")
        print(m.describe())
        return m

    def describe(self):
        return (f"matching student blocks to teacher layers {self.pairs}: " + ', '.join(
            f"{name} x{w:g}" for name, w in (('features', self.feature_weight), ('attention', self.attention_weight))
            if w))

    @property
    def logged(self):
        """The names of the matching losses in the log, those switched on."""
        return ['feature'] * bool(self.feature_weight) + ['attention'] * bool(self.attention_weight)

    def add_losses(self, loss, parts, mine, inside, attention_mask):
        """loss + weight x each matching loss, in the order of losses(); each is also put in parts."""
        for k, part in self.losses(mine, inside, attention_mask).items():
            parts[k] = part
            loss = loss + self.weight[k] * part
        return loss

    def losses(self, mine, inside, attention_mask):
        """{'feature': ..., 'attention': ...} (those switched on) from the student's and the teacher's insides
        ({'hidden': {layer: ...}, 'attention': {layer: ...}} each); the loss adds self.weight[k] x each."""
        parts = {}
        if self.features is not None:
            parts['feature'] = self.features(mine['hidden'], inside['hidden'], attention_mask)
        if self.attention_weight:
            parts['attention'] = attention_loss(mine['attention'], inside['attention'], self.pairs, attention_mask,
                                                self.n_kv_heads)
        return parts
