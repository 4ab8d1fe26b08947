"""
Speed and memory of indra's hot paths: every row compares two or three ways of doing the same
work, measured in this one process, in turns, and printed as a ratio.

    python bench.py                 # CPU: about 4 minutes on 2 cores with bf16 instructions
    python bench.py --device=cuda   # one GPU (tokens for the loss rows: 8,192)
    python bench.py --dtype=float32 # the dtype of every row after the first; default auto, as train.py

Timing: the cases of a row each run once to warm up, then take turns for `repeats` rounds, and
each case's fastest round is kept. On a shared machine (this CPU's speed drifts by up to 2x
over minutes) taking turns exposes every case of a row to the same drift, and the fastest round
is the one least disturbed: interference only ever adds time. CUDA is synchronized before the
clock is read. Peak memory: on CUDA, torch.cuda.max_memory_allocated; on CPU, the peak resident
memory sampled every millisecond while the case runs once, minus what was resident before
(PyTorch's CPU allocator keeps no peak counter; its large tensors come and go with mmap). MFU is
counted as in monitor.py: PaLM's FLOPs per token for student and teacher against a peak measured
here (machine.peak_flops, in the rounds of the steps) on CPU or looked up for the GPU.

The first row is the dtype probe that train.py's dtype='auto' decides by, float32 beside bf16;
the rows after it run in the chosen dtype (attention also in float32). Where the probe shows bf16
more than twice as slow as float32 (CPUs without bf16 instructions), the bf16 training step is
not timed (it would take minutes); the row says so and gives the probe's ratio.
"""
import argparse
import os
import sys
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from attention import ComplexAttention
from configurator import config_file
from distill import Distill
from losses import DistillationLoss, Teacher
from machine import DTYPES, TORCH_DTYPE, FreedMemory, Peak, autocast, choose_dtype, peak_flops, pick_device, probe
from model import Indra, IndraConfig
from monitor import student_flops_per_token, teacher_flops_per_token
from onpolicy import OnPolicy, answer_batch

ROOT = Path(__file__).resolve().parent

parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
parser.add_argument('--device', default='auto', help="'auto': cuda when a GPU is visible, else cpu")
parser.add_argument('--dtype', default='auto', choices=DTYPES, help="'auto' measures, as train.py does")
parser.add_argument('--repeats', type=int, default=5)
parser.add_argument('--recipe_teacher', default='Qwen/Qwen2.5-0.5B-Instruct',
                    help='GPU only: the teacher of the seed 000 recipe row (a hub id in the local cache, or a path)')
args = parser.parse_args()
sys.stdout.reconfigure(line_buffering=True)  # every line shows at once, also in a file or a pipe
device = pick_device(args.device)
cuda = device.startswith('cuda')
rows = []


def sync():
    if cuda:
        torch.cuda.synchronize()


def timed(cases, repeats=args.repeats):
    """{name: fastest seconds per call} of the functions in cases, after one warm-up call each, timed in turns."""
    times = {name: [] for name in cases}
    for rnd in range(repeats + 1):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if rnd:
                times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def peak_bytes(make):
    """Peak extra memory of one run of the case make() returns."""
    case = make()  # inputs first: the peak counts only what running the case adds
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        case()
        sync()
        return torch.cuda.max_memory_allocated() - base
    # CPU: large tensors are mmap'ed and unmapped when freed, so the resident size follows them; a thread
    # samples it every millisecond while the case runs
    proc, running = psutil.Process(), True
    base = peak = proc.memory_info().rss

    def sample():
        nonlocal peak
        while running:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.001)
    thread = threading.Thread(target=sample)
    thread.start()
    case()
    running = False
    thread.join()
    return peak - base


def row(what, a_name, a, b_name, b, note=''):
    rows.append((what, f"{a_name} {a}", f"{b_name} {b}", note))
    print(f"  {what}: {a_name} {a} | {b_name} {b} {note}", flush=True)


def ms(s):
    return f"{s * 1e3:.1f} ms"


