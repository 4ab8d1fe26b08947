"""Scaling out, on CPU: data-parallel training under torchrun with the gloo backend (two ranks train exactly
like one process with the same global batch, a run resumes on another number of ranks), the teacher-targets
cache built by two ranks is the file one process writes, a device-mapped teacher, and eval.py measuring a
teacher loaded another way (quantized on CUDA; here another dtype) against itself.
Run: python -m pytest tests/test_scale.py    (the resume and the cache build are marked slow: -m slow)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train import HANG_S, records, run, tiny_args

ROOT = Path(__file__).resolve().parent.parent
# fp32, 4 steps: what differs between 1 and 2 ranks is only the order of float sums (the gradient all-reduce,
# one thread per rank): the largest relative difference measured was 6e-7
TOLERANCE = 1e-5
COMMON = dict(max_iters=4, lr_decay_iters=4, eval_interval=2, eval_iters=3, gradient_accumulation_steps=4,
              dtype='float32', watch_tokens=0, plot=False)


def torchrun(nproc, script, *args, check=True):
    """script under torchrun with nproc CPU processes; the one-thread-per-rank default of torchrun made explicit."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           str(ROOT / script), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=HANG_S)
    if check:
        assert r.returncode == 0, f"torchrun {script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def same_records(a, b, keys=('loss', 'ce', 'kl', 'grad_norm', 'val_ce', 'val_kl', 'teacher_val_ce')):
    assert [r['iter'] for r in a] == [r['iter'] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            if key in ra or key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=TOLERANCE), (key, ra, rb)


@pytest.fixture(scope='module')
def one_process(tiny_teacher, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp') / 'one'
    run('train.py', *tiny_args(tiny_teacher, tiny_data, out, **COMMON))
    return out


def test_two_ranks_train_like_one_process(tiny_teacher, tiny_data, tmp_path, one_process):
    out = tmp_path / 'two'
    r = torchrun(2, 'train.py', *tiny_args(tiny_teacher, tiny_data, out, **COMMON))
    assert '2 ranks (gloo), 2 micro-steps each' in r.stdout
    assert r.stdout.count('step 4: val CE') == 1  # rank 1 prints nothing
    same_records(records(one_process), records(out))
    assert len(records(out)) == 4 + 3  # 4 steps, 3 evaluations: rank 1 logged nothing
    assert sorted(p.name for p in out.iterdir()) == ['best.pt', 'ckpt.pt', 'config.json', 'log.jsonl']


@pytest.mark.slow
def test_two_rank_run_resumes_as_one_process(tiny_teacher, tiny_data, tmp_path, one_process):
    out = tmp_path / 'resumed'
    torchrun(2, 'train.py', *tiny_args(tiny_teacher, tiny_data, out, **{**COMMON, 'max_iters': 2}))
    run('train.py', *tiny_args(tiny_teacher, tiny_data, out, **COMMON), '--init_from=resume')
    same_records(records(one_process), records(out))


def test_accumulation_must_divide_among_ranks(tiny_teacher, tiny_data, tmp_path):
    r = torchrun(2, 'train.py', *tiny_args(tiny_teacher, tiny_data, tmp_path / 'out', gradient_accumulation_steps=3),
                 check=False)
    assert r.returncode != 0
    assert 'gradient_accumulation_steps=3 is shared among 2 ranks' in r.stderr
    assert '--gradient_accumulation_steps=4' in r.stderr
    assert 'train.py", line' not in r.stderr  # no traceback from the ranks (torchrun adds its own summary)
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_two_ranks_build_the_cache_one_process_writes(tiny_teacher, tiny_data, tmp_path):
    """5 batches of blocks over 2 ranks (3 + 2), written in place: the files equal a single process's."""
    from teacher import targets_dir
    built = {}
    for nproc in (1, 2):
        data = tmp_path / f'data{nproc}'
        data.mkdir()
        for name in ('train.bin', 'val.bin', 'meta.json'):
            (data / name).write_bytes((Path(tiny_data) / name).read_bytes())
        torchrun(nproc, 'teacher.py', '--cache', f'--teacher={tiny_teacher}', f'--data_dir={data}', '--top_k=8',
                 '--block_size=64', '--max_blocks=10', '--batch_size=2', '--dtype=float32')
        out = targets_dir(data, 8, 2.0, 64)
        built[nproc] = {name: (out / name).read_bytes() for name in ('ids.bin', 'logp.bin', 'meta.json')}
        assert not list(out.glob('progress-*.json'))
    assert len(built[1]['ids.bin']) == 10 * 64 * 8 * np.dtype(json.loads(built[1]['meta.json'])['ids_dtype']).itemsize
    assert built[1] == built[2]


def test_device_mapped_teacher_gives_the_same_hidden_states(tiny_teacher):
    """device_map='auto' (accelerate) places the layers itself; on a CPU-only machine they all land on the CPU,
    so this checks the loading path and the outputs, not a placement over several GPUs."""
    import torch
    from teacher import load_teacher, teacher_hidden
    plain, mapped = load_teacher(tiny_teacher)[0], load_teacher(tiny_teacher, device_map='auto')[0]
    x = torch.arange(40).view(2, 20)
    with torch.no_grad():
        assert torch.equal(teacher_hidden(plain, x), teacher_hidden(mapped, x))


def test_teacher_vs_itself_and_another_dtype(tiny_teacher, tiny_data, tmp_path):
    """--teacher_vs measures the teacher loaded another way on the same tokens: loaded the same way, KL 0 and
    the same CE (the comparison is aligned token for token); in bfloat16, a small KL above 0."""
    def teacher_vs(kind):
        out = tmp_path / f'{kind}.json'
        run('eval.py', f'--teacher={tiny_teacher}', f'--data_dir={tiny_data}', f'--teacher_vs={kind}',
            '--dtype=float32', '--max_tokens=2000', f'--json={out}')
        r = json.loads(out.read_text())
        return r['teacher'], r['teacher_vs']
    teacher, same = teacher_vs('float32')
    assert same['ce'] == teacher['ce'] and same['kl'] == 0.0  # the same computation on the same tokens
    assert same['top1_agreement'] == 1.0 and teacher['tokens'] == 2000
    _, bf16 = teacher_vs('bfloat16')  # a random tiny teacher is near uniform: rounding moves it very little
    assert 0.0 < bf16['kl'] < 0.05 and bf16['ce'] != teacher['ce'] and bf16['ce'] == pytest.approx(teacher['ce'], abs=0.05)


@pytest.mark.parametrize('args, says', [
    ([], 'nothing to evaluate'),
    (['--teacher_vs=4bit', '--data_dir=DATA', '--device=cpu'], 'needs a CUDA GPU'),
])
def test_eval_teacher_vs_errors_are_one_line(tiny_teacher, tiny_data, args, says):
    args = [a.replace('DATA', str(tiny_data)) for a in args]
    r = subprocess.run([sys.executable, str(ROOT / 'eval.py'), f'--teacher={tiny_teacher}', *args],
                       capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode != 0 and says in r.stderr and 'Traceback' not in r.stderr, r.stderr

