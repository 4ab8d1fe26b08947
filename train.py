"""
Distill a teacher language model into an indra student (complex-valued attention).

CPU quickstart, embedded SmolLM2-135M-Instruct teacher on Shakespeare (about 10 min, 2 cores):
    python train.py config/shakespeare.py
The seed 000 agent recipe (Qwen2.5-0.5B-Instruct teacher in 4-bit, one GPU with 6-8 GB):
    python train.py config/indra_agent.py
Override any global below, then resume an interrupted run:
    python train.py config/shakespeare.py --max_iters=400 --kd_weight=0.7
    python train.py config/shakespeare.py --init_from=resume
Data-parallel on N GPUs of one node (or N CPU processes, gloo), the same global batch as one process:
    torchrun --standalone --nproc_per_node=N train.py config/indra_agent.py

One optimizer step = batch_size x block_size tokens per micro-step x gradient_accumulation_steps.
The loss is (1 - kd_weight) * CE + kd_weight * T^2 * D(teacher_T, student_T), D = kd_loss (forward KL by
default, losses.py), plus feature_weight x feature matching and attention_weight x attention matching
(matching.py); a student with its own tokenizer (student_tokenizer, vocab.py) learns from the teacher
through a projector that is trained beside it.
Every step is a record in out_dir/log.jsonl, drawn into out_dir/training.png at each evaluation (plot.py);
out_dir/ckpt.pt is the latest state, best.pt the best val CE. Ctrl-C (SIGINT) or SIGTERM finishes the
current step, writes ckpt.pt and says how to resume.
"""
import importlib.util
import inspect
import json
import math
import os
import random
import re
import signal
import sys
import time
from contextlib import nullcontext
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import vocab
from configurator import configure
from losses import DistillationLoss, Teacher, pad_examples
from matching import FeatureMatcher, attention_loss, head_groups, layer_map as map_layers, teacher_internals
from model import EMA, Indra, IndraConfig, load_checkpoint
from machine import (DTYPES, Peak, autocast as autocast_for, choose_dtype, keep_freed_memory, memory,
                     memory_text, peak_flops, pick_device)
from monitor import Records, collapsed, repetition, require, student_flops_per_token, teacher_flops_per_token
from teacher import (build_targets, chat_prompt, check_linear_head, encode, load_teacher, teacher_hidden,
                     teacher_slug, tokenizer_hash, write_atomic)

ROOT = Path(__file__).resolve().parent
sys.stdout.reconfigure(line_buffering=True)  # every line shows at once, also when the output goes to a file or a pipe
# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'  # checkpoints and logs; relative paths are taken from the current directory
init_from = 'scratch'  # 'scratch' | 'resume' (continue from out_dir/ckpt.pt)
overwrite = False  # allow a fresh run in an out_dir that already holds a checkpoint
eval_interval = 50  # optimizer steps between held-out evaluations (and checkpoints)
eval_iters = 10  # held-out batches per evaluation (the same batches every time)
log_interval = 10  # optimizer steps between printed log lines (every step goes to log.jsonl)
plot = True  # redraw out_dir/training.png (plot.py) at every evaluation
watch_tokens = 32  # at every evaluation, sample this many tokens from fixed prompts and check them for mode collapse (seed 001); 0 = off
wandb_log = False  # also log to Weights & Biases (pip install wandb; seed 001)
wandb_project = 'indra'
wandb_run_name = ''  # '' = let wandb name the run
wandb_mode = 'online'  # 'online' | 'offline' (no network; wandb sync later) | 'disabled'
aim_log = False  # also log to Aim (pip install aim; seed 003)
aim_repo = ''  # Aim repository; '' = out_dir
# data
dataset = 'shakespeare'  # data/<dataset>/prepare.py makes the token files
data_dir = ''  # token files; '' = data/<dataset>/<teacher slug>/, prepared on first use
batch_size = 8  # sequences per micro-step
block_size = 256  # tokens per sequence
gradient_accumulation_steps = 4  # micro-steps per optimizer step, over all ranks together (torchrun)
total_batch_size = 0  # tokens per optimizer step; 0 = the three above multiplied, else it sets gradient_accumulation_steps
curriculum = 0.0  # example data: for this share of training draw the shortest examples first (seeds 001/002); 0 = off
# teacher
teacher = 'smollm2-135m-instruct'  # embedded name | local model dir | path/to/model.gguf | hub id
teacher_quantization = 'none'  # 'none' | '4bit' | '8bit' (bitsandbytes, CUDA only)
teacher_device_map = ''  # '' = the teacher on device | 'auto': spread over all visible GPUs (too large for one; no torchrun)
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
kd_warmup_frac = 0.0  # > 0: kd_weight ramps linearly from kd_weight_start over this share of training (seed 004: 20%)
kd_weight_start = 0.1  # the KD weight at step 0 of the warmup (seed 004: 0.1 -> 0.7)
temperature = 2.0  # softens both distributions in the KD term
temperature_start = 0.0  # > 0: the temperature falls linearly from this to temperature_end over training (seed 003)
temperature_end = 1.0
label_smoothing = 0.0  # for the CE part (seed 002 used 0.1)
logit_clamp = 0.0  # > 0: the student's logits are bounded to (-c, c) by c * tanh(logits / c) (seed 002 used 30)
loss_chunk_tokens = 1024  # tokens per pass through the vocabulary-wide heads (bounds the loss's memory)
kd_loss = 'forward_kl'  # the divergence: 'forward_kl' | 'reverse_kl' | 'jsd' | 'tvd' | 'skew_kl' (losses.py)
jsd_beta = 0.5  # jsd: the teacher's weight in the mixture; 0 is forward KL, 1 reverse KL (GKD)
skew_alpha = 0.1  # skew_kl: KL(teacher || alpha teacher + (1 - alpha) student) (DistiLLM)
kd_top_k = 0  # > 0: the divergence on the union of the teacher's and the student's top-k tokens only (seed 002)
# matching the teacher's insides (seed 003), on student blocks mapped to teacher layers
feature_weight = 0.0  # > 0: + feature_weight x the feature loss (learned projections to the teacher's width)
feature_loss = 'mse'  # 'mse' (on RMS-normalized teacher features) | 'cosine'
attention_weight = 0.0  # > 0: + attention_weight x KL(teacher attention || student attention), GQA-aware
layer_map = []  # [[student block, teacher layer], ...]; [] = evenly spaced, the last block on the last layer
# a student with its own tokenizer (seed 002)
student_tokenizer = ''  # '' = the teacher's | 'bpe8192': a byte-level BPE of 8,192 tokens trained by data prep
# optimizer
optimizer = 'adamw'  # 'adamw' (torch) | 'adamw8bit' (bitsandbytes, CPU and CUDA)
learning_rate = 1e-3  # peak learning rate
max_iters = 200  # optimizer steps
weight_decay = 0.1  # on matrices and embeddings only
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global grad norm to this; 0 = off
lr_multipliers = {}  # {parameter-name pattern (fnmatch): LR multiplier}, e.g. {'blocks.0.*': 0.5}; the rest get 1
ema_decay = 0.0  # > 0: keep an EMA of the weights (e.g. 0.999), evaluated beside them and saved (seed 002)
max_skipped_steps = 10  # optimizer steps in a row skipped for a non-finite loss or gradient before the run stops
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 20
lr_decay_iters = 0  # the length of every schedule (LR, KD warmup, temperature); 0 = max_iters
min_lr = 1e-4
# early stopping on held-out student CE (seed 001)
patience = 0  # evaluations without improvement before stopping; 0 = never stop early
min_delta = 0.0  # an improvement smaller than this does not count
# system
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = 'auto'  # 'auto' (CPU: bf16 if measured faster, else float32; GPU: bf16, else float16) | 'bfloat16' | 'float16' | 'float32'
compile = False  # torch.compile the student (needs a C/C++ compiler on CPU; compiles for a minute first)
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and type(v) in (int, float, bool, str, dict, list)]
globals().update(configure({k: globals()[k] for k in config_keys}, sys.argv[1:]))
config = {k: globals()[k] for k in config_keys}

