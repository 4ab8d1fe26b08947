"""
Distill a teacher language model into an indra student (complex-valued attention).

CPU quickstart, embedded SmolLM2-135M-Instruct teacher on Shakespeare (about 10 min, 2 cores):
    python train.py config/shakespeare.py
The seed 000 agent recipe (Qwen2.5-0.5B-Instruct teacher in 4-bit, one GPU with 6-8 GB):
    python train.py config/indra_agent.py
Override any global below, then resume an interrupted run:
    python train.py config/shakespeare.py --max_iters=400 --kd_weight=0.7
    python train.py config/shakespeare.py --init_from=resume

One optimizer step = batch_size x block_size tokens per micro-step x gradient_accumulation_steps.
The loss is (1 - kd_weight) * CE + kd_weight * T^2 * KL(teacher_T || student_T), see losses.py.
Everything is logged to out_dir/log.jsonl; out_dir/ckpt.pt is the latest state, best.pt the best val CE.
"""
import importlib.util
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
import torch

from configurator import configure
from losses import DistillationLoss, Teacher
from model import Indra, IndraConfig
from teacher import build_targets, check_linear_head, load_teacher, teacher_hidden, teacher_slug, tokenizer_hash

ROOT = Path(__file__).resolve().parent
# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'  # checkpoints and logs; relative paths are taken from the current directory
init_from = 'scratch'  # 'scratch' | 'resume' (continue from out_dir/ckpt.pt)
overwrite = False  # allow a fresh run in an out_dir that already holds a checkpoint
eval_interval = 50  # optimizer steps between held-out evaluations (and checkpoints)
eval_iters = 10  # held-out batches per evaluation (the same batches every time)
log_interval = 10  # optimizer steps between printed log lines (every step goes to log.jsonl)
# data
dataset = 'shakespeare'  # data/<dataset>/prepare.py makes the token files
data_dir = ''  # token files; '' = data/<dataset>/<teacher slug>/, prepared on first use
batch_size = 8  # sequences per micro-step
block_size = 256  # tokens per sequence
gradient_accumulation_steps = 4  # micro-steps per optimizer step
# teacher
teacher = 'smollm2-135m-instruct'  # embedded name | local model dir | path/to/model.gguf | hub id
teacher_quantization = 'none'  # 'none' | '4bit' | '8bit' (bitsandbytes, CUDA only)
teacher_targets = 'live'  # 'live': the teacher runs every step | 'cache': its top-k targets, computed once (teacher.py --cache)
targets_top_k = 64  # tokens per position kept in the cache
# student
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0
attn_impl = 'sdpa'  # 'sdpa' (fused) | 'reference' (complex64 matmuls, seed 000)
gradient_checkpointing = False  # recompute activations in backward: less memory, slower
# distillation
kd_weight = 0.5  # share of the KD term; 0 = plain cross-entropy on the same tokens
temperature = 2.0  # softens both distributions in the KD term
label_smoothing = 0.0  # for the CE part (seed 002 used 0.1)
loss_chunk_tokens = 1024  # tokens per pass through the vocabulary-wide heads (bounds the loss's memory)
# optimizer
optimizer = 'adamw'  # 'adamw' (torch) | 'adamw8bit' (bitsandbytes, CPU and CUDA)
learning_rate = 1e-3  # peak learning rate
max_iters = 200  # optimizer steps
weight_decay = 0.1  # on matrices and embeddings only
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global grad norm to this; 0 = off
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 20
lr_decay_iters = 0  # 0 = max_iters
min_lr = 1e-4
# early stopping on held-out student CE (seed 001)
patience = 0  # evaluations without improvement before stopping; 0 = never stop early
min_delta = 0.0  # an improvement smaller than this does not count
# system
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = 'bfloat16'  # 'bfloat16' | 'float16' (CUDA only, with GradScaler) | 'float32'
compile = False  # torch.compile the student (needs a C/C++ compiler on CPU; compiles for a minute first)
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and type(v) in (int, float, bool, str)]
globals().update(configure({k: globals()[k] for k in config_keys}, sys.argv[1:]))
config = {k: globals()[k] for k in config_keys}

