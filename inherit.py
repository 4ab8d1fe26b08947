"""
The student from the teacher's own weights: a rotary attention head is a complex attention head.

Llama and Qwen2 apply rotary embedding (Su et al. 2021) by "rotate_half": each head's d features are d/2 pairs
(i, i + d/2), and pair i turns by position x base^(-2i/d). Read the first half as Re and the second as Im and
that turn is a multiplication by e^{i pos freq}, the phase indra's attention gives q and k (attention.py, the
same frequencies); and the rotary score, q . k over the d features, is Re(q . conj(k)) over the d/2 complex
numbers. So the teacher's q, k, v and o matrices are a complex student's as they stand, with no permutation.
The rest is a student shape too (model.py): RMSNorm, a SwiGLU MLP, grouped key/value heads, q/k/v biases,
an untied head. init_from='teacher' builds the student this way (train.py), pruned to smaller sizes if the
settings ask for them (prune.py); tests/test_inherit.py holds its logits to the Hugging Face teacher's.

    import inherit
    model, model_args, kept = inherit.student_from_teacher('smollm2-135m-instruct', model_args)  # the teacher
    model, model_args, inherited = inherit.for_run(config, data, model_args, teacher)  # train.py's
"""
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import prune
from model import SIZES, Indra, IndraConfig
from teacher import resolve

ARCHITECTURES = {'llama': False, 'qwen2': True}  # model_type: q/k/v biases
# how the refusals of pruned_shape name the model a student is cut from
TEACHER = dict(who='the teacher has', whose="the teacher's", layers='teacher layers', how="init_from='teacher'",
               alt=', or use --init_from=scratch')


def fail(msg):
    raise SystemExit(f"indra: {msg}")


def teacher_shape(config):
    """The IndraConfig fields of a student that computes what a Hugging Face Llama or Qwen2 config describes;
    anything else (another architecture, or a feature indra's student lacks) is one line saying what is supported."""
    kind = config.model_type
    if kind not in ARCHITECTURES:
        fail(f"init_from='teacher' reads Llama and Qwen2 teachers (model_type llama or qwen2); this one is "
             f"{kind!r}: use --init_from=scratch")
    rope = getattr(config, 'rope_parameters', None) or {'rope_type': 'default', 'rope_theta': config.rope_theta}
    unsupported = [(config.hidden_act != 'silu', f"hidden_act={config.hidden_act!r} (indra's SwiGLU is silu)"),
                   (rope.get('rope_type', 'default') != 'default', f"rope scaling {rope.get('rope_type')!r}"),
                   (getattr(config, 'attention_bias', False), 'attention_bias=True (a bias on o_proj too)'),
                   (getattr(config, 'mlp_bias', False), 'mlp_bias=True'),
                   (getattr(config, 'use_sliding_window', False), 'sliding-window attention')]
    for bad, what in unsupported:
        if bad:
            fail(f"this {kind} teacher has {what}, which indra's student does not compute; init_from='teacher' "
                 f"needs plain rotary attention and a SwiGLU MLP: use --init_from=scratch")
    return dict(vocab_size=config.vocab_size, n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
                n_kv_head=config.num_key_value_heads, n_embd=config.hidden_size,
                head_dim=getattr(config, 'head_dim', None) or config.hidden_size // config.num_attention_heads,
                mlp='swiglu', mlp_hidden=config.intermediate_size, qkv_bias=ARCHITECTURES[kind],
                tie_head=bool(config.tie_word_embeddings), rope_base=float(rope['rope_theta']),
                norm_eps=float(config.rms_norm_eps))


def weight_table(cfg):
    """[(student parameter, the teacher's tensors stacked along dim 0 to make it)]: one table for both
    directions (a student's tensor splits back by the teacher tensors' row counts)."""
    table = [('wte.weight', ['model.embed_tokens.weight'])]
    for i in range(cfg.n_layer):
        s, t = f'blocks.{i}.', f'model.layers.{i}.'
        table += [(s + 'norm1.weight', [t + 'input_layernorm.weight']),
                  (s + 'attn.qkv.weight', [t + f'self_attn.{p}_proj.weight' for p in 'qkv']),
                  *([(s + 'attn.qkv.bias', [t + f'self_attn.{p}_proj.bias' for p in 'qkv'])] if cfg.qkv_bias else []),
                  (s + 'attn.proj.weight', [t + 'self_attn.o_proj.weight']),
                  (s + 'norm2.weight', [t + 'post_attention_layernorm.weight']),
                  (s + 'mlp.fc.weight', [t + 'mlp.gate_proj.weight', t + 'mlp.up_proj.weight']),
                  (s + 'mlp.proj.weight', [t + 'mlp.down_proj.weight'])]
    table.append(('norm_f.weight', ['model.norm.weight']))
    if not cfg.tie_head:
        table.append(('lm_head.weight', ['lm_head.weight']))
    return table


def student_shape(teacher_config, model_args, keep_layers=()):
    """(the teacher's shape, the student's) as model_args: the teacher's architecture, and each size the
    settings' where it is not 0 (smaller than the teacher's: pruned, prune.py), else the teacher's. Sizes that
    cannot be cut from the teacher are one line."""
    return pruned_shape(teacher_shape(teacher_config), model_args, keep_layers, TEACHER)


