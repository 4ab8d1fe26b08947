"""
Distill a teacher language model into an indra student (complex-valued attention).

    python train.py config/shakespeare.py --max_iters=400     # the CPU quickstart, twice as long
    python train.py config/shakespeare.py --init_from=resume  # continue an interrupted run
    torchrun --standalone --nproc_per_node=2 train.py config/indra_agent.py  # 2 GPUs or processes

A step: gradient_accumulation_steps micro-steps of batch_size x block_size tokens, each one's loss
made by distill.py. Records go to out_dir/log.jsonl; ckpt.pt is the latest state, best.pt the best.
"""
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist

import inherit
from checkpoint import StopRequest, open_run, restore, resume_shape, save, snapshot, start_log, \
    tokenizer_files
from configurator import check_settings, configure
from data import Data, prepare_on_first_use
from distill import Distill, options_for_run
from machine import FreedMemory, Peak, all_sum, autocast as autocast_for, memory, memory_text, \
    peak_flops, pick_device, run_dtype, seed_all, start_ranks
from model import Indra, IndraConfig
from monitor import Records, Watch, eval_line, step_line, student_flops_per_token, \
    teacher_flops_per_token
from optim import EMA, cosine_lr, kd_weight_at, make_optimizer, param_groups, temperature_at
from teacher import load_for_run, targets_cache, teacher_config, teacher_slug
from tokenizer import tokenizer_hash