# ---- check the settings before doing anything slow --------------------------
def fail(msg):
    raise SystemExit(f"indra: {msg}")

if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if device_type == 'cuda' and not torch.cuda.is_available():
    fail(f"--device={device} but no CUDA GPU is visible; use --device=cpu")
if dtype not in ('bfloat16', 'float16', 'float32'):
    fail(f"--dtype={dtype!r}: choose bfloat16, float16 or float32")
if dtype == 'float16' and device_type == 'cpu':
    fail("--dtype=float16 is for CUDA (CPU autocast runs bfloat16); on CPU use --dtype=bfloat16 or float32")
if init_from not in ('scratch', 'resume'):
    fail(f"--init_from={init_from!r}: choose scratch or resume")
if teacher_targets not in ('live', 'cache'):
    fail(f"--teacher_targets={teacher_targets!r}: choose live or cache")
if optimizer not in ('adamw', 'adamw8bit'):
    fail(f"--optimizer={optimizer!r}: choose adamw or adamw8bit")
for name in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'max_iters', 'eval_interval',
             'eval_iters', 'log_interval'):
    if config[name] <= 0:
        fail(f"--{name}={config[name]} must be a positive integer")
if learning_rate <= 0 or min_lr < 0 or min_lr > learning_rate:
    fail(f"learning_rate={learning_rate} must be > 0 and min_lr={min_lr} in [0, learning_rate]")
out_path = Path(out_dir)
if init_from == 'scratch' and (out_path / 'ckpt.pt').exists() and not overwrite:
    fail(f"{out_path / 'ckpt.pt'} exists; continue it with --init_from=resume, "
         f"or start over with another --out_dir or --overwrite=True")
if init_from == 'resume' and not (out_path / 'ckpt.pt').exists():
    fail(f"--init_from=resume but {out_path / 'ckpt.pt'} does not exist; train from scratch first")

torch.manual_seed(seed)
random.seed(seed)
np.random.seed(seed)
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
if device_type == 'cuda' and dtype == 'bfloat16' and not torch.cuda.is_bf16_supported():
    fail("this GPU has no bfloat16; use --dtype=float16")
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
print(f"tokens per optimizer step: {tokens_per_iter:,} = {gradient_accumulation_steps} accumulation "
      f"x {batch_size} sequences x {block_size} tokens; device {device}, {dtype}")

# ---- teacher and data --------------------------------------------------------
t0 = time.time()
teacher_model, tokenizer, _ = load_teacher(teacher, dtype=ptdtype, device=device, quantization=teacher_quantization)
teacher_vocab = teacher_model.get_output_embeddings().weight.shape[0]  # the logit width, may exceed len(tokenizer)
print(f"teacher {teacher}: {sum(p.numel() for p in teacher_model.parameters()) / 1e6:.1f}M parameters, "
      f"{teacher_vocab} logits, loaded in {time.time() - t0:.1f}s")
check_linear_head(teacher_model, len(tokenizer))
teacher_head = teacher_model.get_output_embeddings().weight  # (V', C_teacher)

data_path = Path(data_dir) if data_dir else ROOT / 'data' / dataset / teacher_slug(teacher)
if not (data_path / 'meta.json').exists():
    prepare_py = ROOT / 'data' / dataset / 'prepare.py'
    if not prepare_py.exists():
        fail(f"no token files in {data_path} and no {prepare_py.relative_to(ROOT)} to make them; check --dataset")
    print(f"preparing {dataset} for {teacher} into {data_path}")
    spec = importlib.util.spec_from_file_location(f'prepare_{dataset}', prepare_py)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    prepare.prepare(teacher, data_path)
