"""
Distill a teacher language model into an indra student (complex-valued attention).

CPU quickstart, embedded SmolLM2-135M-Instruct teacher on Shakespeare (its time per kind of CPU: docs/performance.md):
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
through a projector that is trained beside it. distill.py assembles it for each batch.
Every step is a record in out_dir/log.jsonl, drawn into out_dir/training.png at each evaluation (plot.py);
out_dir/ckpt.pt is the latest state, best.pt the best val CE. Ctrl-C (SIGINT) or SIGTERM finishes the
current step, writes ckpt.pt and says how to resume.
"""
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import vocab
from checkpoint import StopRequest, open_run, restore, save, snapshot, start_log, tokenizer_files
from configurator import check_settings, configure
from data import Data, prepare_on_first_use
from distill import Distill
from inherit import build_student
from machine import FreedMemory, Peak, all_sum, autocast as autocast_for, choose_dtype, memory, memory_text, \
    peak_flops, pick_device, seed_all, start_ranks
from matching import Matching
from model import EMA
from monitor import (WATCH_PROMPTS, Records, eval_line, step_line, student_flops_per_token, teacher_flops_per_token,
                     watch, watch_lines)
from onpolicy import OnPolicy
from optim import cosine_lr, kd_weight_at, make_optimizer, param_groups, temperature_at
from teacher import build_targets, check_linear_head, load_teacher, teacher_config, teacher_slug
from tokenizer import chat_prompt, tokenizer_hash

ROOT = Path(__file__).resolve().parent
sys.stdout.reconfigure(line_buffering=True)  # every line shows at once, also when the output goes to a file or a pipe
# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'  # checkpoints and logs; relative paths are taken from the current directory
init_from = 'scratch'  # 'scratch' | 'resume' (continue from out_dir/ckpt.pt) | 'teacher' (its weights, inherit.py)
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
# student (init_from='teacher': a size of 0 is the teacher's, a smaller one prunes it, the rest is the teacher's)
n_layer = 6
n_head = 6
n_kv_head = 0  # key/value heads, each shared by n_head // n_kv_head query heads (GQA); 0 = n_head
n_embd = 384
head_dim = 0  # real features per head (Re and Im halves); 0 = n_embd // n_head
mlp = 'gelu'  # 'gelu' | 'swiglu' (Llama's and Qwen2's)
mlp_hidden = 0  # the MLP's hidden width; 0 = 4 x n_embd (gelu), 8/3 x n_embd (swiglu)
qkv_bias = False  # biases on q, k, v (Qwen2)
tie_head = True  # the output head is the token embedding
rope_base = 10000.0  # rotary phases: position p turns pair i of a head by p x rope_base^(-2i / head_dim)
norm_eps = 0.0  # RMSNorm's epsilon; 0 = the machine epsilon of the activations' dtype
keep_layers = []  # init_from='teacher' with a smaller n_layer: these teacher layers (0-based); [] = by Block Influence
prune_batches = 8  # training batches on which pruning measures what to keep (prune.py)
dropout = 0.0
attn_impl = 'sdpa'  # 'sdpa' (fused) | 'reference' (complex64 matmuls, seed 000)
gradient_checkpointing = False  # recompute activations in backward: less memory, slower
# Cognate (seed 001): a recursive student with adaptive computation, a long-term memory, MuGrokfast (docs/cognate.md)
recursions = 1  # the blocks applied this many times with shared weights (TRM); 1 = the plain student
act = False  # a halting head mixes each token's passes (Adaptive Computation Time); needs recursions > 1
act_ponder_weight = 0.01  # + this x the mean expected passes per token (ACT's ponder cost)
act_diversity_weight = 0.01  # + this x max(0, act_target_variance - the halting probabilities' variance) (seed 001)
act_target_variance = 0.1  # seed 001's target; it counted a variance above 0.05 as ACT working
ltm = False  # a gated long-term memory in every block (Titans, memory as a gate)
ltm_dim = 64  # the memory's width
ltm_decay = 0.9  # m_t = decay x m_(t-1) + (1 - decay) x the token's compressed view, in (0, 1)
muon_lr = 0.02  # optimizer='mugrokfast': Muon's peak LR on the blocks' matrices (Keller Jordan's); scheduled alike
grokfast_alpha = 0.98  # mugrokfast: the decay of Grokfast's gradient EMA (the paper's)
grokfast_lambda = 2.0  # mugrokfast: each gradient g becomes g + lambda x EMA(g) (the paper's; seed 001 used 0.02)
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
onpolicy_frac = 0.0  # example data: this share of batches the student answers, the teacher grades (onpolicy.py, GKD)
onpolicy_temperature = 1.0  # the sampling temperature of those answers; 0 = greedy
# matching the teacher's insides (seed 003), on student blocks mapped to teacher layers
feature_weight = 0.0  # > 0: + feature_weight x the feature loss (learned projections to the teacher's width)
feature_loss = 'mse'  # 'mse' (on RMS-normalized teacher features) | 'cosine'
attention_weight = 0.0  # > 0: + attention_weight x KL(teacher attention || student attention), GQA-aware
layer_map = []  # [[student block, teacher layer], ...]; [] = evenly spaced, the last block on the last layer
# a student with its own tokenizer (seed 002)
student_tokenizer = ''  # '' = the teacher's | 'bpe8192': a byte-level BPE of 8,192 tokens trained by data prep
# optimizer
optimizer = 'adamw'  # 'adamw' (torch) | 'adamw8bit' (bitsandbytes, CPU and CUDA) | 'mugrokfast' (Muon + Grokfast)
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