ROOT = Path(__file__).resolve().parent
sys.stdout.reconfigure(line_buffering=True)  # each line shows at once, also in a file or a pipe
# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'  # checkpoints and logs
init_from = 'scratch'  # 'scratch' | 'resume' (out_dir/ckpt.pt) | 'teacher' | 'run/best.pt' (below)
overwrite = False  # allow a fresh run in an out_dir that already holds a checkpoint
eval_interval = 50  # optimizer steps between held-out evaluations (and checkpoints)
eval_iters = 10  # held-out batches per evaluation (the same batches every time)
log_interval = 10  # steps between printed lines (every step goes to out_dir/log.jsonl)
plot = True  # redraw out_dir/training.png at every evaluation (plot.py)
# data
dataset = 'shakespeare'  # data/<dataset>/prepare.py makes the token files
data_dir = ''  # token files; '' = data/<dataset>/<teacher slug>/, prepared on first use
batch_size = 8  # sequences per micro-step
block_size = 256  # tokens per sequence
gradient_accumulation_steps = 4  # micro-steps per optimizer step, over all ranks together
total_batch_size = 0  # tokens per optimizer step; 0 = the three above multiplied
# teacher
teacher = 'smollm2-135m-instruct'  # embedded name | local model dir | path/to/model.gguf | hub id
# student
n_layer = 6
n_head = 6
n_kv_head = 0  # key/value heads, each shared by n_head // n_kv_head query heads; 0 = n_head
n_embd = 384
head_dim = 0  # real features per head (Re and Im halves); 0 = n_embd // n_head
mlp = 'gelu'  # 'gelu' | 'swiglu' (Llama's and Qwen2's)
mlp_hidden = 0  # the MLP's hidden width; 0 = 4 x n_embd (gelu), 8/3 x n_embd (swiglu)
qkv_bias = False  # biases on q, k, v (Qwen2)
tie_head = True  # the output head is the token embedding
rope_base = 10000.0  # rotary phases: position p turns pair i by p x rope_base^(-2i / head_dim)
norm_eps = 0.0  # RMSNorm's epsilon; 0 = the machine epsilon of the activations' dtype
dropout = 0.0
attn_impl = 'sdpa'  # 'sdpa' (fused) | 'reference' (complex64 matmuls)
# distillation
kd_weight = 0.5  # share of the KD term; 0 = plain cross-entropy on the same tokens
temperature = 2.0  # softens both distributions in the KD term
kd_loss = 'forward_kl'  # 'forward_kl' | 'reverse_kl' | 'jsd' | 'tvd' | 'skew_kl' (losses.py)
loss_chunk_tokens = 1024  # tokens per pass through the vocabulary-wide heads (bounds memory)
# optimizer and schedule: linear warmup, then cosine decay to min_lr
optimizer = 'adamw'  # 'adamw' (torch) | 'adamw8bit' (bitsandbytes) | 'mugrokfast' (Cognate)
learning_rate = 1e-3  # peak learning rate
max_iters = 200  # optimizer steps
weight_decay = 0.1  # on matrices and embeddings only
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global grad norm to this; 0 = off
decay_lr = True
warmup_iters = 20
lr_decay_iters = 0  # the length of every schedule (LR, KD warmup, temperature); 0 = max_iters
min_lr = 1e-4
# system
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = 'auto'  # 'auto' (measured: docs/performance.md) | 'bfloat16' | 'float16' | 'float32'
compile = False  # torch.compile the student (needs a C/C++ compiler on CPU)
seed = 1337
# ---- options: each is off by default and has its page in docs/ --------------
# safety (docs/safety.md)
watch_tokens = 32  # at each evaluation, sample this many tokens from fixed prompts: collapsed?
ema_decay = 0.0  # > 0: an EMA of the weights (e.g. 0.999), evaluated beside them and saved
max_skipped_steps = 10  # steps in a row skipped for a non-finite loss or gradient: then stop
patience = 0  # early stopping: evaluations without improvement; 0 = never stop early
min_delta = 0.0  # an improvement smaller than this does not count
label_smoothing = 0.0  # for the CE part (e.g. 0.1)
logit_clamp = 0.0  # > 0: the student's logits are bounded by c * tanh(logits / c) (e.g. 30)
lr_multipliers = {}  # {parameter-name pattern (fnmatch): LR multiplier}, e.g. {'blocks.0.*': 0.5}
gradient_checkpointing = False  # recompute activations in backward: less memory, slower
# experiment tracking (docs/reading-a-run.md)
wandb_log = False  # also log to Weights & Biases (pip install wandb)
wandb_project = 'indra'
wandb_run_name = ''  # '' = let wandb name the run
wandb_mode = 'online'  # 'online' | 'offline' (wandb sync later) | 'disabled'
aim_log = False  # also log to Aim (pip install aim)
aim_repo = ''  # Aim repository; '' = out_dir
# schedules of the loss and the data (docs/richer-distillation.md)
kd_warmup_frac = 0.0  # > 0: kd_weight ramps from kd_weight_start over this share of training
kd_weight_start = 0.1  # the KD weight at the start of that warmup
temperature_start = 0.0  # > 0: the temperature falls linearly from this to temperature_end
temperature_end = 1.0
curriculum = 0.0  # example data: for this share of training draw the shortest examples first
# other divergences (losses.py, docs/richer-distillation.md)
jsd_beta = 0.5  # jsd: the teacher's weight in the mixture; 0 is forward KL, 1 reverse KL
skew_alpha = 0.1  # skew_kl: KL(teacher || alpha teacher + (1 - alpha) student)
kd_top_k = 0  # > 0: the divergence on the union of both models' top-k tokens only
# large teachers, cached targets (docs/teachers.md)
teacher_quantization = 'none'  # 'none' | '4bit' | '8bit' (bitsandbytes, CUDA only)
teacher_device_map = ''  # 'auto': spread the teacher over all visible GPUs (no torchrun)
teacher_targets = 'live'  # 'live': the teacher runs every step | 'cache': its top-k, once
targets_top_k = 64  # tokens per position kept in the cache
# the student from another model (inherit.py): init_from='teacher' (docs/from-the-teacher.md) or
# 'other_run/best.pt', a stage (docs/stages.md); a size of 0 is that model's, a smaller prunes it
keep_layers = []  # with a smaller n_layer: these of its layers (0-based); [] = by Block Influence
prune_batches = 8  # training batches on which pruning measures what to keep
init_from_ema = False  # a stage starts from the checkpoint's EMA of the weights instead
# on-policy distillation (onpolicy.py, docs/onpolicy.md)
onpolicy_frac = 0.0  # example data: this share of batches the student answers, the teacher grades
onpolicy_temperature = 1.0  # the sampling temperature of those answers; 0 = greedy
# matching the teacher's insides (matching.py, docs/richer-distillation.md)
feature_weight = 0.0  # > 0: + feature_weight x the feature loss
feature_loss = 'mse'  # 'mse' (on RMS-normalized teacher features) | 'cosine'
attention_weight = 0.0  # > 0: + attention_weight x KL(teacher attention || student attention)
layer_map = []  # [[student block, teacher layer], ...]; [] = evenly spaced
# a student with its own tokenizer (vocab.py, docs/richer-distillation.md)
student_tokenizer = ''  # '' = the teacher's | 'bpe8192': a byte-level BPE made by data prep
# the Cognate student (cognate.py, docs/cognate.md)
recursions = 1  # the blocks applied this many times with shared weights; 1 = the plain student
act = False  # a halting head mixes each token's passes (ACT); needs recursions > 1
act_ponder_weight = 0.01  # + this x the mean expected passes per token
act_diversity_weight = 0.01  # + this x max(0, act_target_variance - the halting variance)
act_target_variance = 0.1  # the halting variance ACT should reach
ltm = False  # a gated long-term memory in every block
ltm_dim = 64  # the memory's width
ltm_decay = 0.9  # m_t = decay x m_(t-1) + (1 - decay) x the token's compressed view
muon_lr = 0.02  # optimizer='mugrokfast': Muon's peak LR on the blocks' matrices
grokfast_alpha = 0.98  # mugrokfast: the decay of Grokfast's gradient EMA
grokfast_lambda = 2.0  # mugrokfast: each gradient g becomes g + lambda x EMA(g)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and type(v) in (int, float, bool, str, dict, list)]
globals().update(configure({k: globals()[k] for k in config_keys}, sys.argv[1:]))
config = {k: globals()[k] for k in config_keys}