meta = json.loads((data_path / 'meta.json').read_text())
if meta['tokenizer_hash'] != tokenizer_hash(tokenizer):
    fail(f"token files in {data_path} were made for tokenizer {meta['tokenizer_hash']} ({meta['teacher']}), "
         f"not this teacher's ({tokenizer_hash(tokenizer)}); run python data/{dataset}/prepare.py --teacher={teacher} "
         f"--out_dir=<new dir> and pass --data_dir=<new dir>")
for split in ('train', 'val'):
    n = np.memmap(data_path / f'{split}.bin', dtype=meta['dtype'], mode='r').shape[0]
    if n <= block_size:
        fail(f"{split}.bin in {data_path} has {n} tokens, fewer than one block of {block_size + 1}; lower --block_size")


cache = None
if teacher_targets == 'cache':  # the teacher's targets were computed once for aligned blocks of train.bin
    cache_path = build_targets(teacher, data_path, targets_top_k, temperature, block_size, device=device, dtype=ptdtype,
                               loaded=(teacher_model, tokenizer))
    cache = json.loads((cache_path / 'meta.json').read_text())
    cache['path'] = cache_path
    print(f"training on cached teacher targets: {cache['blocks']} blocks, top {targets_top_k} at T={temperature:g}")


def get_batch(split, generator):
    """batch_size windows of block_size tokens, (B, T), and the cached teacher targets for them (or None).
    Shakespeare windows are all real tokens, so no attention mask; the loss shifts by one inside."""
    data = np.memmap(data_path / f'{split}.bin', dtype=meta['dtype'], mode='r')  # re-opened: np.memmap leaks otherwise
    if split == 'train' and cache is not None:  # the cache holds whole aligned blocks
        ix = torch.randint(cache['blocks'], (batch_size,), generator=generator) * block_size
    else:
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()]).to(device)
    if split != 'train' or cache is None:
        return x, None
    shape = (cache['blocks'] * block_size, targets_top_k)
    ids = np.memmap(cache['path'] / 'ids.bin', dtype=cache['ids_dtype'], mode='r', shape=shape)
    logp = np.memmap(cache['path'] / 'logp.bin', dtype=np.float16, mode='r', shape=shape)
    rows = lambda a: torch.stack([torch.from_numpy(a[i:i + block_size].astype(np.int64 if a is ids else np.float32))
                                  for i in ix.tolist()]).to(device)
    return x, Teacher(ids=rows(ids), logp=rows(logp))  # (B, T, k) each


# ---- student, optimizer, resume ---------------------------------------------
model_args = dict(vocab_size=teacher_vocab, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                  dropout=dropout, attn_impl=attn_impl, gradient_checkpointing=gradient_checkpointing)
checkpoint = None
if init_from == 'resume':
    checkpoint = torch.load(out_path / 'ckpt.pt', map_location='cpu', weights_only=True)
    shape_keys = ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_embd')
    differ = [k for k in shape_keys if checkpoint['model_args'][k] != model_args[k]]
    if differ:
        fail(f"{out_path / 'ckpt.pt'} holds a student with " + ", ".join(
            f"{k}={checkpoint['model_args'][k]}" for k in differ) + " but this run asks for " + ", ".join(
            f"{k}={model_args[k]}" for k in differ) + "; resume with the checkpoint's settings")
model = Indra(IndraConfig(**model_args)).to(device)
print(model.param_report())

# Weight decay on matrices and embeddings, none on norm gains: every parameter in exactly one group.
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
assert len(decay) + len(no_decay) == len(list(model.parameters()))
groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
if optimizer == 'adamw8bit':
    import bitsandbytes as bnb  # 8-bit states (seed 000); bitsandbytes >= 0.45 runs them on CPU too
    opt = bnb.optim.AdamW8bit(groups, lr=learning_rate, betas=(beta1, beta2))
else:
    opt = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')  # bf16 has fp32's range: no scaling needed