# ---- the dtype: the probe dtype='auto' decides by, on the quickstart student's width ----
timings = None if cuda else probe(384)
dtype, line = choose_dtype(args.dtype, device, 384, timings=timings)
amp_dtype, amp = TORCH_DTYPE[dtype], autocast(device, dtype)
print(line, flush=True)
bf16_ratio = None if cuda else timings['bfloat16'] / timings['float32']
if not cuda:
    row(f"dtype probe ({timings['rows']} x 384 @ 384 x 1536)", 'float32', ms(timings['float32']), 'bf16 autocast',
        ms(timings['bfloat16']), f"-> bf16 {bf16_ratio:.2f}x the time; the rows below run in {dtype}")

# ---- attention: sdpa vs the complex64 reference -----------------------------
print("attention (n_embd 384, 6 heads), forward + backward", flush=True)
for name in dict.fromkeys(('float32', dtype)):  # float32, and the chosen dtype when it is another
    for T, B in ((256, 8), (1024, 2)):
        torch.manual_seed(0)
        x = torch.randn(B, T, 384, device=device)
        attn_amp = autocast(device, name)

        def case(impl):
            torch.manual_seed(1)
            attn = ComplexAttention(384, 6, T, attn_impl=impl).to(device)

            def step():
                xi = x.detach().requires_grad_(True)
                with attn_amp:
                    y = attn(xi)
                y.float().square().mean().backward()
                return y
            return step
        cases = {impl: case(impl) for impl in ('reference', 'sdpa')}
        out = {impl: step().float() for impl, step in cases.items()}
        times = timed(cases)
        diff = (out['reference'] - out['sdpa']).abs().max().item()
        row(f"attention {name} T={T} B={B}", 'reference', ms(times['reference']), 'sdpa',
            ms(times['sdpa']), f"-> sdpa {times['reference'] / times['sdpa']:.1f}x faster, max |diff| {diff:.1e}")


# ---- the loss: chunked from hidden states vs naive full-logit KD -------------
def naive_loss(h, W, th, tW, idx, a=0.5, T=2.0):
    """Full-logit KD as it is usually written: both models' (N, V) logits, then fp32 softmaxes."""
    s = (h @ W.t()).float()
    t = (th @ tW.t()).float()
    ce = F.cross_entropy(s[:-1], idx[1:])
    log_p = F.log_softmax(t[:-1] / T, -1)
    kl = (log_p.exp() * (log_p - F.log_softmax(s[:-1] / T, -1))).sum(-1).mean()
    return (1 - a) * ce + a * T * T * kl


def loss_case(kind, N, V, C, Ct):
    def make():
        torch.manual_seed(0)
        dt = amp_dtype
        h = torch.randn(N, C, device=device, dtype=dt, requires_grad=True)
        W = (torch.randn(V, C, device=device) * 0.02).requires_grad_(True)
        th, tW = torch.randn(N, Ct, device=device, dtype=dt), torch.randn(V, Ct, device=device, dtype=dt) * 0.02
        idx = torch.randint(V, (N,), device=device)
        crit = DistillationLoss(0.5, 2.0)

        def run():
            h.grad = W.grad = None
            if kind == 'naive':
                loss = naive_loss(h, W.to(dt), th, tW, idx)
            else:
                loss = crit(h.view(1, N, C), W, idx.view(1, N), teacher=Teacher(th.view(1, N, Ct), tW))[0]
            loss.backward()
        return run
    return make


N = 8192 if cuda else 2048
print(f"KD loss over {N} tokens, forward + backward ({dtype} hidden states, fp32 softmax)", flush=True)
for V, C, Ct in ((49152, 384, 576), (151936, 768, 896)):
    t = timed({kind: loss_case(kind, N, V, C, Ct)() for kind in ('naive', 'chunked')})
    t_naive, t_chunk = t['naive'], t['chunked']
    m_naive, m_chunk = peak_bytes(loss_case('naive', N, V, C, Ct)), peak_bytes(loss_case('chunked', N, V, C, Ct))
    row(f"loss V={V} time", 'naive', ms(t_naive), 'chunked', ms(t_chunk), f"-> chunked {t_chunk / t_naive:.2f}x the time")
    row(f"loss V={V} peak memory", 'naive', f"{m_naive / 2**30:.2f} GiB", 'chunked', f"{m_chunk / 2**30:.2f} GiB",
        f"-> chunked {m_chunk / m_naive:.0%} of naive")


