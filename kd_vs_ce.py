"""
Does distillation beat plain training? Train the same student on the same tokens with the teacher
(kd_weight as in the config) and without it (kd_weight=0), for several seeds, then evaluate every
final checkpoint on the whole held-out split with eval.py and compare.

    python kd_vs_ce.py                                   # the CPU quickstart, 3 seeds: ~50 min on 2 cores
    python kd_vs_ce.py --seeds 1337 1338 --out_dir out-kd-vs-ce -- --max_iters=100

A seed fixes the initial weights and the batch order, so the KD and CE-only runs of one seed see the
same tokens in the same order; they differ only in the loss. Runs already finished are kept and a run
that was interrupted is resumed, so the command can be run again after a stop. Arguments after --
go to every train.py run.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--config', default='config/shakespeare.py')
parser.add_argument('--seeds', type=int, nargs='+', default=[1337, 1338, 1339])
parser.add_argument('--out_dir', default='out-kd-vs-ce')
parser.add_argument('train_args', nargs='*', help='extra --key=value settings for train.py, after --')
args = parser.parse_args()
sys.stdout.reconfigure(line_buffering=True)  # every line shows at once, also in a file or a pipe

config = {}
exec((ROOT / args.config).read_text(), {}, config)  # only to read kd_weight and max_iters; train.py reads it again
for a in args.train_args:
    if a.startswith(('--kd_weight=', '--max_iters=')):
        key, value = a[2:].split('=', 1)
        config[key] = float(value) if key == 'kd_weight' else int(value)
kd = config.get('kd_weight', 0.5)
if kd == 0:
    raise SystemExit(f"indra: {args.config} trains with kd_weight=0, so both arms would be CE-only; pass a config "
                     f"with kd_weight > 0")
max_iters = config.get('max_iters', 200)
out = Path(args.out_dir)

runs = [(seed, w) for seed in args.seeds for w in (kd, 0.0)]
for i, (seed, w) in enumerate(runs):
    run_dir = out / f"kd{w:g}-seed{seed}"
    ckpt = run_dir / 'ckpt.pt'
    state = load_checkpoint(ckpt) if ckpt.exists() else None  # an unreadable one is one line
    if state is not None and state['iter_num'] >= max_iters and state['evaluated']:
        print(f"[{i + 1}/{len(runs)}] {run_dir}: finished earlier, kept")
        continue
    cmd = [sys.executable, str(ROOT / 'train.py'), args.config, f'--seed={seed}', f'--kd_weight={w}',
           f'--out_dir={run_dir}', '--eval_interval=1000000', '--watch_tokens=0', '--plot=False', *args.train_args,
           *(['--init_from=resume'] if state is not None else [])]
    print(f"[{i + 1}/{len(runs)}] {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)

ckpts = [str(out / f"kd{w:g}-seed{seed}" / 'ckpt.pt') for seed, w in runs]
subprocess.run([sys.executable, str(ROOT / 'eval.py'), '--ckpt', *ckpts, '--json', str(out / 'eval.json')],
               cwd=ROOT, check=True)

results = json.loads((out / 'eval.json').read_text())
ce = {(s['seed'], s['kd_weight']): s['ce'] for s in results['students']}
print(f"\nheld-out CE (nats/token) after {max_iters} steps on the same tokens, {results['teacher']['tokens']:,} "
      f"held-out tokens; the teacher: {results['teacher']['ce']:.4f}")
print(f"| seed | KD (kd_weight={kd:g}) | CE-only (kd_weight=0) | gap |")
print("| ---: | ---: | ---: | ---: |")
gaps = []
for seed in args.seeds:
    gaps.append(ce[seed, 0.0] - ce[seed, kd])
    print(f"| {seed} | {ce[seed, kd]:.4f} | {ce[seed, 0.0]:.4f} | {gaps[-1]:+.4f} |")
kd_runs, ce_runs = [ce[s, kd] for s in args.seeds], [ce[s, 0.0] for s in args.seeds]
print(f"| mean | {sum(kd_runs) / len(kd_runs):.4f} | {sum(ce_runs) / len(ce_runs):.4f} | {sum(gaps) / len(gaps):+.4f} |")
print(f"every KD run beat every CE-only run: {'yes' if max(kd_runs) < min(ce_runs) else 'no'} "
      f"(worst KD {max(kd_runs):.4f}, best CE-only {min(ce_runs):.4f})")