# ---- check the settings before doing anything slow --------------------------
def fail(msg):
    raise SystemExit(f"indra: {msg}")

device = pick_device(device)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
# torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. Every rank draws the whole global batch order from the same
# generator and loads only its share of the micro-steps, so N ranks train on exactly the batches of one process.
ddp = 'RANK' in os.environ
rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
master = rank == 0  # the one rank that prints, logs and writes checkpoints
if ddp:
    if device_type == 'cuda':
        device = f'cuda:{local_rank}'  # one GPU per rank
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    if not master:
        sys.stdout = open(os.devnull, 'w')  # errors still reach stderr
    if teacher_device_map:
        fail("--teacher_device_map=auto spreads one teacher over every GPU, so it cannot run once per rank; "
             "build the targets cache with it in one process (python teacher.py --cache --device_map=auto), "
             "then train on N ranks with --teacher_targets=cache")
if dtype not in DTYPES:
    fail(f"--dtype={dtype!r}: choose auto (measured), bfloat16, float16 or float32")
if dtype == 'float16' and device_type == 'cpu':
    fail("--dtype=float16 is for CUDA (CPU autocast runs bfloat16); on CPU use --dtype=auto, bfloat16 or float32")
if init_from not in ('scratch', 'resume'):
    fail(f"--init_from={init_from!r}: choose scratch or resume")
if teacher_targets not in ('live', 'cache'):
    fail(f"--teacher_targets={teacher_targets!r}: choose live or cache")
if optimizer not in ('adamw', 'adamw8bit'):
    fail(f"--optimizer={optimizer!r}: choose adamw or adamw8bit")
for name in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'max_iters', 'eval_interval',
             'eval_iters', 'log_interval', 'max_skipped_steps'):
    if config[name] <= 0:
        fail(f"--{name}={config[name]} must be a positive integer")
if total_batch_size:  # stated in tokens (STYLE 6): the accumulation follows from it
    if total_batch_size < 0 or total_batch_size % (batch_size * block_size):
        fail(f"--total_batch_size={total_batch_size} must be a positive multiple of batch_size x block_size = "
             f"{batch_size * block_size} tokens, e.g. {4 * batch_size * block_size}")
    gradient_accumulation_steps = config['gradient_accumulation_steps'] = total_batch_size // (batch_size * block_size)
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} is shared among {world_size} ranks, so it must be "
         f"a multiple of {world_size}; use "
         f"--gradient_accumulation_steps={world_size * -(-gradient_accumulation_steps // world_size)}")
micro_steps = gradient_accumulation_steps // world_size  # per rank and optimizer step
schedule_iters = lr_decay_iters or max_iters  # the length of every schedule: LR, KD warmup, temperature, curriculum
if learning_rate <= 0 or min_lr < 0 or min_lr > learning_rate:
    fail(f"learning_rate={learning_rate} must be > 0 and min_lr={min_lr} in [0, learning_rate]")
for name in ('kd_weight', 'kd_weight_start', 'kd_warmup_frac', 'label_smoothing'):
    if not 0.0 <= config[name] <= 1.0:
        fail(f"--{name}={config[name]} must be in [0, 1]")
if temperature <= 0 or temperature_start < 0 or (temperature_start and temperature_end <= 0):
    fail(f"temperatures must be > 0: temperature={temperature}, temperature_start={temperature_start} (0 = off), "
         f"temperature_end={temperature_end}")
if teacher_targets == 'cache' and temperature_start:
    fail("the teacher-targets cache holds the teacher at one temperature; a temperature schedule "
         "(--temperature_start) needs --teacher_targets=live")
if not 0.0 <= ema_decay < 1.0:
    fail(f"--ema_decay={ema_decay} must be in [0, 1) (0 = no EMA; 0.999 is typical)")
if logit_clamp < 0:
    fail(f"--logit_clamp={logit_clamp} must be >= 0 (0 = off; seed 002 used 30)")
for pattern, mult in lr_multipliers.items():
    if not isinstance(pattern, str) or type(mult) not in (int, float) or mult < 0:
        fail(f"lr_multipliers maps name patterns to multipliers >= 0, e.g. {{'blocks.0.*': 0.5}}; "
             f"got {pattern!r}: {mult!r}")
try:  # the loss checks its own settings (kd_loss, jsd_beta, skew_alpha, kd_top_k): made now, before anything slow
    criterion = DistillationLoss(kd_weight, temperature, label_smoothing, loss_chunk_tokens, logit_clamp, kd_loss,
                                 jsd_beta, skew_alpha, kd_top_k)
except ValueError as e:
    fail(f"--{e}")
if teacher_targets == 'cache' and (kd_loss != 'forward_kl' or kd_top_k or feature_weight or attention_weight):
    fail("the teacher-targets cache holds top-k log-probs, enough for forward KL on the full vocabulary only; "
         "--kd_loss, --kd_top_k, --feature_weight and --attention_weight need --teacher_targets=live")
if feature_weight < 0 or attention_weight < 0:
    fail(f"--feature_weight={feature_weight} and --attention_weight={attention_weight} must be >= 0 (0 = off)")
if feature_loss not in ('mse', 'cosine'):
    fail(f"--feature_loss={feature_loss!r}: choose mse or cosine")
