"""
Pruning a student that holds the teacher's weights (inherit.py) down to smaller sizes, as Minitron does
(Muralidharan et al. 2024, arXiv:2407.14679; Sreenivas et al. 2024, arXiv:2408.11796), with ShortGPT's Block
Influence for depth (Men et al. 2024, arXiv:2403.03853). Everything is measured once, on calibration batches of
the training split run through the teacher-shaped student:

    depth     keep the n_layer blocks of highest Block Influence, 1 - cos(block input, block output) averaged
              over the tokens: the blocks that turn the residual stream least go (keep_layers=[...] chooses instead)
    width     rank by mean activation magnitude over the tokens and keep the top ones, slicing every weight
              they touch (norm gains included):
                MLP neurons          |silu(gate x) * up x|, the input of the down projection
                attention heads      the norm of each head's output (the input of o_proj), summed over the query
                                     heads of one key/value group: whole groups are kept or dropped
                embedding channels   |RMSNorm output|, summed over every norm of every block

Kept indices stay in their order, and a head keeps all its features, so its rotary pairs stay whole.

    scores = importance(model, batches)                  # batches: [(x (B, T), attention_mask or None)]
    kept = choose(scores, model.config, target_args, keep_layers)
    small = prune(model, target_args, kept)
python -m pytest tests/test_prune.py
"""
import torch
import torch.nn.functional as F

from model import Indra, IndraConfig