# ---- a training step: live teacher vs cached targets vs CE only (the quickstart config) ----
if not cuda:  # as train.py does; only now, as the peak-memory rows above read the resident size as tensors come and go
    print(FreedMemory().line)
from teacher import build_targets, load_teacher, teacher_hidden  # noqa: E402  (slow imports, only here)

quick = config_file(ROOT / 'config' / 'shakespeare.py')  # the quickstart's settings
spec, block, batch, kd_weight, T = (quick[k] for k in ('teacher', 'block_size', 'batch_size', 'kd_weight', 'temperature'))
data = ROOT / 'data' / 'shakespeare' / spec
if not (data / 'meta.json').exists():
    import importlib.util
    prep = importlib.util.spec_from_file_location('prepare', ROOT / 'data' / 'shakespeare' / 'prepare.py')
    module = importlib.util.module_from_spec(prep)
    prep.loader.exec_module(module)
    module.prepare(spec)
teacher, tok, _ = load_teacher(spec, dtype=amp_dtype, device=device)
head = teacher.get_output_embeddings().weight
with tempfile.TemporaryDirectory() as tmp:  # a small cache in a scratch copy, never beside the real token files
    for name in ('train.bin', 'meta.json'):
        os.symlink(data / name, Path(tmp) / name)
    cache = build_targets(spec, tmp, 64, T, block, batch_size=batch, dtype=amp_dtype, device=device, max_blocks=batch,
                          loaded=(teacher, tok))
    import numpy as np
    tokens = np.memmap(data / 'train.bin', dtype=np.uint16, mode='r')
    x = torch.from_numpy(tokens[:batch * block].astype(np.int64)).view(batch, block).to(device)
    ids = torch.from_numpy(np.fromfile(cache / 'ids.bin', dtype=np.uint16).astype(np.int64)).view(batch, block, 64)
    logp = torch.from_numpy(np.fromfile(cache / 'logp.bin', dtype=np.float16).astype(np.float32)).view(batch, block, 64)
    shutil.rmtree(cache)
cached = Teacher(ids=ids.to(device), logp=logp.to(device))

torch.manual_seed(0)
shape = {k: quick[k] for k in ('n_layer', 'n_head', 'n_embd')}
student = Indra(IndraConfig(vocab_size=head.shape[0], block_size=block, **shape)).to(device)
opt = torch.optim.AdamW(student.parameters(), lr=1e-4)


def step_case(kind, teacher=teacher, amp=amp):
    crit = DistillationLoss(0.0 if kind == 'CE only' else kd_weight, T)
    head = teacher.get_output_embeddings().weight

    def step():
        if kind == 'live teacher':
            with torch.no_grad(), amp:
                t = Teacher(hidden=teacher_hidden(teacher, x), head=head)
        else:
            t = cached if kind == 'cached targets' else None
        with amp:
            loss = crit(student.hidden_states(x), student.lm_head.weight, x, teacher=t)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


cases = {kind: step_case(kind) for kind in ('live teacher', 'cached targets', 'CE only')}
# the other dtype's live step, beside the chosen one's: timed unless the probe shows bf16 over twice as slow
other = 'bfloat16' if dtype == 'float32' else 'float32'
time_other = other == 'float32' or (torch.cuda.is_bf16_supported() if cuda else bf16_ratio <= 2)
if time_other:
    cases[f'live teacher, {other}'] = step_case('live teacher', load_teacher(spec, dtype=TORCH_DTYPE[other],
                                                                              device=device)[0], autocast(device, other))
peaks = []  # the CPU's peak, measured in the same rounds as the steps (a GPU's is looked up)
if not cuda:
    cases['peak'] = lambda: peaks.append(peak_flops(device, amp_dtype, seconds=0.5)[0])