own_vocab = int(student_tokenizer[3:]) if re.fullmatch(r'bpe\d+', student_tokenizer) else 0
if student_tokenizer and not own_vocab:
    fail(f"--student_tokenizer={student_tokenizer!r}: use '' (the teacher's) or 'bpe<N>', e.g. bpe8192")
if own_vocab and (feature_weight or attention_weight or teacher_targets == 'cache'):
    fail("a student with its own tokenizer sees other tokens than the teacher: feature and attention matching "
         "and the teacher-targets cache need the teacher's tokens; set --feature_weight=0 --attention_weight=0 "
         "--teacher_targets=live, or --student_tokenizer=''")
if wandb_log:  # optional loggers: checked now, before anything slow
    require('wandb', 'wandb_log')
if aim_log:
    require('aim', 'aim_log')
out_path = Path(out_dir)
if init_from == 'scratch' and (out_path / 'ckpt.pt').exists() and not overwrite:
    fail(f"{out_path / 'ckpt.pt'} exists; continue it with --init_from=resume, "
         f"or start over with another --out_dir or --overwrite=True")
if init_from == 'resume' and not (out_path / 'ckpt.pt').exists():
    fail(f"--init_from=resume but {out_path / 'ckpt.pt'} does not exist; train from scratch first")
checkpoint = load_checkpoint(out_path / 'ckpt.pt') if init_from == 'resume' else None  # readable? fail now, not later

torch.manual_seed(seed)
random.seed(seed)
np.random.seed(seed)
# The dtype is chosen once per run: rank 0 measures (a probe on the student's shapes; on CUDA, bf16 support),
# every rank takes its choice, and the checkpoint keeps it, so a resumed run computes exactly as before.
choice = list(choose_dtype(dtype, device, n_embd, saved=checkpoint and checkpoint['config']['dtype'])) if master \
    else [None, None]
if ddp:
    dist.broadcast_object_list(choice, src=0)
dtype, dtype_line = choice
config['dtype'] = dtype  # the resolved dtype goes into config.json and every checkpoint
print(dtype_line)
ptdtype = getattr(torch, dtype)  # torch.float32 | torch.bfloat16 | torch.float16
autocast = autocast_for(device, dtype)
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
print(f"tokens per optimizer step: {tokens_per_iter:,} = {gradient_accumulation_steps} accumulation "
      f"x {batch_size} sequences x {block_size} tokens; device {device}, {dtype}"
      + (f"; {world_size} ranks ({dist.get_backend()}), {micro_steps} micro-steps each" if ddp else ""))
if device_type == 'cpu':
    print(keep_freed_memory())

# ---- teacher and data --------------------------------------------------------
if not master:
    dist.barrier()  # rank 0 fetches, converts and prepares first; the others then find everything done
t0 = time.time()
print(f"loading teacher {teacher} ({dtype}, {device})")
teacher_model, tokenizer, tokenizer_enc = load_teacher(teacher, dtype=ptdtype, device=device,
                                                       quantization=teacher_quantization, device_map=teacher_device_map)
teacher_vocab = teacher_model.get_output_embeddings().weight.shape[0]  # the logit width, may exceed len(tokenizer)
print(f"teacher {teacher}: {sum(p.numel() for p in teacher_model.parameters()) / 1e6:.1f}M parameters, "
      f"{teacher_vocab} logits, loaded in {time.time() - t0:.1f}s")
check_linear_head(teacher_model, len(tokenizer))
teacher_head = teacher_model.get_output_embeddings().weight.to(device)  # (V', C_teacher); a copy if device-mapped

data_path = Path(data_dir) if data_dir else ROOT / 'data' / dataset / teacher_slug(teacher)
student_path = data_path / f'student-bpe{own_vocab}' if own_vocab else None  # the student's own token files
if not all((p / 'meta.json').exists() for p in (data_path, student_path) if p):
    prepare_py = ROOT / 'data' / dataset / 'prepare.py'
    if not prepare_py.exists():
        fail(f"no token files in {data_path} and no {prepare_py.relative_to(ROOT)} to make them; check --dataset")
    print(f"preparing {dataset} for {teacher} into {data_path}")
    spec = importlib.util.spec_from_file_location(f'prepare_{dataset}', prepare_py)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    if own_vocab and 'student_vocab' not in inspect.signature(prepare.prepare).parameters:
        fail(f"{prepare_py.relative_to(ROOT)} cannot make a student tokenizer; use --student_tokenizer='' "
             f"or --dataset=shakespeare")
    takes = inspect.signature(prepare.prepare).parameters
    prepare.prepare(teacher, data_path, **({'student_vocab': own_vocab} if own_vocab else {}),
                    **({'dtype': dtype} if 'dtype' in takes else {}))  # recorded teacher answers: in this run's dtype
if ddp and master:
    dist.barrier()
meta = json.loads((data_path / 'meta.json').read_text())
if meta['tokenizer_hash'] != tokenizer_hash(tokenizer):
    fail(f"token files in {data_path} were made for tokenizer {meta['tokenizer_hash']} ({meta['teacher']}), "
         f"not this teacher's ({tokenizer_hash(tokenizer)}); run python data/{dataset}/prepare.py --teacher={teacher} "
         f"--out_dir=<new dir> and pass --data_dir=<new dir>")
examples = meta.get('format') == 'examples'  # instruction data: one example per row, padded, loss on the answer
made_in = meta.get('teacher_dtype', 'bfloat16' if examples else None)  # agent data before it was recorded: bf16
if made_in and made_in != dtype:
    fail(f"{data_path} holds the teacher's answers generated in {made_in}, and this run computes in {dtype}: "
         f"pass --dtype={made_in}, or make the data again in {dtype} with its prepare.py (--dtype={dtype} "
         f"--out_dir=<new dir>) and pass --data_dir=<new dir>")
for split in ('train', 'val'):
    n = np.memmap(data_path / f'{split}.bin', dtype=meta['dtype'], mode='r').shape[0]
    if n <= block_size and not examples:
        fail(f"{split}.bin in {data_path} has {n} tokens, fewer than one block of {block_size + 1}; lower --block_size")
if curriculum and not examples:
    fail(f"--curriculum orders examples by length, and {data_path} is one stream of text; use example data "
         f"(meta.json format 'examples') or --curriculum=0")
if examples and teacher_targets == 'cache':
    fail("the teacher-targets cache covers streams of text, not padded examples; use --teacher_targets=live")
if examples and own_vocab:
    fail("a student with its own tokenizer trains on streams of text, not on example data; use --student_tokenizer=''")