def pruned_shape(shape, model_args, keep_layers, source):
    """(shape under model_args, the shape cut to the settings' sizes): each size the settings' where it is not 0,
    else shape's; sizes that cannot be cut from shape are one line naming the source (TEACHER, a stage's)."""
    full = {**model_args, **shape}
    args = {**full, **{k: model_args[k] for k in SIZES if model_args.get(k)}}
    for k in SIZES:
        if args[k] > shape[k]:
            fail(f"--{k}={args[k]} but {source['who']} {k}={shape[k]}: {source['how']} keeps or prunes "
                 f"{source['whose']} sizes; set --{k}={shape[k]} or less (0: {source['whose']}){source['alt']}")
    if keep_layers:
        if model_args.get('n_layer') not in (0, None, len(keep_layers)) or \
                sorted(set(keep_layers)) != sorted(keep_layers) or not set(keep_layers) <= set(range(shape['n_layer'])):
            fail(f"--keep_layers={list(keep_layers)} must name distinct {source['layers']} 0..{shape['n_layer'] - 1}, "
                 f"as many as --n_layer={model_args.get('n_layer')} (0: as many as it names)")
        args['n_layer'] = len(keep_layers)
    if args['head_dim'] != shape['head_dim']:
        fail(f"--head_dim={args['head_dim']}: pruning keeps each head whole, with {source['whose']} head_dim="
             f"{shape['head_dim']}; set --head_dim=0")
    group = shape['n_head'] // shape['n_kv_head']  # the source's query heads per key/value head
    heads, kv = model_args.get('n_head') or 0, model_args.get('n_kv_head') or 0
    if heads and not kv and heads % group == 0:
        kv = args['n_kv_head'] = heads // group
    elif kv and not heads:
        heads = args['n_head'] = kv * group
    if (heads or kv) and heads != kv * group:
        fail(f"--n_head={heads}, --n_kv_head={kv}: pruning keeps whole key/value groups of {source['whose']} {group} "
             f"query heads each ({shape['n_head']} over {shape['n_kv_head']}), so n_head must be {group} x n_kv_head")
    return full, args


@torch.no_grad()
def student_from_teacher(spec, model_args, calibration=None, keep_layers=()):
    """(Indra holding the teacher's weights in float32, the model_args that build it, what pruning kept or None).
    The weights are read from the teacher's files in float32, whatever dtype or quantization the training run loads
    the teacher in. Sizes below the teacher's prune it (prune.py) by importances measured on calibration(), a
    function giving [(x (B, T), attention_mask or None)]; it prints what it kept and the CE before and after."""
    path = resolve(spec)
    full_args, args = student_shape(AutoConfig.from_pretrained(path), model_args, keep_layers)
    model = Indra(IndraConfig(**full_args))
    weights = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    params, table = dict(model.named_parameters()), weight_table(model.config)
    assert sorted(params) == sorted(name for name, _ in table), "the weight table must fill every student parameter"
    for name, sources in table:
        params[name].copy_(torch.cat([weights[s] for s in sources], dim=0))
    if all(args[k] == full_args[k] for k in SIZES) and not keep_layers:
        return model, args, None
    small, kept = cut(model, args, calibration, keep_layers, "the teacher's")
    return small, args, kept


def cut(model, args, calibration, keep_layers, whose):
    """(model pruned to args, what it kept): importances measured on calibration() (prune.py), what was kept and the
    calibration CE before and after printed, in the shape whose (e.g. "the teacher's")."""
    batches = calibration()
    t0 = time.time()
    scores = prune.importance(model, batches)
    kept = prune.choose(scores, model.config, args, keep_layers)
    small = prune.prune(model, args, kept)
    print(prune.describe(kept, model.config, args, by_influence=not keep_layers))
    tokens = sum(x.numel() if m is None else m.sum().item() for x, m in batches)
    print(f"calibration CE on {tokens:,} training tokens: {scores['ce']:.4f} with {whose} shape, "
          f"{prune.calibration_ce(small, batches):.4f} pruned (measured and cut in {time.time() - t0:.0f}s)")
    return small, kept


def calibration(config, data):
    """The batches pruning measures on: prune_batches training batches drawn apart from the training order (a
    generator of their own), as [(x (B, T), attention_mask or None)] on CPU, drawn when called."""
    gen = torch.Generator().manual_seed(config['seed'] + 1)

    def draw():
        drawn = [data.batch('train', gen) for _ in range(config['prune_batches'])]
        return [(b.x.cpu(), None if b.attention_mask is None else b.attention_mask.cpu()) for b in drawn]
    return draw


def for_run(config, data, model_args, teacher):
    """train.py's student for init_from='teacher': (student, the model_args that build it, what it inherited).
    The teacher's weights and shapes, pruned to the sizes the settings give (calibrated on prune_batches training
    batches drawn apart from the training order). What it inherited goes into every checkpoint: {'teacher': spec,
    'kept': the kept layers, channels, neurons and groups, or None}."""
    model, model_args, kept = student_from_teacher(teacher, model_args, calibration(config, data),
                                                   config['keep_layers'])
    print(f"student from the teacher's weights: {model.config.describe()}")
    return model, model_args, {'teacher': teacher, 'kept': kept}