@torch.no_grad()
def importance(model, batches):
    """{'blocks': (L,) Block Influence, 'channels': (C,), 'neurons': (L, mlp_hidden), 'groups': (L, n_kv_head)}:
    each a mean over the batches' real tokens; and 'ce', the model's calibration_ce() on them, from the same pass."""
    cfg = model.config
    nh, nkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    sums = {'blocks': torch.zeros(cfg.n_layer), 'channels': torch.zeros(cfg.n_embd),
            'neurons': torch.zeros(cfg.n_layer, cfg.mlp_hidden), 'groups': torch.zeros(cfg.n_layer, nkv)}
    real = {}  # the batch being measured: (B, T, 1) weights, 1 on real tokens

    def mean(t):  # (B, T, ...) -> (...): the mean over real tokens
        w = real['w'].view(*real['w'].shape, *[1] * (t.dim() - 2))
        return (t.float() * w).sum((0, 1)).cpu() / w.sum().cpu()

    def block_hook(i):  # Block Influence of block i: how far it turns each token's residual vector
        def hook(module, args, out):
            sums['blocks'][i] += mean(1 - F.cosine_similarity(args[0].float(), out.float(), dim=-1))
        return hook

    def norm_hook(module, args, out):
        sums['channels'] += mean(out.abs())

    def down_hook(i):  # the input of the MLP's down projection: one value per neuron
        def hook(module, args, out):
            sums['neurons'][i] += mean(args[0].abs())
        return hook

    def o_hook(i):  # the input of o_proj, (B, T, nh * hs) head after head: a norm per head, summed per group
        def hook(module, args, out):
            sums['groups'][i] += mean(args[0].unflatten(-1, (nh, hs)).norm(dim=-1)).view(nkv, nh // nkv).sum(-1)
        return hook

    hooks = []
    for i, block in enumerate(model.blocks):
        hooks += [block.register_forward_hook(block_hook(i)), block.norm1.register_forward_hook(norm_hook),
                  block.norm2.register_forward_hook(norm_hook), block.mlp.proj.register_forward_hook(down_hook(i)),
                  block.attn.proj.register_forward_hook(o_hook(i))]
    was_training = model.training
    model.eval()
    ce = torch.zeros(2)  # summed CE, tokens
    try:
        for x, mask in batches:
            real['w'] = torch.ones_like(x, dtype=torch.float32) if mask is None else mask.float()
            ce += next_token_ce(model, model.hidden_states(x, mask), x, mask)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {**{k: v / len(batches) for k, v in sums.items()}, 'ce': (ce[0] / ce[1]).item()}


def top(scores, k):
    """The indices of the k largest scores, in their original order."""
    return sorted(torch.topk(scores, k).indices.tolist())


def choose(scores, cfg, args, keep_layers=()):
    """{'layers', 'channels', 'neurons' (per kept layer), 'groups' (per kept layer)}: what a student of args keeps
    from the student of cfg, by scores (importance()); keep_layers, if given, are the layers instead."""
    layers = sorted(keep_layers) if keep_layers else top(scores['blocks'], args['n_layer'])
    return {'layers': layers, 'channels': top(scores['channels'], args['n_embd']),
            'neurons': [top(scores['neurons'][i], args['mlp_hidden']) for i in layers],
            'groups': [top(scores['groups'][i], args['n_kv_head']) for i in layers]}


def head_rows(heads, hs, offset=0):
    """The rows of heads (each hs features, one after another) in a matrix whose rows start at offset."""
    return [offset + h * hs + d for h in heads for d in range(hs)]


@torch.no_grad()
def prune(model, args, kept):
    """A new Indra of args holding exactly the slices of model's weights that kept names (choose())."""
    cfg, small = model.config, Indra(IndraConfig(**args))
    old, new = dict(model.named_parameters()), dict(small.named_parameters())
    channels = torch.tensor(kept['channels'])
    group, hs = cfg.n_head // cfg.n_kv_head, cfg.head_dim
    new['wte.weight'].copy_(old['wte.weight'][:, channels])
    new['norm_f.weight'].copy_(old['norm_f.weight'][channels])
    if not cfg.tie_head:
        new['lm_head.weight'].copy_(old['lm_head.weight'][:, channels])
    for j, (i, neurons, groups) in enumerate(zip(kept['layers'], kept['neurons'], kept['groups'])):
        s, t = f'blocks.{j}.', f'blocks.{i}.'
        heads = [h for g in groups for h in range(g * group, (g + 1) * group)]  # each group's query heads
        q, k = head_rows(heads, hs), head_rows(groups, hs, offset=cfg.n_head * hs)
        rows = torch.tensor(q + k + [r + cfg.n_kv_head * hs for r in k])  # q, then k, then v rows of qkv
        up = torch.tensor(neurons + [cfg.mlp_hidden + n for n in neurons])  # gate rows, then up rows of fc
        for name in ('norm1.weight', 'norm2.weight'):
            new[s + name].copy_(old[t + name][channels])
        new[s + 'attn.qkv.weight'].copy_(old[t + 'attn.qkv.weight'][rows][:, channels])
        if cfg.qkv_bias:
            new[s + 'attn.qkv.bias'].copy_(old[t + 'attn.qkv.bias'][rows])
        new[s + 'attn.proj.weight'].copy_(old[t + 'attn.proj.weight'][channels][:, torch.tensor(q)])
        new[s + 'mlp.fc.weight'].copy_(old[t + 'mlp.fc.weight'][up if cfg.mlp == 'swiglu' else
                                                                 torch.tensor(neurons)][:, channels])
        new[s + 'mlp.proj.weight'].copy_(old[t + 'mlp.proj.weight'][channels][:, torch.tensor(neurons)])
    return small


@torch.no_grad()
def calibration_ce(model, batches):
    """The mean next-token CE over the batches' real tokens."""
    was_training = model.training
    model.eval()
    ce = sum(next_token_ce(model, model.hidden_states(x, mask), x, mask) for x, mask in batches)
    model.train(was_training)
    return (ce[0] / ce[1]).item()


def next_token_ce(model, h, x, mask):
    """(summed CE, tokens) of the next-token predictions from hidden states h (B, T, C) where both tokens are real,
    through the head one row at a time (the logits are vocabulary-wide)."""
    out = torch.zeros(2)
    for b in range(x.size(0)):
        m = torch.ones_like(x[b]) if mask is None else mask[b]
        counted = (m[:-1] * m[1:]).bool()
        logits = model.head(h[b, :-1][counted]).float()
        out += torch.tensor([F.cross_entropy(logits, x[b, 1:][counted], reduction='sum').item(), counted.sum().item()])
    return out


def describe(kept, cfg, args, by_influence):
    """What pruning kept, in one line."""
    layers = f"{len(kept['layers'])} of {cfg.n_layer} layers {kept['layers']}"
    layers += ' (highest Block Influence)' if by_influence else ' (keep_layers)'
    return (f"pruned to {layers}, {args['n_embd']} of {cfg.n_embd} channels, {args['n_kv_head']} of "
            f"{cfg.n_kv_head} key/value groups ({args['n_head']} of {cfg.n_head} query heads) and "
            f"{args['mlp_hidden']} of {cfg.mlp_hidden} MLP neurons per layer, by activation")