student_tok, aligned = None, {}  # own vocabulary: the student's tokenizer; per split, both streams and their alignment
if own_vocab:
    from tokenizers import Tokenizer
    student_tok = Tokenizer.from_file(str(student_path / 'tokenizer.json'))
    student_meta = json.loads((student_path / 'meta.json').read_text())
    if student_meta['teacher_tokenizer_hash'] != meta['tokenizer_hash']:
        fail(f"{student_path} was made beside other teacher token files; delete it to prepare it again")
    s_len, t_len = vocab.token_lengths(student_tok), vocab.token_lengths(tokenizer)
    for split in ('train', 'val'):
        s_ids = np.fromfile(student_path / f'{split}.bin', dtype=student_meta['dtype'])
        t_ids = np.fromfile(data_path / f'{split}.bin', dtype=meta['dtype'])
        s_ends, t_ends = vocab.ends(s_ids, s_len), vocab.ends(t_ids, t_len)
        aligned[split] = (s_ids, t_ids, s_ends, t_ends, vocab.window_starts(s_ends, t_ends, block_size))
        if not len(aligned[split][-1]):
            fail(f"{split}: no window of {block_size} student tokens in {student_path}; lower --block_size")
    share = (vocab.align(aligned['train'][3], aligned['train'][2]) >= 0).mean()
    print(f"student tokenizer: byte-level BPE of {student_meta['vocab_size']:,} tokens ({student_path}); "
          f"{share:.1%} of its training positions end where a teacher token ends and get a KD target")
by_length = {}  # example data: example numbers, shortest first (the curriculum draws from the front)
for split in ('train', 'val') if examples else ():
    for name in (f'{split}.idx', f'{split}.mask.bin'):
        if not (data_path / name).is_file():
            fail(f"{data_path} holds example data (meta.json format 'examples') but no {name}; prepare it again")
    spans = np.fromfile(data_path / f'{split}.idx', dtype=np.int64).reshape(-1, 2)  # (N, 2): start, length
    if len(spans) == 0:
        fail(f"{data_path / (split + '.idx')} lists no examples; prepare the data again")
    by_length[split] = (spans, np.argsort(spans[:, 1], kind='stable'))

cache = None
if teacher_targets == 'cache':  # the teacher's targets were computed once for aligned blocks of train.bin
    cache_path = build_targets(teacher, data_path, targets_top_k, temperature, block_size, device=device, dtype=ptdtype,
                               loaded=(teacher_model, tokenizer))
    cache = json.loads((cache_path / 'meta.json').read_text())
    cache['path'] = cache_path
    print(f"training on cached teacher targets: {cache['blocks']} blocks, top {targets_top_k} at T={temperature:g}")


def curriculum_pool(it):
    """How many of the shortest training examples step `it` draws from. Seeds 001/002: short examples first;
    for the first `curriculum` share of training the pool grows linearly from the shortest 10% to all."""
    n = len(by_length['train'][0])
    progress = it / (curriculum * schedule_iters) if curriculum else 1.0
    return n if progress >= 1 else max(1, math.ceil(n * (0.1 + 0.9 * progress)))


def get_example_batch(split, generator, it, load):
    """batch_size examples, right-padded with eos to the longest (at most block_size): ids (B, L), attention
    mask (B, L) 1 on real tokens, loss mask (B, L) 1 on the tokens to learn (the answer)."""
    spans, order = by_length[split]
    pool = curriculum_pool(it) if split == 'train' else len(order)
    picks = order[torch.randint(pool, (batch_size,), generator=generator).numpy()]
    if not load:
        return None
    data = np.memmap(data_path / f'{split}.bin', dtype=meta['dtype'], mode='r')
    mask = np.memmap(data_path / f'{split}.mask.bin', dtype=np.uint8, mode='r')
    x, am, lm = pad_examples(data, mask, spans[picks].tolist(), block_size, meta['eos_id'])
    return x.to(device), am.to(device), lm.to(device), None


def get_batch(split, generator, it=0, load=True):
    """(ids (B, T), attention mask, loss mask, cached teacher targets): batch_size windows of block_size tokens
    of a text stream (all real tokens: no masks; the targets when training on the cache, else None), or padded
    examples (get_example_batch). The loss shifts by one inside. load=False draws the batch from generator
    without reading it (another rank's share) and returns None. A student with its own tokenizer gets windows
    of its tokens and, in the last place, the teacher's tokens of the same text with the alignment (vocab.py)."""
    if examples:
        return get_example_batch(split, generator, it, load)
    if own_vocab:
        s_ids, t_ids, s_ends, t_ends, starts = aligned[split]
        ix = torch.randint(len(starts), (batch_size,), generator=generator)
        if not load:
            return None
        # the teacher needs about as many tokens as the student for the same text; a few more leave room
        x, tx, tmask, pos = vocab.aligned_batch(s_ids, t_ids, s_ends, t_ends, starts[ix.numpy()], block_size,
                                                block_size + block_size // 4, meta['eos_id'])
        return x.to(device), None, None, (tx.to(device), tmask.to(device), pos.to(device))
    data = np.memmap(data_path / f'{split}.bin', dtype=meta['dtype'], mode='r')  # re-opened: np.memmap leaks otherwise
    if split == 'train' and cache is not None:  # the cache holds whole aligned blocks
        ix = torch.randint(cache['blocks'], (batch_size,), generator=generator) * block_size
    else:
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    if not load:
        return None
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()]).to(device)
    if split != 'train' or cache is None:
        return x, None, None, None
    shape = (cache['blocks'] * block_size, targets_top_k)
    ids = np.memmap(cache['path'] / 'ids.bin', dtype=cache['ids_dtype'], mode='r', shape=shape)
    logp = np.memmap(cache['path'] / 'logp.bin', dtype=np.float16, mode='r', shape=shape)
    rows = lambda a: torch.stack([torch.from_numpy(a[i:i + block_size].astype(np.int64 if a is ids else np.float32))
                                  for i in ix.tolist()]).to(device)
    return x, None, None, Teacher(ids=rows(ids), logp=rows(logp))  # (B, T, k) each


# ---- student, optimizer, resume ---------------------------------------------
model_args = dict(vocab_size=student_meta['vocab_size'] if own_vocab else teacher_vocab, block_size=block_size,
                  n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                  dropout=dropout, attn_impl=attn_impl, gradient_checkpointing=gradient_checkpointing,
                  logit_clamp=logit_clamp)
if checkpoint is not None:
    shape_keys = ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_embd')
    differ = [k for k in shape_keys if checkpoint['model_args'][k] != model_args[k]]
    if differ:
        fail(f"{out_path / 'ckpt.pt'} holds a student with " + ", ".join(
            f"{k}={checkpoint['model_args'][k]}" for k in differ) + " but this run asks for " + ", ".join(
            f"{k}={model_args[k]}" for k in differ) + "; resume with the checkpoint's settings")
model = Indra(IndraConfig(**model_args)).to(device)
print(model.param_report())