steps = timed(cases)
print(f"training step, quickstart config ({batch} x {block} tokens, {shape['n_layer']} x {shape['n_embd']} student, "
      f"{spec} teacher, kd_weight {kd_weight}, T {T})", flush=True)
row("step", 'CE only', ms(steps['CE only']), 'cached targets', ms(steps['cached targets']),
    f"-> cached {steps['cached targets'] / steps['CE only']:.2f}x CE-only; live teacher {ms(steps['live teacher'])} "
    f"({steps['live teacher'] / steps['CE only']:.2f}x)")
if time_other:
    t_other = steps[f'live teacher, {other}']
    row("live step by dtype", dtype, ms(steps['live teacher']), other, ms(t_other),
        f"-> {other} {t_other / steps['live teacher']:.2f}x the time of {dtype} (auto picked {dtype})")
else:
    row("live step by dtype", dtype, ms(steps['live teacher']), other, 'not timed',
        "-> this GPU has no bf16" if cuda else
        f"-> the probe shows bf16 {bf16_ratio:.1f}x slower than float32 here: a bf16 step would take minutes")

# where the live step's time goes: the parts alone, the same work as in step()
crit = DistillationLoss(kd_weight, T)
with torch.no_grad(), amp:
    t_live = Teacher(hidden=teacher_hidden(teacher, x), head=head)
    h_fixed = student.hidden_states(x)


def teacher_forward():
    with torch.no_grad(), amp:
        teacher_hidden(teacher, x)


def student_blocks():  # embedding + blocks forward and backward, without the head and the loss
    with amp:
        student.hidden_states(x).float().square().mean().backward()


def head_and_loss():  # both heads, softmaxes, KL, CE, and the gradients of the hidden states and the head
    h = h_fixed.detach().requires_grad_(True)
    with amp:
        crit(h, student.lm_head.weight, x, teacher=t_live)[0].backward()


def optimizer_step():
    opt.step()
    opt.zero_grad(set_to_none=False)


parts = timed({'teacher forward': teacher_forward, 'student blocks fwd+bwd': student_blocks,
               'heads + loss fwd+bwd': head_and_loss, 'optimizer': optimizer_step})
opt.zero_grad(set_to_none=True)
total = sum(parts.values())
row("live step, part by part", 'sum of parts', ms(total), 'largest', max(parts, key=parts.get),
    '; '.join(f"{k} {ms(v)} ({v / total:.0%})" for k, v in parts.items()))

# ---- end-to-end tokens/s and MFU of the live-teacher step ----
peak = Peak(*peak_flops(device, amp_dtype)) if cuda else \
    Peak(max(peaks), f"the best of the {dtype} matmuls of machine.peak_flops, timed in the rounds of the steps")
f_student, f_teacher = student_flops_per_token(student, block), teacher_flops_per_token(teacher, block)
tok_s = batch * block / steps['live teacher']
mfu, raised = peak.mfu((f_student + f_teacher) * tok_s)
row("end to end", 'tokens/s', f"{tok_s:,.0f}", 'MFU', f"{mfu:.1%}" if mfu else 'n/a',
    f"(FLOPs/token: student {f_student / 1e6:.0f}M + teacher {f_teacher / 1e6:.0f}M; peak "
    f"{(peak.flops or 0) / 1e12:.3f} TFLOP/s {dtype}, {peak.source})" + (f"; {raised}" if raised else ''))

# ---- generation: the key/value cache vs the whole window every token (eval.py's answers, sample.py) ----
gen_prompt = torch.randint(1000, (8, 32), device=device)  # 8 prompts of 32 tokens, 96 new ones each, greedy
student.eval()


def generating(use_cache):
    def run():
        with torch.no_grad(), amp:
            return student.generate(gen_prompt, 96, temperature=0, use_cache=use_cache)
    return run


gen = {'cached': generating(True), 'uncached': generating(False)}
same = torch.equal(gen['cached'](), gen['uncached']())
gen_t = timed(gen, repeats=2)
row("generate 8 x (32 + 96 tokens)", 'uncached', ms(gen_t['uncached']), 'kv cache', ms(gen_t['cached']),
    f"-> {gen_t['uncached'] / gen_t['cached']:.1f}x faster; {'the same' if same else 'NOT the same'} greedy tokens")
