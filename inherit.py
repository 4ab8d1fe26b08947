"""
The student from another model's weights: the teacher's (init_from='teacher'), or another run's student (init_from=
path/to/best.pt, a stage), whole or pruned to smaller sizes (prune.py).

The teacher's: a rotary attention head is a complex attention head.

Llama and Qwen2 apply rotary embedding (Su et al. 2021) by "rotate_half": each head's d features are d/2 pairs
(i, i + d/2), and pair i turns by position x base^(-2i/d). Read the first half as Re and the second as Im and
that turn is a multiplication by e^{i pos freq}, the phase indra's attention gives q and k (attention.py, the
same frequencies); and the rotary score, q . k over the d features, is Re(q . conj(k)) over the d/2 complex
numbers. So the teacher's q, k, v and o matrices are a complex student's as they stand, with no permutation.
The rest is a student shape too (model.py): RMSNorm, a SwiGLU MLP, grouped key/value heads, q/k/v biases,
an untied head. init_from='teacher' builds the student this way (train.py), pruned to smaller sizes if the
settings ask for them (prune.py); tests/test_inherit.py holds its logits to the Hugging Face teacher's.

Another run's: a stage starts a new run (fresh optimizer, schedule, step counter, log) from a checkpoint's student,
its weights or its EMA, its shape, its own tokenizer and projector, and its data order; sizes below its own prune
it as the teacher is pruned (docs/stages.md, tests/test_stages.py).

    import inherit
    model, model_args, kept = inherit.student_from_teacher('smollm2-135m-instruct', model_args)  # the teacher
    model, model_args, inherited = inherit.for_run(config, data, model_args, teacher)  # train.py's
    stage = inherit.open_stage(config)  # init_from=path/to/best.pt: read and checked before anything slow
    model, model_args, inherited = inherit.from_checkpoint(stage, config, data, model_args)
    inherit.carry_over(stage, aux, data_gen)  # its data order, and an own tokenizer's projector
"""
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import prune
from checkpoint import load_checkpoint, load_weights, resume_shape
from model import SIZES, Indra, IndraConfig
from teacher import resolve
from tokenizer import tokenizer_hash

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


# ---- a stage: another run's student -------------------------------------------------------------------------------
def open_stage(config):
    """init_from=path/to/best.pt: {'path', 'ckpt'}, that checkpoint read and checked against the run's settings
    before anything slow, each mismatch one line: unreadable, another teacher, another tokenizer for the student, no
    EMA for init_from_ema, or sizes it cannot be cut to (stage_shape). None for any other init_from."""
    path = config['init_from']
    if not path.endswith('.pt'):
        return None
    ckpt = load_checkpoint(path)
    theirs = ckpt['config'].get('teacher')
    if not same_teacher(theirs, config['teacher']):
        fail(f"{path} was distilled from teacher {theirs!r} and this run's is {config['teacher']!r}: a stage keeps its "
             f"checkpoint's teacher and tokenizer; pass --teacher={theirs}")
    own = ckpt['config'].get('student_tokenizer', '') if ckpt.get('student_tokenizer') else ''
    if own != config['student_tokenizer']:
        says = {'': "the teacher's tokens"}
        fail(f"the student in {path} reads {says.get(own, f'its own tokenizer {own!r}')} and this run asks for "
             f"{says.get(config['student_tokenizer'], repr(config['student_tokenizer']))}: a stage keeps its "
             f"checkpoint's tokenizer; pass --student_tokenizer={own!r}")
    if config['init_from_ema'] and ckpt.get('ema') is None:
        fail(f"{path} has no EMA weights (trained with ema_decay=0); start from its weights with --init_from_ema=False")
    stage = {'path': path, 'ckpt': ckpt}
    stage_shape(stage, run_args(config, ckpt['model_args']['vocab_size']), config['keep_layers'])
    return stage


def same_teacher(a, b):
    """Whether two teacher specs name the same teacher: equal, or paths to the same file or directory."""
    if a == b:
        return True
    pa, pb = (Path(str(s)).expanduser() for s in (a, b))
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def run_args(config, vocab_size):
    """The model_args the run's settings ask for, as train.py builds them."""
    return {**{f.name: config[f.name] for f in fields(IndraConfig) if f.name != 'vocab_size'}, 'vocab_size': vocab_size}