def fail(msg):
    raise SystemExit(f"indra: {msg}")


# ---- setup: ranks, the settings' checks, the dtype --------------------------
# Under torchrun every rank draws the whole global batch order from the same generator and loads only its
# share of the micro-steps, so N ranks train on exactly the batches of one process.
device, rank, world_size = start_ranks(pick_device(device))
device_type, ddp, master = ('cuda' if device.startswith('cuda') else 'cpu'), dist.is_initialized(), rank == 0
derived = check_settings(config, device_type, ddp, world_size)  # every bad setting is one line, before anything slow
gradient_accumulation_steps = config['gradient_accumulation_steps']  # total_batch_size may have set it
micro_steps, schedule_iters, own_vocab, criterion = (derived[k] for k in ('micro_steps', 'schedule_iters',
                                                                          'own_vocab', 'criterion'))
out_path = Path(out_dir)
resumed = open_run(out_path, init_from, overwrite)  # the checkpoint to resume, or None
seed_all(seed)
# The dtype is chosen once per run: rank 0 measures (a probe on the student's shapes; on CUDA, bf16 support),
# every rank takes its choice, and the checkpoint keeps it, so a resumed run computes exactly as before.
choice = [None, None]
if master:  # the probe runs on the student's width (the teacher's, for a student that inherits it)
    choice = list(choose_dtype(dtype, device, n_embd or teacher_config(teacher).hidden_size,
                               saved=resumed and resumed['config']['dtype']))
if ddp:
    dist.broadcast_object_list(choice, src=0)
dtype, dtype_line = choice
config['dtype'] = dtype  # the resolved dtype goes into config.json and every checkpoint
print(dtype_line)
ptdtype, autocast = getattr(torch, dtype), autocast_for(device, dtype)
print(f"tokens per optimizer step: {gradient_accumulation_steps * batch_size * block_size:,} = "
      f"{gradient_accumulation_steps} accumulation x {batch_size} sequences x {block_size} tokens; device {device}, "
      f"{dtype}" + (f"; {world_size} ranks ({dist.get_backend()}), {micro_steps} micro-steps each" if ddp else ""))
freed = FreedMemory() if device_type == 'cpu' else None  # large freed tensors kept for the next step
if freed:
    print(freed.line)

