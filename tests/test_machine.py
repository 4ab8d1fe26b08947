"""The machine's facts, measured: dtype='auto' follows the probe, the MFU peak's work is bounded whatever the
dtype's speed, an MFU never exceeds 1, and what was made in one dtype is not mixed with another.
Run: python -m pytest tests/test_machine.py"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import machine
from machine import Peak, choose_dtype, peak_flops
from test_train import HANG_S, records, run, tiny_args


def probe_saying(f32, bf16):
    return lambda width, budget=0.2: {'rows': 256, 'width': width, 'float32': f32, 'bfloat16': bf16}


def test_auto_dtype_follows_the_probe(monkeypatch):
    monkeypatch.setattr(machine, 'probe', probe_saying(0.002, 0.020))  # bf16 10x slower: a CPU with AVX2 only
    name, line = choose_dtype('auto', 'cpu', 384)
    assert name == 'float32' and '2.00 ms in float32' in line and '20.00 ms under bf16' in line
    monkeypatch.setattr(machine, 'probe', probe_saying(0.004, 0.001))  # bf16 4x faster: AMX
    assert choose_dtype('auto', 'cpu', 384)[0] == 'bfloat16'
    monkeypatch.setattr(machine, 'probe', probe_saying(0.0020, 0.0019))  # within 10%: noise, and float32 is exact
    name, line = choose_dtype('auto', 'cpu', 384)
    assert name == 'float32' and 'within 10%' in line


def test_an_explicit_dtype_is_honoured_and_bf16_says_what_it_costs(monkeypatch):
    monkeypatch.setattr(machine, 'probe', probe_saying(0.002, 0.020))
    name, line = choose_dtype('bfloat16', 'cpu', 384)
    assert name == 'bfloat16' and '10.0x slower than float32' in line and 'auto would pick float32' in line
    monkeypatch.setattr(machine, 'probe', lambda *a, **k: pytest.fail('float32 needs no probe'))
    assert choose_dtype('float32', 'cpu', 384)[0] == 'float32'
    assert choose_dtype('auto', 'cpu', 384, saved='float32')[0] == 'float32'  # a resume: the checkpoint's dtype
    monkeypatch.setattr(machine, 'probe', probe_saying(0.002, 0.020))
    name, line = choose_dtype('auto', 'cpu', 384, saved='bfloat16')
    assert name == 'bfloat16' and 'as the checkpoint was trained' in line and '10.0x slower' in line
    for bad in ('float16', 'fp32'):
        with pytest.raises(SystemExit, match='--dtype'):
            choose_dtype(bad, 'cpu', 384)


def test_the_real_probe_is_small_and_times_both():
    t = machine.probe(384)
    assert t['rows'] * 384 * 1536 * 2 <= 2 ** 28 + 2 ** 20 and t['float32'] > 0 and t['bfloat16'] > 0


@pytest.mark.parametrize('speed', [1e8, 3e10, 1e15])  # FLOP/s: bf16 without bf16 instructions ... far above any CPU
def test_the_peak_measurement_does_bounded_work_at_any_speed(monkeypatch, speed):
    """A fake clock that advances by the work of each product at `speed`: the measurement's total work stays
    within about a second's worth at that speed (no fixed 4096^3 product), and it finds the speed."""
    clock, work, sizes = [0.0], [0.0], []

    def mm(a, b):
        n = a.shape[0]
        sizes.append(n)
        work[0] += 2 * n ** 3
        clock[0] += 2 * n ** 3 / speed
        return a

    monkeypatch.setattr(machine.time, 'perf_counter', lambda: clock[0])
    monkeypatch.setattr(machine.torch, 'mm', mm)
    flops, source = peak_flops('cpu', torch.float32, seconds=1.0)
    assert work[0] <= 1.4 * speed and max(sizes) <= 4096, (work[0] / speed, sizes)
    assert flops == pytest.approx(speed) and f"{len(sizes)} square float32 matmuls" in source