def fail(msg):
    raise SystemExit(f"indra: {msg}")


# ---- setup: ranks, the settings' checks, the dtype ---------------------------
# Under torchrun every rank draws the whole global batch order from one generator and loads only
# its share of the micro-steps, so N ranks train on exactly the batches of one process.
device, rank, world_size = start_ranks(pick_device(device))
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
ddp, master = dist.is_initialized(), rank == 0
derived = check_settings(config, device_type, ddp, world_size)  # a bad setting: one line, now
gradient_accumulation_steps = config['gradient_accumulation_steps']  # total_batch_size may set it
micro_steps, schedule_iters, own_vocab, criterion = (
    derived[k] for k in ('micro_steps', 'schedule_iters', 'own_vocab', 'criterion'))
out_path = Path(out_dir)
resumed = open_run(out_path, init_from, overwrite)  # the checkpoint to resume, or None
stage = inherit.open_stage(config)  # init_from=<a checkpoint>: it, checked now; else None
seed_all(seed)
# measured once on the student's width (the teacher's, for a student that inherits it)
dtype, dtype_line = run_dtype(dtype, device, lambda: n_embd or teacher_config(teacher).hidden_size,
                              resumed and resumed['config']['dtype'], master, ddp)
config['dtype'] = dtype  # the resolved dtype goes into config.json and every checkpoint
print(dtype_line)
ptdtype, autocast = getattr(torch, dtype), autocast_for(device, dtype)
print(f"tokens per optimizer step: {gradient_accumulation_steps * batch_size * block_size:,} = "
      f"{gradient_accumulation_steps} accumulation x {batch_size} sequences x {block_size} tokens; "
      f"device {device}, {dtype}"
      + (f"; {world_size} ranks ({dist.get_backend()}), {micro_steps} micro-steps each"
         if ddp else ""))
freed = FreedMemory() if device_type == 'cpu' else None  # freed memory kept for the next step
if freed:
    print(freed.line)