# ---- the teacher and the data -----------------------------------------------
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
data_path = Path(data_dir) if data_dir else ROOT / 'data' / dataset / teacher_slug(teacher)
prepare_on_first_use(dataset, data_path, teacher, own_vocab, dtype)
if ddp and master:
    dist.barrier()
data = Data(data_path, tokenizer, tokenizer_enc, batch_size, block_size, device, dtype, own_vocab,
            teacher_targets == 'cache', curriculum, schedule_iters, teacher, dataset)
if teacher_targets == 'cache':  # the teacher's targets, computed once for aligned blocks of train.bin
    data.open_cache(build_targets(teacher, data_path, targets_top_k, temperature, block_size, device=device,
                                  dtype=ptdtype, loaded=(teacher_model, tokenizer)))
    print(f"training on cached teacher targets: {data.cache['blocks']} blocks, top {targets_top_k} at T={temperature:g}")

# ---- the student, what trains beside it, the optimizer (or all of it from the checkpoint) ----
# from scratch, from the teacher's own weights (init_from='teacher', inherit.py), or the checkpoint's shape
model, model_args, inherited = build_student(config, data, data.vocab_size or teacher_vocab, teacher, resumed,
                                             out_path / 'ckpt.pt')
model.to(device)
print(model.param_report())
# Trained beside the student, thrown away after: projections to the teacher's width for feature matching, the
# projector that gives a student with its own tokenizer the teacher's predictions in its vocabulary.
aux = torch.nn.ModuleDict()
matching = Matching.for_run(model.config, teacher_model.config, layer_map, feature_weight, attention_weight,
                            feature_loss)  # None when nothing is matched
if matching and matching.features is not None:
    aux['features'] = matching.features
if own_vocab:
    aux['projector'] = vocab.Projector(teacher_model.config.hidden_size, model.config.n_embd)
aux.to(device)
# the tied head is the embedding: listed once, as wte.weight; then features.*, projector.*
groups = param_groups(list(model.named_parameters()) + list(aux.named_parameters()), weight_decay, lr_multipliers,
                      muon=optimizer == 'mugrokfast')  # MuGrokfast: the blocks' matrices in groups of their own
opt = make_optimizer(optimizer, groups, learning_rate, (beta1, beta2), device_type, muon_lr,
                     (grokfast_alpha, grokfast_lambda))
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')  # bf16 has fp32's range: no scaling needed
data_gen = torch.Generator().manual_seed(seed)  # the training batch order, saved for exact resume
ema = EMA(model, ema_decay) if ema_decay else None
parts = {'model': model, 'aux': aux, 'optimizer': opt, 'scaler': scaler, 'ema': ema}  # what a checkpoint holds
progress = dict(iter_num=0, evaluated=False, best_val=float('inf'), bad_evals=0, skipped_total=0)
if resumed is not None:
    progress = restore(resumed, parts, data_gen, device_type == 'cuda', out_path / 'ckpt.pt')
    print(f"resumed from {out_path / 'ckpt.pt'} at step {progress['iter_num']} (best val CE {progress['best_val']:.4f})")
    resumed = None  # free it
iter_num, evaluated, best_val, bad_evals, skipped_total = (progress[k] for k in progress)
# what the teacher says about a batch and the loss the student learns from it (distill.py)
onpolicy = OnPolicy.for_data(onpolicy_frac, onpolicy_temperature, data, seed) if onpolicy_frac else None
distill = Distill(model, teacher_model, criterion, autocast, matching, aux['projector'] if own_vocab else None,
                  compile_on=data.batch('val', torch.Generator().manual_seed(0)) if compile else None, ddp=ddp,
                  onpolicy=onpolicy)
watch_prompts = WATCH_PROMPTS['chat' if data.meta.get('chat') else 'text']  # seed 001's questions on chat data
watch_texts = [chat_prompt(tokenizer, p) if data.meta.get('chat') else p for p in watch_prompts]