# Trained beside the student, thrown away after: projections to the teacher's width for feature matching, the
# projector that gives a student with its own tokenizer the teacher's predictions in its vocabulary.
aux = torch.nn.ModuleDict()
tc = teacher_model.config
pairs, s_layers, t_layers, s_att, t_att = [], (), (), (), ()  # mapped student blocks and teacher layers
if feature_weight or attention_weight:
    try:
        pairs = map_layers(n_layer, tc.num_hidden_layers, layer_map or None)
        if attention_weight:
            head_groups(n_head, tc.num_attention_heads, tc.num_key_value_heads)
            if any(t == 0 for _, t in pairs):
                raise ValueError(f"layer_map {layer_map}: teacher layer 0 is the embeddings, which have no attention")
    except ValueError as e:
        fail(str(e))
    print(f"matching student blocks to teacher layers {pairs}: "
          + ', '.join(f"{name} x{w:g}" for name, w in (('features', feature_weight), ('attention', attention_weight)) if w))
if feature_weight:
    aux['features'] = FeatureMatcher(pairs, n_embd, tc.hidden_size, feature_loss)
    s_layers, t_layers = tuple(s for s, _ in pairs), tuple(t for _, t in pairs)
if attention_weight:
    s_att, t_att = tuple(s for s, _ in pairs), tuple(t for _, t in pairs)
if own_vocab:
    aux['projector'] = vocab.Projector(tc.hidden_size, n_embd)
aux.to(device)


def param_groups():
    """One group per (LR multiplier, weight decay): decay on matrices and embeddings, none on norm gains;
    lr_multipliers scale the LR of the parameters whose names match a pattern (seed 004 gave a projector 5x)."""
    # the tied head is the embedding: listed once, as wte.weight; then features.*, projector.*
    named = list(model.named_parameters()) + list(aux.named_parameters())
    for pattern in lr_multipliers:
        if not any(fnmatch(name, pattern) for name, _ in named):
            fail(f"lr_multipliers pattern {pattern!r} matches no parameter; names look like "
                 f"{', '.join(name for name, _ in named[:4])}")
    groups = {}
    for name, p in named:
        hits = [pattern for pattern in lr_multipliers if fnmatch(name, pattern)]
        if len(hits) > 1:
            fail(f"parameter {name} matches lr_multipliers patterns {hits[0]!r} and {hits[1]!r}; make them disjoint")
        mult = float(lr_multipliers[hits[0]]) if hits else 1.0
        group = groups.setdefault((mult, p.dim() >= 2), {'params': [], 'names': [], 'lr_mult': mult,
                                                         'weight_decay': weight_decay if p.dim() >= 2 else 0.0})
        group['params'].append(p)
        group['names'].append(name)
    assert sum(len(g['params']) for g in groups.values()) == len(named)  # every parameter in exactly one group
    for g in groups.values():
        print(f"optimizer group: lr x{g['lr_mult']:g}, weight decay {g['weight_decay']:g}: {len(g['params'])} tensors, "
              f"{sum(p.numel() for p in g['params']) / 1e6:.2f}M parameters ({', '.join(g.pop('names')[:3])}, ...)")
    return list(groups.values())


groups = param_groups()
if optimizer == 'adamw8bit':
    import bitsandbytes as bnb  # 8-bit states (seed 000); bitsandbytes >= 0.45 runs them on CPU too
    opt = bnb.optim.AdamW8bit(groups, lr=learning_rate, betas=(beta1, beta2))
else:
    opt = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')  # bf16 has fp32's range: no scaling needed
data_gen = torch.Generator().manual_seed(seed)  # the training batch order, saved for exact resume

ema = EMA(model, ema_decay) if ema_decay else None

iter_num, best_val, bad_evals, skipped_total, evaluated = 0, float('inf'), 0, 0, False
if checkpoint is not None:
    model.load_state_dict(checkpoint['model'])
    saved_aux = checkpoint.get('aux', {})
    if set(saved_aux) != set(aux.state_dict()):
        fail(f"{out_path / 'ckpt.pt'} was trained with {sorted({k.split('.')[0] for k in saved_aux}) or 'no'} "
             f"auxiliary modules, this run asks for {sorted(aux.keys()) or 'none'}; resume with the checkpoint's "
             f"feature_weight and student_tokenizer")
    aux.load_state_dict(saved_aux)
    opt.load_state_dict(checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    if ema is not None:
        if checkpoint.get('ema') is None:
            fail(f"{out_path / 'ckpt.pt'} has no EMA (it was trained with ema_decay=0); resume with --ema_decay=0")
        try:
            ema.load_state_dict(checkpoint['ema'], out_path / 'ckpt.pt')
        except ValueError as e:
            fail(str(e))
    iter_num, best_val, bad_evals = checkpoint['iter_num'], checkpoint['best_val'], checkpoint['bad_evals']
    skipped_total, evaluated = checkpoint['skipped_total'], checkpoint['evaluated']
    rng = checkpoint['rng']
    data_gen.set_state(rng['data'])
    torch.set_rng_state(rng['torch'])
    if device_type == 'cuda' and 'cuda' in rng:
        torch.cuda.set_rng_state_all(rng['cuda'])
    random.setstate((rng['python'][0], tuple(rng['python'][1]), rng['python'][2]))
    np.random.set_state(('MT19937', rng['numpy'].numpy(), *rng['numpy_pos']))
    print(f"resumed from {out_path / 'ckpt.pt'} at step {iter_num} (best val CE {best_val:.4f})")
    checkpoint = None  # free it

eval_kl = DistillationLoss(kd_weight=1.0, temperature=1.0, chunk_tokens=loss_chunk_tokens, logit_clamp=logit_clamp)
eval_ce = DistillationLoss(kd_weight=0.0, chunk_tokens=loss_chunk_tokens)  # for the teacher and the projector: no clamp


class HiddenStates(torch.nn.Module):
    """The student up to its final hidden states: (B, T) ids -> (B, T, C); the loss applies the tied head itself.
    A module of its own because DDP synchronizes gradients through a module's forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, attention_mask=None, layers=(), attention_layers=()):
        return self.model.hidden_states(idx, attention_mask, layers, attention_layers)


hidden_states = HiddenStates(model)
if compile:
    try:  # compile now, on a real batch, so that the first timed step is not the compilation
        hidden_states = torch.compile(HiddenStates(model))
        with torch.random.fork_rng(), autocast:  # leaves the RNG as it was (dropout draws from it)
            x, am, _, _ = get_batch('val', torch.Generator().manual_seed(0))
            hidden_states(x, am).sum().backward()
        model.zero_grad(set_to_none=True)
    except Exception as e:  # no C++ compiler, an unsupported platform: say so and run eager
        print(f"indra: torch.compile is unavailable here ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
              f"running the student uncompiled")
        hidden_states = HiddenStates(model)
# training runs through DDP, which averages the gradients over the ranks in backward; evaluation does not need it
train_hidden = DDP(hidden_states, broadcast_buffers=False) if ddp else hidden_states


def get_lr(it):
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= schedule_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, schedule_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def get_kd_weight(it):
    """Seed 004: a KD term at full weight from step 0 drowned the run (KL 9.4 from a random projector);
    ramping it in from kd_weight_start lets the student and any projector settle first."""
    ramp = kd_warmup_frac * schedule_iters
    return kd_weight if it >= ramp else kd_weight_start + (kd_weight - kd_weight_start) * it / ramp


def get_temperature(it):
    """Seed 003's dynamic temperature: soft targets early (more of the teacher's dark knowledge), sharp late."""
    if not temperature_start:
        return temperature
    return temperature_start + (temperature_end - temperature_start) * min(1.0, it / schedule_iters)


def run_teacher(x, attention_mask=None):
    """The teacher on a batch of its tokens: a Teacher for the loss, and the hidden states and attention of the
    layers mapped for matching ({} when nothing is matched)."""
    with torch.no_grad(), autocast:
        if not (t_layers or t_att):
            return Teacher(hidden=teacher_hidden(teacher_model, x, attention_mask).to(device), head=teacher_head), {}
        last, inside = teacher_internals(teacher_model, x, attention_mask, t_layers, t_att)
        return Teacher(hidden=last.to(device), head=teacher_head), inside


def aligned_teacher(tx, tmask, pos):
    """A student with its own tokenizer: the teacher's final hidden state on its tokens tx of the same text, taken
    at the positions aligned with the student's (B, T, Ct), and where there is one (B, T) bool."""
    with torch.no_grad(), autocast:
        h = teacher_hidden(teacher_model, tx, tmask).to(device)  # (B, Lt, Ct)
    return h.gather(1, pos.clamp(min=0)[..., None].expand(-1, -1, h.size(-1))), pos >= 0