def stage_shape(stage, model_args, keep_layers=()):
    """(the checkpoint's student under the run's settings, the stage's model_args): its architecture checked as a
    resume checks it (checkpoint.resume_shape), the run's block_size (no weight depends on it), each size 0 the
    checkpoint's and a smaller one pruned (pruned_shape). Pruning needs a plain SwiGLU student: one line otherwise."""
    ckpt, where = stage['ckpt'], stage['path']
    saved = ckpt['model_args']
    asked = {**model_args, **{k: 0 for k in SIZES}, 'block_size': saved.get('block_size', model_args['block_size'])}
    shape = resume_shape(ckpt, asked, where, fix="start the stage with the checkpoint's settings (a size of 0 is "
                                                  "the checkpoint's, a smaller one prunes it)")
    shape = asdict(IndraConfig(**{**shape, 'block_size': model_args['block_size']}))  # the 0s resolved
    source = dict(who=f'the student in {where} has', whose="the checkpoint's", layers="layers of the checkpoint's student",
                  how='a stage (init_from=<checkpoint>)', alt='')
    full, args = pruned_shape(shape, model_args, keep_layers, source)
    if keep_layers or any(args[k] != full[k] for k in SIZES):
        if full['recursions'] > 1 or full['ltm']:
            fail(f"the student in {where} is a Cognate student (recursions={full['recursions']}, ltm={full['ltm']}); "
                 f"pruning cuts a plain Llama-shaped one: set every size to 0 (the checkpoint's) and keep_layers=[]")
        if full['mlp'] != 'swiglu':
            fail(f"the student in {where} has a {full['mlp']} MLP; pruning needs a SwiGLU student (mlp='swiglu', as "
                 f"one from the teacher has): set every size to 0 (the checkpoint's) and keep_layers=[]")
    return full, args


@torch.no_grad()
def from_checkpoint(stage, config, data, model_args):
    """train.py's student for init_from=path/to/best.pt, after the teacher and the data are loaded: (student, the
    model_args that build it, what it inherited). The checkpoint's student, its weights or (init_from_ema) its EMA,
    in float32, pruned to the sizes the settings give as for_run prunes the teacher. What it inherited goes into
    every checkpoint: the checkpoint's record ({'teacher': spec or None, 'kept': ...}) with this stage added to its
    'stages': {'checkpoint': path, 'iter_num', 'ema', 'kept': what this stage's pruning kept, or None}."""
    ckpt, path = stage['ckpt'], stage['path']
    if ckpt.get('tokenizer_hash') != tokenizer_hash(data.tokenizer):  # the teacher's
        fail(f"{path} was trained with tokenizer {ckpt.get('tokenizer_hash')} and this run's teacher "
             f"{config['teacher']!r} has {tokenizer_hash(data.tokenizer)}: it is not the teacher that student was "
             f"distilled from, and a stage needs that one")
    if ckpt.get('student_tokenizer') != (data.student_tok.to_str() if data.student_tok else None):
        fail(f"the student in {path} reads another tokenizer than this run's data ({data.path}): the same kind, "
             f"other tokens; pass the --data_dir it was trained on")
    full, args = stage_shape(stage, model_args, config['keep_layers'])
    if full['vocab_size'] != model_args['vocab_size']:
        fail(f"the student in {path} has {full['vocab_size']} logits, this run's data {model_args['vocab_size']}")
    model = Indra(IndraConfig(**full))
    ema = config['init_from_ema']
    load_weights(model, ckpt, path, ema, "start from its weights with --init_from_ema=False")
    kept = None
    if any(args[k] != full[k] for k in SIZES) or config['keep_layers']:
        model, kept = cut(model, args, calibration(config, data), config['keep_layers'], "the checkpoint's")
    print(f"student from {path}: its {'EMA' if ema else 'weights'} at step {ckpt['iter_num']}, "
          f"{model.config.describe()}")
    before = ckpt.get('inherited') or {}
    inherited = {'teacher': before.get('teacher'), 'kept': before.get('kept'),
                 'stages': [*before.get('stages', []), {'checkpoint': str(path), 'iter_num': ckpt['iter_num'],
                                                        'ema': ema, 'kept': kept}]}
    stage['ckpt'] = {'rng': ckpt['rng'], 'aux': ckpt.get('aux') or {}}  # what carry_over needs; the rest is freed
    stage['kept'] = kept
    return model, args, inherited


@torch.no_grad()
def carry_over(stage, aux, data_gen):
    """What a stage keeps besides the student, once the run's parts are built: the checkpoint's data order (data_gen
    draws the batches its run would have drawn next) and an own tokenizer's projector (aux['projector'], its rows
    cut to the channels pruning kept)."""
    data_gen.set_state(stage['ckpt']['rng']['data'])
    if 'projector' in aux:
        saved = {k.split('.', 1)[1]: v for k, v in stage['ckpt']['aux'].items() if k.startswith('projector.')}
        if stage['kept']:  # the projector writes into the student's embedding space: its kept channels
            saved = {k: v[torch.tensor(stage['kept']['channels'])] for k, v in saved.items()}
        aux['projector'].load_state_dict(saved)
    stage.clear()