def save_checkpoint(path, evaluated):
    """Only rank 0 writes: every rank holds the same weights, and the batch order is global, so the checkpoint
    resumes on any number of ranks. evaluated: whether the evaluation at iter_num is done (a resume skips it)."""
    if master:
        save(path, snapshot(parts, dict(iter_num=iter_num, evaluated=evaluated, best_val=best_val, bad_evals=bad_evals,
                                        skipped_total=skipped_total), data_gen, device_type == 'cuda',
                            model_args=model_args, config=config,
                            tokenizer_hash=tokenizer_hash(tokenizer),  # the teacher's; an own one is kept whole:
                            student_tokenizer=data.student_tok.to_str() if own_vocab else None,  # no data needed
                            tokenizer_files=tokenizer_files(tokenizer),  # the teacher's, for export.py
                            eos_id=data.eos_id, inherited=inherited))


# ---- the loop ---------------------------------------------------------------
student_flops = student_flops_per_token(model, block_size)
teacher_flops = teacher_flops_per_token(teacher_model, block_size) if teacher_targets == 'live' else 0
peak = Peak(*peak_flops(device, ptdtype)) if master else Peak(None, 'rank 0 reports MFU')
print(f"FLOPs per token: student {student_flops / 1e6:.1f}M (fwd+bwd) + teacher {teacher_flops / 1e6:.1f}M (fwd); "
      f"MFU against {'%.3f TFLOP/s' % (peak.flops / 1e12) if peak.flops else 'no peak'}: {peak.source}")
records = None  # rank 0 logs
if master:
    start_log(out_path, config, init_from == 'resume', iter_num, evaluated)  # config.json; the log from this step on
    records = Records(out_path, config, resume=init_from == 'resume', wandb_log=wandb_log, wandb_project=wandb_project,
                      wandb_run_name=wandb_run_name, wandb_mode=wandb_mode, aim_log=aim_log, aim_repo=aim_repo)
if plot:
    from plot import draw
