"""Reliability: exact resume, checkpoints that survive SIGKILL, SIGINT/SIGTERM that save and exit 0, and
bad input that gets one clear line and touches nothing. Everything runs train.py / sample.py as a user
would, in a subprocess, with the tiny random teacher.
Run: python -m pytest tests/test_recovery.py"""
import json
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint
from test_train import HANG_S, ROOT, records, run, tiny_args


def same_records(a, b, keys=('loss', 'ce', 'kl', 'grad_norm', 'lr', 'kd_weight', 'val_ce', 'val_kl', 'ema_val_ce')):
    assert [r['iter'] for r in a] == [r['iter'] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            if key in ra:
                assert ra[key] == rb[key], (key, ra, rb)


RESUME = dict(max_iters=12, eval_interval=3, lr_decay_iters=12, dropout=0.1, optimizer='adamw8bit', ema_decay=0.9,
              gradient_accumulation_steps=2, kd_warmup_frac=0.5, watch_tokens=8, plot=False)


def test_resume_is_exact_with_8bit_adamw_ema_and_accumulation(tiny_teacher, tiny_data, tmp_path):
    """N steps straight == N/2, resume, N/2: identical loss records and identical final weights, optimizer state
    and EMA (seed 002 resumed with fresh weights). Dropout on: the RNG state must come back too. No tolerance
    is needed on CPU: every op here is deterministic."""
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    run('train.py', *tiny_args(tiny_teacher, tiny_data, straight, **RESUME))
    run('train.py', *tiny_args(tiny_teacher, tiny_data, split, **{**RESUME, 'max_iters': 6}))
    stdout = run('train.py', *tiny_args(tiny_teacher, tiny_data, split, **RESUME), '--init_from=resume')
    assert 'resumed from' in stdout and 'at step 6' in stdout
    same_records(records(straight), records(split))
    a, b = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (straight, split))
    assert a['config']['optimizer'] == 'adamw8bit'
    for k, v in a['model'].items():
        assert torch.equal(v, b['model'][k]), k
    for k, v in a['ema']['shadow'].items():
        assert torch.equal(v, b['ema']['shadow'][k]), k
    assert equal(a['optimizer'], b['optimizer'])  # bitsandbytes' 8-bit moments, their scales, the step counts


def equal(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def start(args):
    return subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=HANG_S):
    """Poll until predicate() holds. The run must still be going: the runs raced here never finish on their own
    (max_iters far beyond what a test waits for), so the outcome does not depend on the CPU's speed; the timeout
    only guards against a hang."""
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, f"train.py exited early:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() - t0 < timeout, 'timed out'
        time.sleep(0.02)