def test_mfu_never_exceeds_one_a_faster_step_raises_the_peak():
    peak = Peak(1e11, 'measured')
    assert peak.mfu(5e10) == (0.5, None)
    mfu, note = peak.mfu(1.2e11)
    assert mfu == 1.0 and 'raised from 0.100 to 0.120 TFLOP/s: a step ran faster than measured' in note
    assert peak.flops == 1.2e11 and peak.source == 'the fastest step so far'
    assert peak.mfu(6e10) == (0.5, None)
    assert Peak(None, 'no table entry').mfu(1e12) == (None, None)


def test_a_resume_keeps_the_saved_dtype(tiny_teacher, tiny_data, tmp_path):
    """Trained in the dtype that auto would not pick here, then resumed with dtype='auto': the checkpoint's
    dtype stays (a resumed run computes exactly as before), on a CPU of either kind."""
    other = 'float32' if choose_dtype('auto', 'cpu', 32)[0] == 'bfloat16' else 'bfloat16'
    out = tmp_path / 'out'
    first = run('train.py', *tiny_args(tiny_teacher, tiny_data, out, max_iters=2, eval_interval=2, dtype=other))
    assert f'dtype {other}, as asked' in first
    again = run('train.py', *tiny_args(tiny_teacher, tiny_data, out, max_iters=4, eval_interval=2, dtype='auto'),
                '--init_from=resume')
    assert f'dtype {other}, as the checkpoint was trained' in again
    assert torch.load(out / 'ckpt.pt', weights_only=True)['config']['dtype'] == other
    assert json.loads((out / 'config.json').read_text())['dtype'] == other
    assert all(r['mfu'] is None or 0 < r['mfu'] <= 1 for r in records(out) if 'loss' in r)


def test_a_targets_cache_made_in_one_dtype_is_refused_in_another(tiny_teacher, tiny_data, tmp_path):
    from teacher import build_targets, targets_dir
    data = tmp_path / 'data'
    data.mkdir()
    for name in ('train.bin', 'val.bin', 'meta.json'):
        shutil.copy(Path(tiny_data) / name, data / name)
    build_targets(tiny_teacher, data, 4, 1.0, 64, batch_size=2, max_blocks=2, dtype=torch.float32)
    out = targets_dir(data, 4, 1.0, 64)
    assert json.loads((out / 'meta.json').read_text())['dtype'] == 'float32'
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match=r'computed in float32, and this run computes in bfloat16; pass --dtype=float32'):
        build_targets(tiny_teacher, data, 4, 1.0, 64, batch_size=2, max_blocks=2, dtype=torch.bfloat16)
    (out / 'meta.json').unlink()  # a partial build, as a killed run leaves it: its progress file says float32
    (out / 'progress-0.json').write_text(json.dumps({'batches': [0], 'dtype': 'float32'}))
    with pytest.raises(SystemExit, match='computed in float32'):
        build_targets(tiny_teacher, data, 4, 1.0, 64, batch_size=2, max_blocks=2, dtype=torch.bfloat16)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != 'progress-0.json'} == \
        {k: v for k, v in before.items() if k != 'meta.json'}  # nothing was overwritten


def test_agent_data_answered_in_one_dtype_is_refused_in_another(tiny_teacher, tiny_examples, tmp_path):
    """The agent data records the dtype the teacher answered in; training in another is one line, nothing written."""
    data = tmp_path / 'examples'
    shutil.copytree(tiny_examples, data)
    meta = json.loads((data / 'meta.json').read_text())
    (data / 'meta.json').write_text(json.dumps({**meta, 'teacher_dtype': 'bfloat16'}))
    out = tmp_path / 'out'
    import subprocess
    import sys
    from test_train import ROOT
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), *tiny_args(tiny_teacher, data, out, dtype='float32')],
                       capture_output=True, text=True, timeout=HANG_S)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "answers generated in bfloat16, and this run computes in float32" in last
    assert '--dtype=bfloat16' in last and not out.exists()