def through_projector(h, has, x):
    """The projector's view of the aligned teacher states h: a Teacher for the KD term (its logits over the
    student's vocabulary through the student's head, all under a stop-gradient) and the projector's own loss,
    CE on the student's next tokens where the teacher has a state (this trains it; a projector trained by the
    KD term would just learn to agree with the student)."""
    head = model.lm_head.weight.detach()
    with autocast:
        p = aux['projector'](h)  # (B, T, C)
        targets = torch.cat([torch.zeros_like(has[:, :1]), has[:, :-1]], dim=1)  # loss masks mark the token predicted
        p_ce = eval_ce(p, head, x, None, targets)[0]
    return Teacher(hidden=p.detach(), head=head, mask=has), p_ce


def micro_step_loss(x, am, lm, t):
    """The loss of one micro-batch, to backprop, and its parts, detached, for the log: 'ce', 'kl' (the
    divergence kd_loss), and when switched on 'feature', 'attention' and 'projector_ce' (the projector's CE)."""
    inside, parts = {}, {}
    if own_vocab:
        t, p_ce = through_projector(*aligned_teacher(*t), x)
        parts['projector_ce'] = p_ce.detach()
    elif t is None and (criterion.kd_weight > 0 or pairs):
        t, inside = run_teacher(x, am)
    with autocast:
        if pairs:
            h, mine = train_hidden(x, am, s_layers, s_att)
        else:
            h = train_hidden(x, am)
        loss, parts['ce'], parts['kl'] = criterion(h, model.lm_head.weight, x, am, lm, teacher=t)
        if own_vocab:
            loss = loss + p_ce
        if feature_weight:
            parts['feature'] = aux['features'](mine['hidden'], inside['hidden'], am)
            loss = loss + feature_weight * parts['feature']
        if attention_weight:
            parts['attention'] = attention_loss(mine['attention'], inside['attention'], pairs, am, tc.num_key_value_heads)
            loss = loss + attention_weight * parts['attention']
    return loss, {k: v.detach().float().item() for k, v in parts.items()}


def all_sum(t):
    """A CPU tensor summed over all ranks (itself in a single process); NCCL reduces on the GPU only."""
    if not ddp:
        return t
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


held_out = None  # (batches with the teacher's targets, teacher CE): made at the first evaluation, then reused


@torch.no_grad()
def held_out_batches():
    """eval_iters fixed held-out batches, each with the teacher's final hidden states, and the teacher's CE on them.
    The batches are the same at every evaluation and the teacher is frozen, so its forward runs once per run
    (a few MB of hidden states), not at every evaluation and again for the EMA weights.
    Under torchrun each rank keeps every world_size-th batch; the sums are then taken over all ranks."""
    global held_out
    if held_out is None:
        print(f"held-out set: {eval_iters} batches of {batch_size} x {block_size}; the teacher runs on them once, now")
        gen = torch.Generator().manual_seed(seed + 1)
        batches, t_ce = [], torch.zeros(())
        for i in range(eval_iters):
            batch = get_batch('val', gen, load=i % world_size == rank)
            if batch is None:
                continue
            x, am, lm, t = batch
            if own_vocab:  # the teacher's aligned states; their CE depends on the projector, so evaluate() takes it
                batches.append((x, am, lm, aligned_teacher(*t)))
                continue
            t = run_teacher(x, am)[0]
            with autocast:
                t_ce += eval_ce(t.hidden, t.head[:model.config.vocab_size], x, am, lm)[1].float().cpu()
            batches.append((x, am, lm, t))
        held_out = batches, (all_sum(t_ce) / eval_iters).item()
    return held_out


@torch.no_grad()
def evaluate():
    """Student CE and KL(teacher || student) at T=1 on the held-out batches, beside the teacher's CE. A student
    with its own tokenizer: KL from the projected teacher, and the projected teacher's CE on the student's tokens."""
    batches, t_ce = held_out_batches()
    model.eval()
    totals = torch.zeros(3)
    for x, am, lm, t in batches:
        if own_vocab:
            t, p_ce = through_projector(*t, x)
            totals[2] += p_ce.float().cpu()
        with autocast:
            _, ce, kl = eval_kl(hidden_states(x, am), model.lm_head.weight, x, am, lm, teacher=t)
        totals[:2] += torch.stack([ce.float().cpu(), kl.float().cpu()])
    model.train()
    ce, kl, p_ce = (all_sum(totals) / eval_iters).tolist()
    t_ce = p_ce if own_vocab else t_ce
    return {'val_ce': ce, 'val_ppl': math.exp(ce), 'val_kl': kl, 'teacher_val_ce': t_ce, 'teacher_val_ppl': math.exp(t_ce)}