def steps_logged(out):
    path = out / 'log.jsonl'
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_at_random_moments_then_resume_every_time(tiny_teacher, tiny_data, tmp_path):
    """A checkpoint every step (eval_interval=1), killed with SIGKILL at random moments, five times, each time
    resumed from what is on disk: ckpt.pt is always readable, and the finished record equals a run that was never
    killed (the log is trimmed back to the checkpoint on resume). The killed runs cannot finish before the kill,
    however fast the CPU (max_iters 10^6; every schedule is lr_decay_iters long, so max_iters changes nothing
    else); a last resume finishes the run at K steps, and the run that was never killed goes to the same K."""
    common = dict(eval_interval=1, eval_iters=1, watch_tokens=0, plot=False, optimizer='adamw8bit', ema_decay=0.9,
                  lr_decay_iters=30)
    straight, out = tmp_path / 'straight', tmp_path / 'killed'
    rng = random.Random(0)
    resumed_at = []
    for attempt in range(5):
        extra = ['--init_from=resume'] if attempt else []
        proc = start(tiny_args(tiny_teacher, tiny_data, out, max_iters=10 ** 6, **common) + extra)
        logged = steps_logged(out)
        wait_for(lambda: steps_logged(out) > logged, proc)  # training (and checkpointing) is under way
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere in a step: forward, backward, evaluation, checkpoint write
        assert proc.poll() is None, 'the run ended before it was killed'
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint(out / 'ckpt.pt')  # never half-written
        resumed_at.append(ckpt['iter_num'])
    assert resumed_at == sorted(resumed_at) and resumed_at[-1] >= 1, resumed_at
    K = max(30, resumed_at[-1] + 2)  # the finishing resume trains at least two more steps
    stdout = run('train.py', *tiny_args(tiny_teacher, tiny_data, out, max_iters=K, **common), '--init_from=resume')
    assert f'at step {resumed_at[-1]}' in stdout
    run('train.py', *tiny_args(tiny_teacher, tiny_data, straight, max_iters=K, **common))
    assert records(out)[-1]['iter'] == K
    same_records(records(straight), records(out))


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_saves_and_exits_0(tiny_teacher, tiny_data, tmp_path, sig):
    out = tmp_path / 'out'
    args = tiny_args(tiny_teacher, tiny_data, out, max_iters=100000, eval_interval=1000, watch_tokens=0, plot=False)
    proc = start(args)
    wait_for(lambda: steps_logged(out) >= 3, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 0, stderr[-3000:]
    assert f'stopped by {sig.name}' in stdout and '--init_from=resume' in stdout.strip().splitlines()[-1]
    ckpt = load_checkpoint(out / 'ckpt.pt')
    last = records(out)[-1]
    assert ckpt['iter_num'] == last['iter'] + 1 and not ckpt['evaluated']  # the step in flight was finished
    stdout = run('train.py', *args[:-1], f'--max_iters={ckpt["iter_num"] + 2}', '--init_from=resume')
    assert f'at step {ckpt["iter_num"]}' in stdout
    assert [r['iter'] for r in records(out) if 'loss' in r][-2:] == [ckpt['iter_num'], ckpt['iter_num'] + 1]


@pytest.fixture(scope='module')
def finished(tiny_teacher, tiny_data, tmp_path_factory):
    """A finished tiny run (block_size 64): the out_dir every bad input below must leave untouched."""
    out = tmp_path_factory.mktemp('finished')
    run('train.py', *tiny_args(tiny_teacher, tiny_data, out, max_iters=2, eval_interval=2, watch_tokens=0))
    return out


def variant(tiny_data, tmp_path, change):
    """A copy of the token files with one thing wrong."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    change(data)
    return data


def other_tokenizer(data):
    meta = json.loads((data / 'meta.json').read_text())
    (data / 'meta.json').write_text(json.dumps({**meta, 'tokenizer_hash': '0123456789abcdef'}))


def too_short(data):
    meta = json.loads((data / 'meta.json').read_text())
    np.fromfile(data / 'val.bin', dtype=meta['dtype'])[:50].tofile(data / 'val.bin')  # 50 tokens < one block of 65


# (name, train.py / sample.py arguments, words the one line must hold); {t} teacher, {d} data, {o} out_dir.
# Settings that fail on their own are checked directly (test_config.py: check_settings, configure; test_train.py:
# param_groups); the two of them here show that the script runs those checks before it touches anything.
BAD = [
    ('unknown key', ['--batch_sise=4'], "unknown config key 'batch_sise'"),
    ('teacher does not resolve', ['--teacher=/no/such/teacher'], "teacher '/no/such/teacher' is not an existing"),
    ('quantization on CPU', ['--teacher_quantization=4bit'], 'needs a CUDA GPU'),
    ('token files of another tokenizer', ['--data_dir={other}'], 'were made for tokenizer 0123456789abcdef'),
    ('dataset shorter than a block', ['--data_dir={short}'], 'val.bin in'),
    ('block_size beyond the checkpoint', ['--init_from=resume', '--block_size=128'], 'holds a student with block_size=64'),
    ('non-positive iterations', ['--max_iters=0'], '--max_iters=0 must be a positive integer'),
    ('on-policy on a text stream', ['--onpolicy_frac=0.5'], 'lets the student answer prompts'),
    ('EMA resume without EMA', ['--init_from=resume', '--ema_decay=0.9'], 'has no EMA'),
    ('fresh run over a checkpoint', ['--overwrite=False'], 'exists; continue it with --init_from=resume'),
    ('sample: no checkpoint', ['sample.py', '--ckpt={o}/nope.pt'], 'nope.pt not found'),
    ('sample: truncated checkpoint', ['sample.py', '--ckpt={truncated}'], 'cannot be read'),
    ('resume: truncated checkpoint', ['--init_from=resume', '--out_dir={truncated_dir}'], 'cannot be read'),
    # a stage (init_from=another run's checkpoint): {stage}/<name>.pt are the finished run's ckpt.pt, altered (STAGES)
    ('stage: no checkpoint', ['--init_from={stage}/nope.pt'], 'nope.pt not found'),
    ('stage: truncated checkpoint', ['--init_from={truncated}'], 'cannot be read'),
    ("stage: the run's own checkpoint", ['--init_from={o}/best.pt'], "own checkpoint (--out_dir="),
    ('stage: another teacher', ['--init_from={stage}/teacher.pt'], "was distilled from teacher '/another/teacher'"),
    ("stage: another teacher's tokenizer", ['--init_from={stage}/tokenizer.pt'],
     'was trained with tokenizer 0123456789abcdef'),
    ('stage: an own tokenizer, the run none', ['--init_from={stage}/own.pt'],
     "reads its own tokenizer 'bpe512' and this run asks for the teacher's tokens"),
    ('stage: the run an own tokenizer, the student none', ['--init_from={stage}/copy.pt', '--student_tokenizer=bpe512'],
     "reads the teacher's tokens and this run asks for 'bpe512'"),
    ('stage: a Cognate student pruned', ['--init_from={stage}/cognate.pt', '--recursions=2', '--n_layer=1'],
     'is a Cognate student (recursions=2'),
    ('stage: a GELU student pruned', ['--init_from={stage}/copy.pt', '--n_layer=1'], 'pruning needs a SwiGLU student'),
    ('stage: a size beyond the checkpoint', ['--init_from={stage}/copy.pt', '--n_embd=64'],
     '--n_embd=64 but the student in'),
    ('stage: the EMA it has not', ['--init_from={stage}/copy.pt', '--init_from_ema=True'], 'has no EMA weights'),
]
STAGES = {  # name: how the finished run's checkpoint is altered
    'copy': lambda c: None,
    'teacher': lambda c: c['config'].update(teacher='/another/teacher'),
    'tokenizer': lambda c: c.update(tokenizer_hash='0123456789abcdef'),
    'own': lambda c: (c.update(student_tokenizer='{"model": "a BPE"}'), c['config'].update(student_tokenizer='bpe512')),
    'cognate': lambda c: c['model_args'].update(recursions=2),
}


def stage_checkpoints(finished, out):
    """out/<name>.pt for each of STAGES."""
    out.mkdir()
    for name, change in STAGES.items():
        ckpt = torch.load(finished / 'ckpt.pt', weights_only=True)
        change(ckpt)
        torch.save(ckpt, out / f'{name}.pt')
    return out


@pytest.mark.parametrize('name,argv,words', BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_touches_nothing(tiny_teacher, tiny_data, finished, tmp_path, name, argv, words):
    truncated_dir = tmp_path / 'truncated'
    truncated_dir.mkdir()
    good = (finished / 'ckpt.pt').read_bytes()
    (truncated_dir / 'ckpt.pt').write_bytes(good[:len(good) // 3])
    places = {'t': tiny_teacher, 'o': finished, 'truncated': truncated_dir / 'ckpt.pt', 'truncated_dir': truncated_dir,
              'other': variant(tiny_data, tmp_path / 'a', other_tokenizer) if '{other}' in ''.join(argv) else '',
              'short': variant(tiny_data, tmp_path / 'b', too_short) if '{short}' in ''.join(argv) else '',
              'stage': stage_checkpoints(finished, tmp_path / 'stage') if '{stage}' in ''.join(argv) else ''}
    argv = [a.format(**places) for a in argv]
    if argv[0] == 'sample.py':
        cmd = [str(ROOT / 'sample.py'), *argv[1:]]
    else:
        base = tiny_args(tiny_teacher, tiny_data, finished, max_iters=2, eval_interval=2)
        cmd = [str(ROOT / 'train.py'), *base, '--overwrite=True', *argv]  # overwrite: the check must come before writing
    watched = [finished, truncated_dir]
    before = {p: p.read_bytes() for d in watched for p in sorted(d.iterdir())}
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=HANG_S, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith('indra: ') and words in lines[-1], lines[-1]
    after = {p: p.read_bytes() for d in watched for p in sorted(d.iterdir())}
    assert after == before, 'a bad input changed a file'


def test_batches_with_nothing_to_learn_give_a_zero_loss_not_nan(tiny_teacher, tiny_examples, tmp_path):
    """Example data whose loss masks are all 0 (every token a prompt token): the KD and CE terms count no token,
    so the loss is 0 and finite, no step is skipped, and the weights only decay."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_examples, data)
    np.zeros_like(np.fromfile(data / 'train.mask.bin', dtype=np.uint8)).tofile(data / 'train.mask.bin')
    out = tmp_path / 'out'
    run('train.py', *tiny_args(tiny_teacher, data, out, max_iters=3, eval_interval=3, watch_tokens=0, plot=False))
    steps = [r for r in records(out) if 'loss' in r]
    assert [(r['loss'], r['ce'], r['kl'], r['skipped'], r['grad_norm']) for r in steps] == [(0.0, 0.0, 0.0, 0, 0.0)] * 3