stop = StopRequest(out_path / 'ckpt.pt')  # Ctrl-C or SIGTERM: finish the step, save, exit 0
skipped_in_a_row = 0
trained = list(model.parameters()) + list(aux.parameters())
model.train()
while True:
    # this step's schedules: learning rate, KD weight (seed 004's warmup), temperature (seed 003)
    lr = cosine_lr(iter_num, learning_rate, min_lr, warmup_iters, schedule_iters, decay_lr)
    for group in opt.param_groups:
        group['lr'] = lr * group['lr_mult']
    criterion.kd_weight = kd_weight_at(iter_num, kd_weight, kd_weight_start, kd_warmup_frac, schedule_iters)
    criterion.temperature = temperature_at(iter_num, temperature, temperature_start, temperature_end, schedule_iters)

    # evaluate at step 0, every eval_interval and at the end; save; maybe stop early (seed 001)
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and not evaluated:
        stats = distill.evaluate(data, eval_iters, seed, ema)  # an EMA on the same batches too (seed 002)
        if not math.isfinite(stats['val_ce']):
            fail(f"step {iter_num}: held-out CE is {stats['val_ce']}; the weights are broken, so nothing was saved: "
                 f"{out_path / 'ckpt.pt'} holds the last good state (resume it with a lower --learning_rate)")
        improved = stats['val_ce'] < best_val - min_delta
        best_val, bad_evals = (stats['val_ce'], 0) if improved else (best_val, bad_evals + 1)
        if watch_tokens and master:  # seed 001's collapse check: samples from fixed prompts, their repetition
            samples = watch(model, watch_prompts, watch_texts, data.encode, data.decode, watch_tokens, seed,
                            block_size, autocast, device)
            stats.update(watch=samples, watch_distinct_2=min(r['distinct_2'] for r in samples),
                         watch_top_share=max(r['top_share'] for r in samples))
        if master:
            records.log({'iter': iter_num, **stats})
        print('\n'.join([f"step {iter_num}: {eval_line(stats, own_vocab)}" + ('  *best*' if improved else '')]
                        + watch_lines(stats.get('watch', []))), flush=True)
        if improved:
            save_checkpoint(out_path / 'best.pt', evaluated=True)
        save_checkpoint(out_path / 'ckpt.pt', evaluated=True)
        if plot and master:
            draw(out_path)
        if patience and bad_evals >= patience:
            print(f"early stop: val CE has not improved by more than {min_delta} for {patience} evaluations")
            break
    if iter_num >= max_iters:
        break

    # forward and backward over the micro-steps of the global batch, each rank its share
    if device_type == 'cuda':
        torch.cuda.synchronize()
    t_start = time.perf_counter()
    sums = torch.zeros(len(distill.logged) + 1)  # each logged part, then the tokens computed
    longest = 0  # the longest real sequence, on this rank
    for micro_step in range(gradient_accumulation_steps):  # the global batch, drawn alike on every rank
        b = data.batch('train', data_gen, iter_num, load=micro_step % world_size == rank)
        if b is None:
            continue  # another rank's micro-step
        # DDP averages the gradients over the ranks at the last micro-step of each rank, not before
        last = micro_step >= gradient_accumulation_steps - world_size
        with nullcontext() if last or not ddp else distill.train_hidden.no_sync():
            loss, loss_parts = distill.loss(b, at=(iter_num, micro_step))
            scaler.scale(loss / micro_steps).backward()  # / micro_steps, then DDP's mean over ranks: / accumulation
        sums += torch.tensor([loss.item()] + [loss_parts[k] for k in distill.logged[1:]] + [b.x.numel()])
        longest = max(longest, b.x.shape[1] if b.attention_mask is None else b.attention_mask.sum(1).max().item())
    if ddp:  # the auxiliary modules are outside DDP: average their gradients here
        for p in aux.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world_size

    # clip and step, unless the loss or the gradient is not finite: then the weights, the optimizer and the EMA
    # stay as they were. Never zero a NaN loss and go on (seed 002's clamp-to-zero hid the bug it was meant to fix).
    scaler.unscale_(opt)  # true gradients (a no-op unless float16), for clipping and the logged norm
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, grad_clip if grad_clip > 0 else math.inf).item()
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
    scaler.update()  # float16: a non-finite gradient lowers the scale, as the scaler would have done itself
    opt.zero_grad(set_to_none=True)
    if device_type == 'cuda':
        torch.cuda.synchronize()
    dt = time.perf_counter() - t_start

    # the record of every step goes to log.jsonl; a line every log_interval steps
    tok_s = tokens / dt  # padded examples: the tokens that were computed
    mfu, raised = peak.mfu((student_flops + (teacher_flops if criterion.kd_weight > 0 else 0)) * tok_s / world_size)
    if raised:
        print(raised)
    mem = memory(device_type)
    if freed:
        freed.trim(mem['rss_gib'])
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
        print(step_line(record, logged, memory_text(mem)), flush=True)
    iter_num += 1
    evaluated = False

    # a signal (to any rank) stops every rank after the same step, with a checkpoint
    if ddp and all_sum(torch.tensor(float(stop.signal is not None))) > 0:
        stop.signal = stop.signal or 'a signal to another rank'
    if stop.signal:
        save_checkpoint(out_path / 'ckpt.pt', evaluated=False)
        if master:
            records.close()
        print(f"stopped by {stop.signal} after step {iter_num - 1}: {out_path / 'ckpt.pt'} holds everything; resume with\n"
              f"  python train.py {' '.join(a for a in sys.argv[1:] if not a.startswith('--init_from='))} --init_from=resume")
        sys.exit(0)

if master:
    records.close()
if ddp:
    dist.destroy_process_group()
print(f"done: best val CE {best_val:.4f}; checkpoints in {out_path}/ (sample with: python sample.py --ckpt {out_path / 'best.pt'})")