# ---- the teacher and the data ------------------------------------------------
if not master:
    dist.barrier()  # rank 0 fetches, converts and prepares first; the others find it done
teacher_model, tokenizer, tokenizer_enc, teacher_vocab = load_for_run(config, ptdtype, device)
data_path = Path(data_dir) if data_dir else ROOT / 'data' / dataset / teacher_slug(teacher)
prepare_on_first_use(dataset, data_path, teacher, own_vocab, dtype)
if ddp and master:
    dist.barrier()
data = Data(data_path, tokenizer, tokenizer_enc, batch_size, block_size, device, dtype, own_vocab,
            teacher_targets == 'cache', curriculum, schedule_iters, teacher, dataset)
if teacher_targets == 'cache':  # the teacher's top-k targets, computed once
    targets_cache(data, config, data_path, device, ptdtype, loaded=(teacher_model, tokenizer))

# ---- the student -------------------------------------------------------------
model_args = {f.name: config[f.name] for f in fields(IndraConfig) if f.name != 'vocab_size'}
model_args['vocab_size'] = data.vocab_size or teacher_vocab  # an own tokenizer's, or the teacher's
inherited = resumed and resumed.get('inherited')  # what a student from another model kept
if init_from == 'teacher':  # the teacher's own weights, pruned to the sizes set
    model, model_args, inherited = inherit.for_run(config, data, model_args, teacher)
elif stage:  # another run's student (a stage), pruned to the sizes set
    model, model_args, inherited = inherit.from_checkpoint(stage, config, data, model_args)
else:  # from scratch; a resume builds the checkpoint's shape, and restore() below its weights
    model_args = resume_shape(resumed, model_args, out_path / 'ckpt.pt') if resumed else model_args
    model = Indra(IndraConfig(**model_args))
model.to(device)
print(model.param_report())

# ---- what trains beside it, the optimizer, the state to resume ---------------
aux, options = options_for_run(config, model, teacher_model, data, own_vocab)  # each off by default
aux.to(device)
groups = param_groups(list(model.named_parameters()) + list(aux.named_parameters()), weight_decay,
                      lr_multipliers, muon=optimizer == 'mugrokfast')  # the tied head: once
opt = make_optimizer(optimizer, groups, learning_rate, (beta1, beta2), device_type, muon_lr,
                     (grokfast_alpha, grokfast_lambda))
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')  # bf16 needs no scaling
data_gen = torch.Generator().manual_seed(seed)  # the training batch order, saved for exact resume
ema = EMA(model, ema_decay) if ema_decay else None
parts = {'model': model, 'aux': aux, 'optimizer': opt, 'scaler': scaler, 'ema': ema}  # checkpointed
progress = dict(iter_num=0, evaluated=False, best_val=float('inf'), bad_evals=0, skipped_total=0)
if resumed is not None:
    progress = restore(resumed, parts, data_gen, device_type == 'cuda', out_path / 'ckpt.pt')
    print(f"resumed from {out_path / 'ckpt.pt'} at step {progress['iter_num']} "
          f"(best val CE {progress['best_val']:.4f})")
    resumed = None  # free it
elif stage:  # a stage goes on with its checkpoint's data order (and own tokenizer's projector)
    inherit.carry_over(stage, aux, data_gen)
iter_num, evaluated, best_val, bad_evals, skipped_total = (progress[k] for k in progress)
compile_on = data.batch('val', torch.Generator().manual_seed(0)) if compile else None
distill = Distill(model, teacher_model, criterion, autocast, ddp, compile_on, **options)
watch = Watch(data, tokenizer, watch_tokens, seed, autocast, device) if watch_tokens else None


