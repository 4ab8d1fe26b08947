"""
Draw a run's records (out_dir/log.jsonl) into out_dir/training.png: train and held-out CE with the
teacher's held-out CE as the line to aim for, KL to the teacher, learning rate, KD weight and
temperature, gradient norm with skipped steps, and the mode-collapse watch. train.py redraws it at
every evaluation; run it by hand on any run, finished or not:

    python plot.py out/
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only, no display needed
import matplotlib.pyplot as plt


def read(out_dir):
    """Step records and evaluation records; a line cut short by a crash is left out."""
    steps, evals = [], []
    for line in (Path(out_dir) / 'log.jsonl').read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        (evals if 'val_ce' in r else steps).append(r)
    return steps, evals


def smooth(values, n=10):
    """Trailing mean over n points: the per-step loss is noisy."""
    return [sum(values[max(0, i - n + 1):i + 1]) / (i + 1 - max(0, i - n + 1)) for i in range(len(values))]


def draw(out_dir):
    steps, evals = read(out_dir)
    col = lambda rs, k: ([r['iter'] for r in rs if r.get(k) is not None], [r[k] for r in rs if r.get(k) is not None])
    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    ax = ax.ravel()

    it, ce = col(steps, 'ce')
    ax[0].plot(it, ce, color='tab:blue', alpha=0.25, lw=0.8)
    ax[0].plot(it, smooth(ce), color='tab:blue', label='train CE (10-step mean)')
    ax[0].plot(*col(evals, 'val_ce'), 'o-', color='tab:orange', label='val CE')
    if any('ema_val_ce' in r for r in evals):
        ax[0].plot(*col(evals, 'ema_val_ce'), 's--', color='tab:green', label='val CE, EMA weights')
    ax[0].plot(*col(evals, 'teacher_val_ce'), ':', color='black', label='teacher val CE')
    ax[0].set_title('cross-entropy (nats/token)')

    it, kl = col(steps, 'kl')
    ax[1].plot(it, kl, color='tab:purple', alpha=0.25, lw=0.8)
    ax[1].plot(it, smooth(kl), color='tab:purple', label='train KL at training T')
    ax[1].plot(*col(evals, 'val_kl'), 'o-', color='tab:orange', label='val KL at T=1')
    ax[1].set_title('KL(teacher || student)')

    ax[2].plot(*col(steps, 'lr'), color='tab:red', label='learning rate')
    ax[2].set_title('learning rate')
    ax[2].ticklabel_format(axis='y', style='sci', scilimits=(0, 0))

    ax[3].plot(*col(steps, 'kd_weight'), color='tab:brown', label='KD weight')
    ax[3].set_ylim(0, 1.05)
    twin = ax[3].twinx()
    twin.plot(*col(steps, 'temperature'), color='tab:cyan', label='temperature')
    twin.set_ylabel('temperature')
    twin.legend(loc='lower right', fontsize=8)
    ax[3].set_title('KD weight and temperature')

    it, g = col(steps, 'grad_norm')
    finite = [(i, v) for i, v in zip(it, g) if v == v and abs(v) != float('inf')]
    ax[4].plot([i for i, _ in finite], [v for _, v in finite], color='tab:gray', lw=0.8, label='grad norm (before clipping)')
    skipped = [r['iter'] for r in steps if r.get('skipped')]
    for i in skipped:
        ax[4].axvline(i, color='red', alpha=0.6, lw=1)
    ax[4].set_yscale('log')
    ax[4].set_title(f"gradient norm; skipped steps in red: {len(skipped)}")

    ax[5].plot(*col(evals, 'watch_distinct_2'), 'o-', color='tab:green', label='distinct-2 (lowest prompt)')
    ax[5].plot(*col(evals, 'watch_top_share'), 'o-', color='tab:red', label='top-token share (highest prompt)')
    ax[5].axhspan(0, 0.3, color='red', alpha=0.07)
    ax[5].set_ylim(0, 1.05)
    ax[5].set_title('collapse watch: distinct-2 < 0.3 or top share > 0.5')

    for a in ax:
        a.set_xlabel('step')
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8, loc='upper right' if a is not ax[3] else 'upper left')
    last = steps[-1] if steps else {}
    fig.suptitle(f"{Path(out_dir).resolve().name}: step {last.get('iter', 0)}, "
                 f"{last.get('tokens_per_s', 0):,.0f} tok/s" + (f", MFU {last['mfu']:.1%}" if last.get('mfu') else ''))
    fig.tight_layout()
    path = Path(out_dir) / 'training.png'
    tmp = path.with_name('training.tmp.png')
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path


if __name__ == '__main__':
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / 'log.jsonl').is_file():
        raise SystemExit("indra: usage: python plot.py OUT_DIR (a directory with the log.jsonl that train.py writes)")
    print(f"wrote {draw(sys.argv[1])}")