data_gen = torch.Generator().manual_seed(seed)  # the training batch order, saved for exact resume

iter_num, best_val, bad_evals = 0, float('inf'), 0
if checkpoint is not None:
    model.load_state_dict(checkpoint['model'])
    opt.load_state_dict(checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    iter_num, best_val, bad_evals = checkpoint['iter_num'], checkpoint['best_val'], checkpoint['bad_evals']
    rng = checkpoint['rng']
    data_gen.set_state(rng['data'])
    torch.set_rng_state(rng['torch'])
    if device_type == 'cuda' and 'cuda' in rng:
        torch.cuda.set_rng_state_all(rng['cuda'])
    random.setstate((rng['python'][0], tuple(rng['python'][1]), rng['python'][2]))
    np.random.set_state(('MT19937', rng['numpy'].numpy(), *rng['numpy_pos']))
    print(f"resumed from {out_path / 'ckpt.pt'} at step {iter_num} (best val CE {best_val:.4f})")
    checkpoint = None  # free it

criterion = DistillationLoss(kd_weight, temperature, label_smoothing, loss_chunk_tokens)
eval_kl = DistillationLoss(kd_weight=1.0, temperature=1.0, chunk_tokens=loss_chunk_tokens)  # the real KL, T = 1
eval_ce = DistillationLoss(kd_weight=0.0, chunk_tokens=loss_chunk_tokens)
hidden_states = model.hidden_states  # (B, T) ids -> (B, T, C); the loss applies the tied head itself
if compile:
    try:  # compile now, on a real batch, so that the first timed step is not the compilation
        hidden_states = torch.compile(model.hidden_states)
        with torch.random.fork_rng(), autocast:  # leaves the RNG as it was (dropout draws from it)
            hidden_states(get_batch('val', torch.Generator().manual_seed(0))[0]).sum().backward()
        model.zero_grad(set_to_none=True)
    except Exception as e:  # no C++ compiler, an unsupported platform: say so and run eager
        print(f"indra: torch.compile is unavailable here ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
              f"running the student uncompiled")
        hidden_states = model.hidden_states


def get_lr(it):
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    decay_iters = lr_decay_iters or max_iters
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def teacher_targets(x):
    with torch.no_grad(), autocast:
        return Teacher(hidden=teacher_hidden(teacher_model, x), head=teacher_head)


@torch.no_grad()
def evaluate():
    """Student CE, KL(teacher || student) at T=1 and teacher CE on eval_iters fixed held-out batches."""
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)  # the same batches at every evaluation
    totals = torch.zeros(3)
    for _ in range(eval_iters):
        x, _ = get_batch('val', gen)
        t = teacher_targets(x)
        with autocast:
            _, ce, kl = eval_kl(hidden_states(x), model.lm_head.weight, x, teacher=t)
            _, t_ce, _ = eval_ce(t.hidden, t.head[:model.config.vocab_size], x)
        totals += torch.stack([ce.float().cpu(), kl.float().cpu(), t_ce.float().cpu()])
    model.train()
    ce, kl, t_ce = (totals / eval_iters).tolist()
    return {'val_ce': ce, 'val_ppl': math.exp(ce), 'val_kl': kl, 'teacher_val_ce': t_ce, 'teacher_val_ppl': math.exp(t_ce)}