student.train()

# ---- on-policy distillation: a step on the student's own answers vs one on recorded answers (onpolicy.py) ----
# 16 chat-sized examples (prompts of 40 to 120 tokens, recorded answers of 24), as config/agent_cpu.py's batches. A
# student at random init rarely says eos, so it samples all 64 tokens: the dearest case, cached generation included.
eos = tok.eos_token_id
gen_rng = torch.Generator().manual_seed(0)
prompt_lens = torch.linspace(40, 120, 16).long().tolist()
ex = [(torch.randint(1000, (n,), generator=gen_rng).tolist(), torch.randint(1000, (24,), generator=gen_rng).tolist()
       + [eos]) for n in prompt_lens]
recorded = answer_batch([p for p, _ in ex], [a for _, a in ex], eos, block, device, sampled=False)
onpolicy_crit = DistillationLoss(kd_weight, T, kd_loss='jsd')


def distill_step(policy):
    d = Distill(student, teacher, onpolicy_crit, amp, onpolicy=policy)

    def step():
        loss, _ = d.loss(recorded)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


op = timed({'recorded': distill_step(None), 'sampled': distill_step(OnPolicy(1.0, 1.0, 64, eos, seed=0))}, repeats=3)
row("step on 16 examples, jsd", 'recorded answers', ms(op['recorded']), 'sampled answers (64)', ms(op['sampled']),
    f"-> an on-policy step {op['sampled'] / op['recorded']:.2f}x a supervised one, sampling included")

# ---- GPU only: the seed 000 recipe (12 x 768 student, 4-bit teacher, seq 256, batch 1 x 32) ----
if cuda:  # not yet run on a GPU by its author: this task had none
    try:
        r_teacher, _, _ = load_teacher(args.recipe_teacher, dtype=amp_dtype, device=device, quantization='4bit')
    except SystemExit as e:  # announced: the row needs the seed's teacher, which may not be on this machine
        print(f"seed 000 recipe row skipped: {e}")
        r_teacher = None
    if r_teacher is not None:
        r_head = r_teacher.get_output_embeddings().weight
        r_student = Indra(IndraConfig(vocab_size=r_head.shape[0], block_size=256, n_layer=12, n_head=12,
                                      n_embd=768)).to(device)
        import bitsandbytes as bnb
        r_opt = bnb.optim.AdamW8bit(r_student.parameters(), lr=1e-4)
        r_x = torch.randint(1000, (1, 256), device=device)  # ids every vocabulary has; the speed does not depend on them
        r_crit = DistillationLoss(0.5, 2.0)

        def recipe_step():  # one optimizer step: 32 micro-steps of one sequence
            for _ in range(32):
                with torch.no_grad(), amp:
                    t = Teacher(hidden=teacher_hidden(r_teacher, r_x), head=r_head)
                with amp:
                    (r_crit(r_student.hidden_states(r_x), r_student.lm_head.weight, r_x, teacher=t)[0] / 32).backward()
            r_opt.step()
            r_opt.zero_grad(set_to_none=True)
        dt = timed({'recipe': recipe_step})['recipe']
        row("seed 000 recipe step", 'samples/s', f"{32 / dt:.1f}", 'step', ms(dt),
            f"({r_student.num_params() / 1e6:.0f}M student, {args.recipe_teacher} 4-bit; seed 000 reports 12-13 samples/s)")

print(f"\n| {'what':<34} | {'A':<26} | {'B':<26} | ratio and notes")
print(f"|{'-' * 36}|{'-' * 28}|{'-' * 28}|{'-' * 20}")
for what, a, b, note in rows:
    print(f"| {what:<34} | {a:<26} | {b:<26} | {note}")
cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?') \
    if os.path.exists('/proc/cpuinfo') else '?'
print(f"\nmachine: {torch.cuda.get_device_name() if cuda else cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