def save_checkpoint(path, evaluated):
    """Rank 0 writes: every rank holds the same weights and the batch order is global, so it
    resumes on any number of ranks. evaluated: the evaluation at iter_num is done (resume skips)."""
    if master:
        progress = dict(iter_num=iter_num, evaluated=evaluated, best_val=best_val,
                        bad_evals=bad_evals, skipped_total=skipped_total)
        own = data.student_tok.to_str() if own_vocab else None  # an own tokenizer, kept whole
        save(path, snapshot(parts, progress, data_gen, device_type == 'cuda', model_args=model_args,
                            config=config, tokenizer_hash=tokenizer_hash(tokenizer),
                            student_tokenizer=own, tokenizer_files=tokenizer_files(tokenizer),
                            eos_id=data.eos_id, inherited=inherited))


# ---- the loop ----------------------------------------------------------------
student_flops = student_flops_per_token(model, block_size)
teacher_flops = teacher_flops_per_token(teacher_model, block_size) * (teacher_targets == 'live')
peak = Peak(*peak_flops(device, ptdtype)) if master else Peak(None, 'rank 0 reports MFU')
print(peak.line(student_flops, teacher_flops))
records = None  # rank 0 logs
if master:  # config.json, and the log from this step on
    start_log(out_path, config, init_from == 'resume', iter_num, evaluated)
    records = Records.for_run(out_path, config, resume=init_from == 'resume')
if plot:
    from plot import draw