# Fixed prompts for the mode-collapse watch: seed 001's test questions for chat data, a line of verse otherwise.
WATCH_PROMPTS = {'chat': ['If a store has 15 apples and sells 7, how many are left?', 'What is 25 + 17?',
                          'The capital of France is Paris. What is the capital of France?'],
                 'text': ['ROMEO:\nBut soft, what light through yonder window breaks?\n']}


@torch.no_grad()
def watch():
    """Sample watch_tokens from each fixed prompt (a fixed seed, temperature 1, no filtering: the distribution
    as it is) and measure the repetition in what came out. Seed 001's collapsed runs answered every question
    with colons or 'did did did'; this is the check it ran by hand, at every evaluation."""
    chat = meta.get('chat', False)
    results = []
    model.eval()
    gpus = [torch.device(device).index or torch.cuda.current_device()] if device_type == 'cuda' else []
    with torch.random.fork_rng(devices=gpus):  # training's RNG is untouched
        torch.manual_seed(seed)
        for prompt in WATCH_PROMPTS['chat' if chat else 'text']:
            text = chat_prompt(tokenizer, prompt) if chat else prompt
            ids = student_tok.encode(text).ids if own_vocab else encode(tokenizer_enc, tokenizer, text)
            ids = ids[-(block_size // 2):]
            with autocast:
                out = model.generate(torch.tensor([ids], device=device), watch_tokens, temperature=1.0)
            new = out[0, len(ids):].tolist()
            sample = (student_tok if own_vocab else tokenizer).decode(new)
            results.append({'prompt': prompt, 'sample': sample, **repetition(new)})
    model.train()
    return results


def save(path, evaluated):
    """Write atomically: a reader (or a crash) never sees half a checkpoint. evaluated: whether the evaluation
    at iter_num is done (a resume then skips it). Only rank 0 writes: every rank holds the same weights, and
    the batch order is global, so the checkpoint resumes on any number of ranks."""
    if not master:
        return
    numpy_state = np.random.get_state()
    rng = {'data': data_gen.get_state(), 'torch': torch.get_rng_state(),
           'python': list(random.getstate()), 'numpy': torch.from_numpy(numpy_state[1].copy()),
           'numpy_pos': list(numpy_state[2:])}
    if device_type == 'cuda':
        rng['cuda'] = torch.cuda.get_rng_state_all()
    state = {'model': model.state_dict(), 'aux': aux.state_dict(), 'optimizer': opt.state_dict(),
             'scaler': scaler.state_dict(), 'ema': None if ema is None else ema.state_dict(), 'model_args': model_args,
             'config': config, 'iter_num': iter_num, 'evaluated': evaluated, 'best_val': best_val,
             'bad_evals': bad_evals, 'skipped_total': skipped_total, 'rng': rng,
             'tokenizer_hash': tokenizer_hash(tokenizer),  # the teacher's; a student with its own keeps it whole:
             'student_tokenizer': student_tok.to_str() if own_vocab else None,  # sample.py and eval.py need no data
             'eos_id': student_meta['eos_id'] if own_vocab else meta['eos_id']}
    tmp = path.with_suffix('.tmp')
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power cut only once the directory is synced
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def trim_log():
    """On resume, keep only the records the checkpoint has lived through (a run killed after its last checkpoint
    logged steps that will run again) and drop a line cut short by the kill."""
    path = out_path / 'log.jsonl'
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r['iter'] < iter_num or (r['iter'] == iter_num and 'val_ce' in r and evaluated):
            kept.append(line + '\n')
    write_atomic(path, ''.join(kept).encode('utf-8'))


stop_signal = None


def request_stop(signum, frame):
    """SIGINT / SIGTERM: finish the optimizer step, save, exit 0. A second one stops at once, without saving."""
    global stop_signal
    if stop_signal is not None:
        raise KeyboardInterrupt
    stop_signal = signal.Signals(signum).name
    print(f"\n{stop_signal}: finishing this step, then writing {out_path / 'ckpt.pt'} (send it again to stop "
          f"at once, without saving)", flush=True)


# ---- the loop ---------------------------------------------------------------
student_flops = student_flops_per_token(model, block_size)
teacher_flops = teacher_flops_per_token(teacher_model, block_size) if teacher_targets == 'live' else 0
peak = Peak(*peak_flops(device, ptdtype)) if master else Peak(None, 'rank 0 reports MFU')
print(f"FLOPs per token: student {student_flops / 1e6:.1f}M (fwd+bwd) + teacher {teacher_flops / 1e6:.1f}M (fwd); "
      f"MFU against {'%.3f TFLOP/s' % (peak.flops / 1e12) if peak.flops else 'no peak'}: {peak.source}")

records = None  # rank 0 logs
if master:
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / 'config.json').write_text(json.dumps(config, indent=2))
    if init_from == 'scratch':
        (out_path / 'log.jsonl').unlink(missing_ok=True)
        (out_path / 'training.png').unlink(missing_ok=True)
    else:
        trim_log()
    records = Records(out_path, config, resume=init_from == 'resume', wandb_log=wandb_log, wandb_project=wandb_project,
                      wandb_run_name=wandb_run_name, wandb_mode=wandb_mode, aim_log=aim_log, aim_repo=aim_repo)
if plot:
    from plot import draw
signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)
skipped_in_a_row = 0
# the parts of the loss in the log ('kl' is the divergence kd_loss), and what is trained
LOGGED = ['loss', 'ce', 'kl'] + ['projector_ce'] * bool(own_vocab) + ['feature'] * bool(feature_weight) \
    + ['attention'] * bool(attention_weight)
