"""
nanoGPT-style configuration: a script's globals are the defaults, a config file overrides
some of them, then --key=value arguments override those. Used by train.py:

    python train.py config/shakespeare.py --batch_size=4 --teacher=/path/to/model

Unlike nanoGPT, nothing from the command line is exec'd: values are parsed with
ast.literal_eval (a bare word that is not a Python literal is taken as a string). Config
files are plain Python, run in a namespace of their own. Every key must already exist and
keep its type (an int is accepted where a float is expected); anything else is one clear
error naming the valid keys.

check_settings() then checks train.py's settings as a whole, before anything slow: the bad-input
tests call it directly.
"""
import ast
import difflib
import re
from pathlib import Path
from types import SimpleNamespace


def _check(key, value, defaults, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SystemExit(f"indra: unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(sorted(defaults))}")
    expected = type(defaults[key])
    if expected is float and type(value) is int:
        return float(value)
    if type(value) is not expected:
        raise SystemExit(f"indra: {key} in {where} must be {expected.__name__}, got {value!r} "
                         f"({type(value).__name__}); e.g. --{key}={defaults[key]!r}")
    return value


def config_file(path):
    """The settings a config file makes: its plain top-level names (not _private, functions or modules)."""
    namespace = {'__file__': str(path)}  # a config may start from another: see config/shakespeare_features.py
    exec(compile(Path(path).read_text(), str(path), 'exec'), namespace)
    return {key: value for key, value in namespace.items()
            if not key.startswith('_') and not callable(value) and type(value).__name__ != 'module'}


def script_settings(path):
    """{name: value} of the literal assignments between a script's first two `# ---` rulers, e.g. train.py's
    globals: its settings' defaults, read without running it (the bad-input tests check settings against them)."""
    text = Path(path).read_text()
    rulers = [i + 1 for i, line in enumerate(text.splitlines()) if line.startswith('# ---') and set(line[2:]) == {'-'}]
    assert len(rulers) >= 2, f"{path} has no settings between two '# ---' rulers"
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and rulers[0] < node.lineno < rulers[1]:
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # not a literal (a Path, a call): not a setting
                continue
    return {k: v for k, v in out.items() if not k.startswith('_') and type(v) in (int, float, bool, str, dict, list)}


def configure(defaults, argv):
    """defaults: {key: default value}; argv: config files and --key=value strings, in order.
    Returns {key: value} for every key that was overridden."""
    overrides = {}
    for arg in argv:
        if not arg.startswith('--'):
            path = Path(arg)
            if not path.is_file():
                raise SystemExit(f"indra: config file {arg!r} not found; give a path like config/shakespeare.py")
            for key, value in config_file(path).items():
                overrides[key] = _check(key, value, defaults, arg)
            continue
        key, eq, text = arg[2:].partition('=')
        if not eq:
            raise SystemExit(f"indra: argument {arg!r} has no value; write --{key}=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word such as --teacher=smollm2-135m-instruct
        if isinstance(defaults.get(key), str) and not isinstance(value, str):
            value = text  # a str setting keeps what was typed, e.g. --out_dir=2024
        overrides[key] = _check(key, value, defaults, arg)
    return overrides


def check_settings(config, device_type='cpu', ddp=False, world_size=1):
    """train.py's settings, checked before anything slow: every setting that cannot work is one SystemExit line
    naming the fix. Fills in what total_batch_size implies (config['gradient_accumulation_steps']) and returns
    what follows from the settings: {'micro_steps': per rank and optimizer step, 'schedule_iters': the length of
    every schedule, 'own_vocab': the student's own BPE size or 0, 'criterion': the DistillationLoss}."""
    from losses import DistillationLoss
    from machine import DTYPES
    from model import SIZES
    from monitor import require
    c = SimpleNamespace(**config)

    def fail(msg):
        raise SystemExit(f"indra: {msg}")

    if ddp and c.teacher_device_map:
        fail("--teacher_device_map=auto spreads one teacher over every GPU, so it cannot run once per rank; "
             "build the targets cache with it in one process (python teacher.py --cache --device_map=auto), "
             "then train on N ranks with --teacher_targets=cache")
    if c.dtype not in DTYPES:
        fail(f"--dtype={c.dtype!r}: choose auto (measured), bfloat16, float16 or float32")
    if c.dtype == 'float16' and device_type == 'cpu':
        fail("--dtype=float16 is for CUDA (CPU autocast runs bfloat16); on CPU use --dtype=auto, bfloat16 or float32")
    if c.init_from not in ('scratch', 'resume', 'teacher') and not c.init_from.endswith('.pt'):
        fail(f"--init_from={c.init_from!r}: choose scratch or resume or teacher, or the path of another run's "
             f"checkpoint ending in .pt (e.g. out/best.pt: a stage, docs/stages.md)")
    if c.init_from_ema and not c.init_from.endswith('.pt'):
        fail("--init_from_ema=True starts from the EMA of the checkpoint --init_from names; pass "
             "--init_from=path/to/best.pt, or --init_from_ema=False")
    for name, options in (('mlp', ('gelu', 'swiglu')),
                          ('teacher_targets', ('live', 'cache')),
                          ('optimizer', ('adamw', 'adamw8bit', 'mugrokfast')),
                          ('feature_loss', ('mse', 'cosine'))):
        if config[name] not in options:
            fail(f"--{name}={config[name]!r}: choose {' or '.join(options)}")
    for name in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'max_iters', 'eval_interval',
                 'eval_iters', 'log_interval', 'max_skipped_steps', 'prune_batches'):
        if config[name] <= 0:
            fail(f"--{name}={config[name]} must be a positive integer")
    tokens = c.batch_size * c.block_size
    if c.total_batch_size:  # batch sizes are stated in tokens: the accumulation follows from it
        if c.total_batch_size < 0 or c.total_batch_size % tokens:
            fail(f"--total_batch_size={c.total_batch_size} must be a positive multiple of batch_size x block_size = "
                 f"{tokens} tokens, e.g. {4 * tokens}")
        c.gradient_accumulation_steps = config['gradient_accumulation_steps'] = c.total_batch_size // tokens
    if c.gradient_accumulation_steps % world_size:
        fail(f"gradient_accumulation_steps={c.gradient_accumulation_steps} is shared among {world_size} ranks, so it "
             f"must be a multiple of {world_size}; use "
             f"--gradient_accumulation_steps={world_size * -(-c.gradient_accumulation_steps // world_size)}")
    if c.learning_rate <= 0 or c.min_lr < 0 or c.min_lr > c.learning_rate:
        fail(f"learning_rate={c.learning_rate} must be > 0 and min_lr={c.min_lr} in [0, learning_rate]")
    for name in ('kd_weight', 'kd_weight_start', 'kd_warmup_frac', 'label_smoothing'):
        if not 0.0 <= config[name] <= 1.0:
            fail(f"--{name}={config[name]} must be in [0, 1]")
    if c.temperature <= 0 or c.temperature_start < 0 or (c.temperature_start and c.temperature_end <= 0):
        fail(f"temperatures must be > 0: temperature={c.temperature}, temperature_start={c.temperature_start} "
             f"(0 = off), temperature_end={c.temperature_end}")
    if c.teacher_targets == 'cache' and c.temperature_start:
        fail("the teacher-targets cache holds the teacher at one temperature; a temperature schedule "
             "(--temperature_start) needs --teacher_targets=live")
    if not 0.0 <= c.ema_decay < 1.0:
        fail(f"--ema_decay={c.ema_decay} must be in [0, 1) (0 = no EMA; 0.999 is typical)")
    if c.logit_clamp < 0:
        fail(f"--logit_clamp={c.logit_clamp} must be >= 0 (0 = off; seed 002 used 30)")
    for pattern, mult in c.lr_multipliers.items():
        if not isinstance(pattern, str) or type(mult) not in (int, float) or mult < 0:
            fail(f"lr_multipliers maps name patterns to multipliers >= 0, e.g. {{'blocks.0.*': 0.5}}; "
                 f"got {pattern!r}: {mult!r}")
    try:  # the loss checks its own settings (kd_loss, jsd_beta, skew_alpha, kd_top_k)
        criterion = DistillationLoss(c.kd_weight, c.temperature, c.label_smoothing, c.loss_chunk_tokens,
                                     c.logit_clamp, c.kd_loss, c.jsd_beta, c.skew_alpha, c.kd_top_k)
    except ValueError as e:
        fail(f"--{e}")
    if c.teacher_targets == 'cache' and (c.kd_loss != 'forward_kl' or c.kd_top_k or c.feature_weight
                                         or c.attention_weight):
        fail("the teacher-targets cache holds top-k log-probs, enough for forward KL on the full vocabulary only; "
             "--kd_loss, --kd_top_k, --feature_weight and --attention_weight need --teacher_targets=live")
    if not 0.0 <= c.onpolicy_frac <= 1.0 or c.onpolicy_temperature < 0:
        fail(f"--onpolicy_frac={c.onpolicy_frac} must be in [0, 1] (0 = off) and --onpolicy_temperature="
             f"{c.onpolicy_temperature} >= 0 (0 = greedy)")
    if c.onpolicy_frac and (c.teacher_targets == 'cache' or c.student_tokenizer):
        fail("on-policy batches are graded by the live teacher on its own tokens; --onpolicy_frac needs "
             "--teacher_targets=live and --student_tokenizer=''")
    if c.feature_weight < 0 or c.attention_weight < 0:
        fail(f"--feature_weight={c.feature_weight} and --attention_weight={c.attention_weight} must be >= 0 (0 = off)")
    own_vocab = int(c.student_tokenizer[3:]) if re.fullmatch(r'bpe\d+', c.student_tokenizer) else 0
    if c.student_tokenizer and not own_vocab:
        fail(f"--student_tokenizer={c.student_tokenizer!r}: use '' (the teacher's) or 'bpe<N>', e.g. bpe8192")
    if own_vocab and (c.feature_weight or c.attention_weight or c.teacher_targets == 'cache'):
        fail("a student with its own tokenizer sees other tokens than the teacher: feature and attention matching "
             "and the teacher-targets cache need the teacher's tokens; set --feature_weight=0 --attention_weight=0 "
             "--teacher_targets=live, or --student_tokenizer=''")
    for name in SIZES:  # 0: the default (head_dim, ...), the teacher's (init_from='teacher'), the checkpoint's
        needed = c.init_from == 'scratch' and name in ('n_layer', 'n_head', 'n_embd')  # a fresh student's own sizes
        if config[name] < 0 or (needed and not config[name]):
            fail(f"--{name}={config[name]} must be a positive integer (0 means the teacher's with --init_from=teacher)")
    if c.n_head and c.n_kv_head and c.n_head % c.n_kv_head:
        fail(f"--n_head={c.n_head} must be a multiple of --n_kv_head={c.n_kv_head}: each key/value head serves a "
             f"group of query heads")
    if c.head_dim % 2 or (not c.head_dim and c.n_head and c.n_embd % (2 * c.n_head)):
        fail(f"a head's features are Re and Im halves, so head_dim must be even: head_dim={c.head_dim}, n_embd="
             f"{c.n_embd}, n_head={c.n_head}; set an even --head_dim or an n_head that divides n_embd / 2")
    if not all(type(i) is int for i in c.keep_layers) or (c.keep_layers and c.init_from in ('scratch', 'resume')):
        fail(f"--keep_layers={c.keep_layers} names layers to keep, e.g. [0, 14, 29], with --init_from=teacher (the "
             f"teacher's) or a checkpoint's path (its student's)")
    if c.rope_base <= 0 or c.norm_eps < 0:
        fail(f"--rope_base={c.rope_base} must be > 0 and --norm_eps={c.norm_eps} >= 0 (0: the machine epsilon)")
    if c.init_from == 'teacher' and own_vocab:
        fail("--init_from=teacher gives the student the teacher's embedding, hence its tokenizer; use "
             "--student_tokenizer='' with it, or --init_from=scratch")
    check_cognate(c, fail)
    for switch, module in (('wandb_log', 'wandb'), ('aim_log', 'aim')):  # optional loggers: there, or one line
        if config[switch]:
            require(module, switch)
    return {'micro_steps': c.gradient_accumulation_steps // world_size, 'own_vocab': own_vocab,
            'schedule_iters': c.lr_decay_iters or c.max_iters, 'criterion': criterion}


def check_cognate(c, fail):
    """Seed 001's Cognate settings (cognate.py, optim.MuGrokfast): each bad value is one line naming the fix."""
    if c.recursions < 1:
        fail(f"--recursions={c.recursions} must be >= 1 (1: the plain student; e.g. 4 applies the blocks 4 times)")
    if c.act and c.recursions < 2:
        fail("--act=True mixes the passes of a recursive student: set --recursions=2 or more, or --act=False")
    if min(c.act_ponder_weight, c.act_diversity_weight) < 0 or not 0.0 <= c.act_target_variance <= 0.25:
        fail(f"--act_ponder_weight={c.act_ponder_weight} and --act_diversity_weight={c.act_diversity_weight} must be "
             f">= 0, --act_target_variance={c.act_target_variance} in [0, 0.25] (a probability's variance is <= 0.25)")
    if not 0.0 < c.ltm_decay < 1.0 or c.ltm_dim < 1:
        fail(f"--ltm_decay={c.ltm_decay} must be in (0, 1) (0.9 remembers ~10 tokens) and --ltm_dim={c.ltm_dim} >= 1")
    if c.init_from == 'teacher' and (c.recursions > 1 or c.ltm):
        fail("--init_from=teacher builds a Llama-shaped student from the teacher's layers; a Cognate student "
             "(--recursions > 1, --ltm) starts from scratch: use --init_from=scratch, or --recursions=1 --ltm=False")
    if c.recursions > 1 and (c.feature_weight or c.attention_weight):
        fail("feature and attention matching map each student block to one teacher layer, but with --recursions > 1 "
             "a block runs several times: set --feature_weight=0 --attention_weight=0, or --recursions=1")
    if c.muon_lr <= 0 or not 0.0 <= c.grokfast_alpha < 1.0 or c.grokfast_lambda < 0:
        fail(f"--muon_lr={c.muon_lr} must be > 0, --grokfast_alpha={c.grokfast_alpha} in [0, 1) and "
             f"--grokfast_lambda={c.grokfast_lambda} >= 0 (0: Muon + AdamW without the filter)")