def save(path):
    """Write atomically: a reader (or a crash) never sees half a checkpoint."""
    numpy_state = np.random.get_state()
    rng = {'data': data_gen.get_state(), 'torch': torch.get_rng_state(),
           'python': list(random.getstate()), 'numpy': torch.from_numpy(numpy_state[1].copy()),
           'numpy_pos': list(numpy_state[2:])}
    if device_type == 'cuda':
        rng['cuda'] = torch.cuda.get_rng_state_all()
    state = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'scaler': scaler.state_dict(),
             'model_args': model_args, 'config': config, 'iter_num': iter_num, 'best_val': best_val,
             'bad_evals': bad_evals, 'rng': rng,
             'tokenizer_hash': tokenizer_hash(tokenizer), 'eos_id': meta['eos_id']}
    tmp = path.with_suffix('.tmp')
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def memory():
    if device_type == 'cuda':  # seed 002: the device's real use, not allocated / reserved
        free, total = torch.cuda.mem_get_info()
        return f"gpu {(total - free) / 2**30:.1f}/{total / 2**30:.1f} GiB"
    return f"rss {psutil.Process().memory_info().rss / 2**30:.1f} GiB"


def log(record, line=None):
    with open(out_path / 'log.jsonl', 'a') as f:
        f.write(json.dumps(record) + '\n')
    if line:
        print(line, flush=True)


# ---- the loop ---------------------------------------------------------------
out_path.mkdir(parents=True, exist_ok=True)
(out_path / 'config.json').write_text(json.dumps(config, indent=2))
if init_from == 'scratch':
    (out_path / 'log.jsonl').unlink(missing_ok=True)
skip_eval_at = iter_num if init_from == 'resume' else -1  # the checkpoint was written right after that eval
model.train()
while True:
    lr = get_lr(iter_num)
    for group in opt.param_groups:
        group['lr'] = lr

    if (iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != skip_eval_at:
        stats = evaluate()
        improved = stats['val_ce'] < best_val - min_delta
        best_val, bad_evals = (stats['val_ce'], 0) if improved else (best_val, bad_evals + 1)
        log({'iter': iter_num, **stats},
            f"step {iter_num}: val CE {stats['val_ce']:.4f} (ppl {stats['val_ppl']:.1f}), "
            f"KL to teacher {stats['val_kl']:.4f}, teacher CE {stats['teacher_val_ce']:.4f} "
            f"(ppl {stats['teacher_val_ppl']:.1f}){'  *best*' if improved else ''}")
        if improved:
            save(out_path / 'best.pt')
        save(out_path / 'ckpt.pt')
        if patience and bad_evals >= patience:
            print(f"early stop: val CE has not improved by more than {min_delta} for {patience} evaluations")
            break
    if iter_num >= max_iters:
        break

    if device_type == 'cuda':
        torch.cuda.synchronize()
    t_start = time.perf_counter()
    parts = torch.zeros(3)
    for micro_step in range(gradient_accumulation_steps):
        x, t = get_batch('train', data_gen)
        if t is None and kd_weight > 0:
            t = teacher_targets(x)
        with autocast:
            loss, ce, kl = criterion(hidden_states(x), model.lm_head.weight, x, teacher=t)
        scaler.scale(loss / gradient_accumulation_steps).backward()
        parts += torch.stack([loss.detach().float().cpu(), ce.float().cpu(), kl.float().cpu()])
    scaler.unscale_(opt)  # true gradients (a no-op unless float16), for clipping and the logged norm
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf).item()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    if device_type == 'cuda':
        torch.cuda.synchronize()
    dt = time.perf_counter() - t_start

    loss, ce, kl = (parts / gradient_accumulation_steps).tolist()
    record = {'iter': iter_num, 'loss': loss, 'ce': ce, 'kl': kl, 'lr': lr, 'grad_norm': grad_norm,
              'dt': dt, 'tokens_per_s': tokens_per_iter / dt}
    log(record, f"iter {iter_num}: loss {loss:.4f} (ce {ce:.4f}, kl {kl:.4f}), lr {lr:.2e}, "
                f"grad norm {grad_norm:.2f}, {dt * 1000:.0f} ms, {tokens_per_iter / dt:,.0f} tok/s, {memory()}"
        if iter_num % log_interval == 0 else None)
    iter_num += 1

print(f"done: best val CE {best_val:.4f}; checkpoints in {out_path}/ (sample with: python sample.py --ckpt {out_path / 'best.pt'})")