stop = StopRequest(out_path / 'ckpt.pt')  # Ctrl-C or SIGTERM: finish the step, save, exit 0
sync = torch.cuda.synchronize if device_type == 'cuda' else lambda: None  # before reading the clock
skipped_in_a_row = 0
trained = list(model.parameters()) + list(aux.parameters())
model.train()
while True:
    # this step's learning rate, KD weight and temperature
    lr = cosine_lr(iter_num, learning_rate, min_lr, warmup_iters, schedule_iters, decay_lr)
    for group in opt.param_groups:
        group['lr'] = lr * group['lr_mult']
    criterion.kd_weight = kd_weight_at(iter_num, kd_weight, kd_weight_start, kd_warmup_frac,
                                       schedule_iters)
    criterion.temperature = temperature_at(iter_num, temperature, temperature_start,
                                           temperature_end, schedule_iters)

    # evaluate at step 0, every eval_interval and at the end; save; maybe stop early
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and not evaluated:
        stats = distill.evaluate(data, eval_iters, seed, ema)  # the EMA on the same batches too
        if not math.isfinite(stats['val_ce']):
            fail(f"step {iter_num}: held-out CE is {stats['val_ce']}; the weights are broken, so "
                 f"nothing was saved: {out_path / 'ckpt.pt'} holds the last good state (resume it "
                 f"with a lower --learning_rate)")
        improved = stats['val_ce'] < best_val - min_delta
        best_val, bad_evals = (stats['val_ce'], 0) if improved else (best_val, bad_evals + 1)
        if watch and master:  # samples from fixed prompts: has the student collapsed?
            stats.update(watch.sample(model, block_size))
        if master:
            records.log({'iter': iter_num, **stats})
        print(f"step {iter_num}: {eval_line(stats, own_vocab)}" + '  *best*' * improved, flush=True)
        if watch and master:
            print(watch.lines(stats['watch']), flush=True)
        if improved:
            save_checkpoint(out_path / 'best.pt', evaluated=True)
        save_checkpoint(out_path / 'ckpt.pt', evaluated=True)
        if plot and master:
            draw(out_path)
        if patience and bad_evals >= patience:
            print(f"early stop: val CE has not improved by more than {min_delta} for {patience} "
                  f"evaluations")
            break
    if iter_num >= max_iters:
        break

    # forward and backward over the micro-steps of the global batch, each rank its share
    sync()
    t_start = time.perf_counter()
    sums = torch.zeros(len(distill.logged) + 1)  # each logged part, then the tokens computed
    longest = 0  # the longest real sequence, on this rank
    for micro_step in range(gradient_accumulation_steps):  # the same draws on every rank
        b = data.batch('train', data_gen, iter_num, load=micro_step % world_size == rank)
        if b is None:
            continue  # another rank's micro-step
        # DDP averages the gradients over the ranks at each rank's last micro-step, not before
        last = micro_step >= gradient_accumulation_steps - world_size
        with nullcontext() if last or not ddp else distill.train_hidden.no_sync():
            loss, loss_parts = distill.loss(b, at=(iter_num, micro_step))
            scaler.scale(loss / micro_steps).backward()  # / micro_steps, then DDP's mean over ranks
        values = [loss_parts[k] for k in distill.logged[1:]]
        sums += torch.tensor([loss.item(), *values, b.x.numel()])
        real = b.x.shape[1] if b.attention_mask is None else b.attention_mask.sum(1).max().item()
        longest = max(longest, real)
    if ddp:  # the auxiliary modules are outside DDP: average their gradients here
        for p in aux.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world_size

    # clip and step, unless the loss or the gradient is not finite: then the weights, the optimizer
    # and the EMA stay as they were (never zero a NaN loss and go on: that hides the bug)
    scaler.unscale_(opt)  # true gradients (a no-op unless float16), for clipping and the log
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, grad_clip if grad_clip > 0 else math.inf)
    grad_norm = grad_norm.item()
    sums = all_sum(sums)
    logged = dict(zip(distill.logged, (sums[:-1] / gradient_accumulation_steps).tolist()))
    loss, tokens = logged['loss'], sums[-1].item()
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        scaler.step(opt)
        if ema is not None:
            ema.update(model)
        skipped_in_a_row = 0
    else:
        skipped_total += 1
        skipped_in_a_row += 1
    scaler.update()  # float16: a non-finite gradient lowers the scale
    opt.zero_grad(set_to_none=True)
    sync()
    dt = time.perf_counter() - t_start

    # every step's record goes to log.jsonl; a line every log_interval steps
    tok_s = tokens / dt  # padded examples: the tokens that were computed
    flops = student_flops + (teacher_flops if criterion.kd_weight > 0 else 0)
    mfu, raised = peak.mfu(flops * tok_s / world_size)
    if raised:
        print(raised)
    mem = memory(device_type)
    if freed:
        freed.trim(mem['rss_gib'])
    record = {'iter': iter_num, **logged, 'kd_weight': criterion.kd_weight,
              'temperature': criterion.temperature, 'lr': lr, 'grad_norm': grad_norm,
              'skipped': int(not finite), 'skipped_total': skipped_total, 'dt': dt,
              'samples_per_s': batch_size * gradient_accumulation_steps / dt, 'tokens_per_s': tok_s,
              'mfu': mfu, 'longest': int(longest), **mem}
    if master:
        records.log(record)
    if not finite:
        print(f"iter {iter_num}: SKIPPED, loss {loss}, grad norm {grad_norm}: not finite "
              f"({skipped_in_a_row} in a row, {skipped_total} in all); weights, optimizer and EMA "
              f"unchanged", flush=True)
        if skipped_in_a_row >= max_skipped_steps:
            if master:
                records.close()
            fail(f"{skipped_in_a_row} steps in a row (up to step {iter_num}) had a non-finite loss "
                 f"or gradient; stopped. {out_path / 'ckpt.pt'} holds the last good state: resume "
                 f"it with a lower --learning_rate, --logit_clamp=30 or --grad_clip=1, or check "
                 f"the data")
    elif iter_num % log_interval == 0:
        print(step_line(record, logged, memory_text(mem)), flush=True)
    iter_num += 1
    evaluated = False

    # a signal to any rank stops every rank after the same step, with a checkpoint
    if stop.requested(ddp):
        save_checkpoint(out_path / 'ckpt.pt', evaluated=False)
        if master:
            records.close()
        stop.exit(iter_num - 1, sys.argv[1:])

if master:
    records.close()
if ddp:
    dist.destroy_process_group()
print(f"done: best val CE {best_val:.4f}; checkpoints in {out_path}/ "
      f"(sample with: python sample.py --ckpt {out_path / 'best.pt'})")