trained = list(model.parameters()) + list(aux.parameters())
model.train()
while True:
    lr = get_lr(iter_num)
    for group in opt.param_groups:
        group['lr'] = lr * group['lr_mult']
    criterion.kd_weight, criterion.temperature = get_kd_weight(iter_num), get_temperature(iter_num)

    if (iter_num % eval_interval == 0 or iter_num == max_iters) and not evaluated:
        stats = evaluate()
        if not math.isfinite(stats['val_ce']):
            fail(f"step {iter_num}: held-out CE is {stats['val_ce']}; the weights are broken, so nothing was saved: "
                 f"{out_path / 'ckpt.pt'} holds the last good state (resume it with a lower --learning_rate)")
        who = 'projected teacher' if own_vocab else 'teacher'  # own tokenizer: the teacher through the projector
        line = (f"step {iter_num}: val CE {stats['val_ce']:.4f} (ppl {stats['val_ppl']:.1f}), KL to {who} "
                f"{stats['val_kl']:.4f}, {who} CE {stats['teacher_val_ce']:.4f} (ppl {stats['teacher_val_ppl']:.1f})")
        if ema is not None:
            with ema.applied(model):
                ema_stats = evaluate()
            stats.update({f'ema_{k}': ema_stats[k] for k in ('val_ce', 'val_kl')})
            line += f"; EMA val CE {stats['ema_val_ce']:.4f}, KL {stats['ema_val_kl']:.4f}"
        improved = stats['val_ce'] < best_val - min_delta
        best_val, bad_evals = (stats['val_ce'], 0) if improved else (best_val, bad_evals + 1)
        if watch_tokens and master:
            samples = watch()
            stats['watch'] = samples
            stats['watch_distinct_2'] = min(r['distinct_2'] for r in samples)
            stats['watch_top_share'] = max(r['top_share'] for r in samples)
        if master:
            records.log({'iter': iter_num, **stats})
        print(line + ('  *best*' if improved else ''), flush=True)
        for r in stats.get('watch', []):
            print(f"  watch: {r['sample'][:100]!r} (distinct-2 {r['distinct_2']:.2f}, top token {r['top_share']:.0%})")
            if collapsed(r):
                print(f"  !!! MODE COLLAPSE? the student answers {r['prompt'][:40]!r} with {r['sample'][:60]!r}: "
                      f"{r['distinct_2']:.0%} distinct bigrams, one token is {r['top_share']:.0%} of it (seed 001). "
                      f"Check the KL in training.png; lower learning_rate or raise kd_weight", flush=True)
        if improved:
            save(out_path / 'best.pt', evaluated=True)
        save(out_path / 'ckpt.pt', evaluated=True)
        if plot and master:
            draw(out_path)
        if patience and bad_evals >= patience:
            print(f"early stop: val CE has not improved by more than {min_delta} for {patience} evaluations")
            break
    if iter_num >= max_iters:
        break

    if device_type == 'cuda':
        torch.cuda.synchronize()
    t_start = time.perf_counter()
    sums = torch.zeros(len(LOGGED) + 1)  # each logged part, then the tokens computed
    longest = 0  # the longest real sequence, on this rank
    for micro_step in range(gradient_accumulation_steps):  # the global batch, drawn alike on every rank
        batch = get_batch('train', data_gen, iter_num, load=micro_step % world_size == rank)
        if batch is None:
            continue  # another rank's micro-step
        # DDP averages the gradients over the ranks at the last micro-step of each rank, not before
        last = micro_step >= gradient_accumulation_steps - world_size
        with nullcontext() if last or not ddp else train_hidden.no_sync():
            loss, parts = micro_step_loss(*batch)
            scaler.scale(loss / micro_steps).backward()  # / micro_steps, then DDP's mean over ranks: / accumulation
        x, am = batch[:2]
        sums += torch.tensor([loss.item()] + [parts[k] for k in LOGGED[1:]] + [x.numel()])
        longest = max(longest, x.shape[1] if am is None else am.sum(1).max().item())
    if ddp:  # the auxiliary modules are outside DDP: average their gradients here
        for p in aux.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world_size
    scaler.unscale_(opt)  # true gradients (a no-op unless float16), for clipping and the logged norm
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, grad_clip if grad_clip > 0 else math.inf).item()
    sums = all_sum(sums)
    logged = dict(zip(LOGGED, (sums[:-1] / gradient_accumulation_steps).tolist()))
    loss, tokens = logged['loss'], sums[-1].item()
    # A non-finite loss or gradient skips the step: the weights, the optimizer and the EMA stay as they were.
    # Never zero a NaN loss and go on (seed 002's clamp-to-zero hid the bug it was meant to fix).
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        scaler.step(opt)
        if ema is not None:
            ema.update(model)
        skipped_in_a_row = 0
    else:
        skipped_total += 1
        skipped_in_a_row += 1
    scaler.update()  # float16: a non-finite gradient lowers the scale, as the scaler would have done itself
    opt.zero_grad(set_to_none=True)
    if device_type == 'cuda':
        torch.cuda.synchronize()
    dt = time.perf_counter() - t_start

    tok_s = tokens / dt  # padded examples: the tokens that were computed
    mfu, raised = peak.mfu((student_flops + (teacher_flops if criterion.kd_weight > 0 else 0)) * tok_s / world_size)
    if raised:
        print(raised)
    mem = memory(device_type)
    record = {'iter': iter_num, **logged, 'kd_weight': criterion.kd_weight,
              'temperature': criterion.temperature, 'lr': lr, 'grad_norm': grad_norm, 'skipped': int(not finite),
              'skipped_total': skipped_total, 'dt': dt, 'samples_per_s': batch_size * gradient_accumulation_steps / dt,
              'tokens_per_s': tok_s, 'mfu': mfu, 'longest': int(longest), **mem}
    if master:
        records.log(record)
    if not finite:
        print(f"iter {iter_num}: SKIPPED, loss {loss}, grad norm {grad_norm}: not finite ({skipped_in_a_row} in a row, "
              f"{skipped_total} in all); weights, optimizer and EMA unchanged", flush=True)
        if skipped_in_a_row >= max_skipped_steps:
            if master:
                records.close()
            fail(f"{skipped_in_a_row} steps in a row (up to step {iter_num}) had a non-finite loss or gradient; "
                 f"stopped. {out_path / 'ckpt.pt'} holds the last good state: resume it with a lower "
                 f"--learning_rate, --logit_clamp=30 or --grad_clip=1, or check the data")
    elif iter_num % log_interval == 0:
        print(f"iter {iter_num}: loss {loss:.4f} ({', '.join(f'{k} {v:.4f}' for k, v in logged.items() if k != 'loss')}, "
              f"kd {criterion.kd_weight:.2f}, "
              f"T {criterion.temperature:.2f}) | lr {lr:.2e}, grad norm {grad_norm:.2f} | {dt * 1000:.0f} ms, "
              f"{record['samples_per_s']:.1f} samples/s, {tok_s:,.0f} tok/s, MFU {'%.1f%%' % (100 * mfu) if mfu else 'n/a'}"
              f" | {memory_text(mem)}", flush=True)
    iter_num += 1
    evaluated = False
    if ddp and all_sum(torch.tensor(float(stop_signal is not None))) > 0:  # every rank stops after the same step
        stop_signal = stop_signal or 'a signal to another rank'
    if stop_signal:
        save(out_path / 'ckpt.pt', evaluated=False)
        if master:
            records.close()
        print(f"stopped by {stop_signal} after step {iter_num - 1}: {out_path / 'ckpt.pt'} holds everything; resume with\n"
              f"  python train.py {' '.join(a for a in sys.argv[1:] if not a.startswith('--init_from='))} --init_from=resume")
        sys.exit(0)

if master:
    records.close()
if ddp:
    dist.destroy_process_group()
print(f"done: best val CE {best_val:.4f}; checkpoints in {out_path}/ (sample with: python sample.py --ckpt {out_path / 'best.pt'})")
