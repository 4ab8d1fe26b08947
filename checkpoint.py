"""
Checkpoints: everything a resumed run needs, written so that no reader, crash or power cut ever
sees half of one, and read back with weights_only=True. Also the one atomic writer every file of
indra goes through (token files, caches, logs).

    state = checkpoint.snapshot(parts, progress, data_gen, cuda, config=config, ...)   # containers, tensors
    checkpoint.save(out / 'ckpt.pt', state)
    ckpt = checkpoint.load_checkpoint(out / 'ckpt.pt')                    # one line for any unreadable file
    model, ckpt = checkpoint.load_student(out / 'best.pt', ema=True)      # the student to sample or export
    progress = checkpoint.restore(ckpt, parts, data_gen, cuda, where)     # weights, optimizer, scaler, EMA, RNG

parts: {'model': ..., 'aux': ..., 'optimizer': ..., 'scaler': ..., 'ema': ... or None}, each with state_dict();
progress: the loop's counters (iter_num, evaluated, best_val, bad_evals, skipped_total). A resumed run
draws the same batches, dropout masks and samples as the uninterrupted one: every RNG is saved beside
the weights and restored with them (seed 002 resumed with fresh weights and the same data order).
"""
import functools
import json
import os
import random
import signal
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from machine import all_sum

CHECKPOINT_KEYS = ('model', 'model_args', 'config', 'iter_num')
PROGRESS = ('iter_num', 'evaluated', 'best_val', 'bad_evals', 'skipped_total')
SHAPE_KEYS = ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'head_dim', 'mlp', 'mlp_hidden',
              'qkv_bias', 'tie_head', 'rope_base', 'norm_eps', 'recursions', 'act', 'ltm', 'ltm_dim',
              'ltm_decay')  # what a resume must match


def fail(msg):
    raise SystemExit(f"indra: {msg}")


@contextmanager
def atomic_file(path):
    """A file object that becomes `path` only once it is complete: written to a temporary file beside it,
    flushed and fsynced, renamed over path with os.replace, and the directory synced (a rename survives a
    power cut only then). The temporary file is named for this process, so DDP ranks never share one."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic(path, data):
    """Write bytes to path atomically (atomic_file)."""
    with atomic_file(path) as f:
        f.write(data)


def write_json(path, obj):
    write_atomic(path, (json.dumps(obj, indent=2) + '\n').encode('utf-8'))


def save(path, state):
    with atomic_file(path) as f:
        torch.save(state, f)


def load_checkpoint(path):
    """A checkpoint written by train.py, loaded with weights_only=True (tensors and plain containers only, so a
    file carrying pickled code is refused). Every way it can be unreadable is one SystemExit line naming the file."""
    path = Path(path)
    if not path.is_file():
        fail(f"checkpoint {path} not found; train one with python train.py config/shakespeare.py or pass the path "
             f"of a best.pt / ckpt.pt")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many kinds here (zip, pickle, EOF, key errors): each becomes one line
        lines = str(e).strip().splitlines() or [type(e).__name__]
        found = [l.split('Unsupported global: ')[1].split(' was ')[0] for l in lines if 'Unsupported global: ' in l]
        if found:  # weights_only met a Python object that is not a tensor or a plain container
            raise SystemExit(f"indra: refusing {path}: it carries pickled Python objects that a safe load does not "
                             f"allow ({found[0][:120]}); only checkpoints written by train.py are accepted") from None
        raise SystemExit(f"indra: {path} cannot be read ({type(e).__name__}: {lines[0].split('. ')[0][:120]}); it is "
                         f"truncated or not a checkpoint: use another, e.g. the best.pt or ckpt.pt beside it") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        fail(f"{path} is not a train.py checkpoint (no {', '.join(missing)}); pass a best.pt or ckpt.pt written by "
             f"train.py")
    return ckpt


def load_student(path, ema=False):
    """(the student in eval mode on CPU, the checkpoint): its weights, or with ema its EMA of them (one line when
    it has none, or when they do not fit the model)."""
    from model import Indra, IndraConfig
    ckpt = load_checkpoint(path)
    model = Indra(IndraConfig(**ckpt['model_args']))
    load_weights(model, ckpt, path, ema, "drop --ema")
    return model.eval(), ckpt


def load_weights(model, ckpt, path, ema=False, fix="drop --ema"):
    """Put the checkpoint's student weights into model, or with ema its EMA of them: one line when it has none
    (fix: what to do then), or when they do not fit the model."""
    from optim import EMA
    model.load_state_dict(ckpt['model'])
    if ema:
        if ckpt.get('ema') is None:
            fail(f"{path} has no EMA weights (trained with ema_decay=0); {fix}")
        shadow = EMA(model, ckpt['ema']['decay'])
        try:
            shadow.load_state_dict(ckpt['ema'], path)
        except ValueError as e:  # names the tensor that does not fit (seed 002's EMA crash, as one line)
            fail(str(e))
        shadow.copy_to(model)


@functools.cache  # the same files at every save of a run: written out once, on the first
def tokenizer_files(tokenizer):
    """{file name: text}: the tokenizer as save_pretrained writes it (tokenizer.json, tokenizer_config.json, the
    chat template), kept in every checkpoint so that export.py can write it beside the weights after the teacher
    is gone (a temporary directory, a hub id no longer cached). ~0.04 s and 3.4 MB for SmolLM2's 49,152 tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding='utf-8') for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def open_run(out_path, init_from, overwrite):
    """The checkpoint a run resumes (None for a fresh one), or one line when out_path does not fit init_from.
    Called before anything is written: a fresh run never overwrites a checkpoint unless told to, and a stage
    (init_from a checkpoint's path) never starts from its own out_dir's."""
    ckpt = Path(out_path) / 'ckpt.pt'
    if init_from.endswith('.pt') and Path(init_from).resolve() in (ckpt.resolve(), ckpt.with_name('best.pt').resolve()):
        fail(f"--init_from={init_from} is this run's own checkpoint (--out_dir={out_path}); continue it with "
             f"--init_from=resume, or start a new stage from it in another --out_dir")
    if init_from != 'resume' and ckpt.exists() and not overwrite:
        fail(f"{ckpt} exists; continue it with --init_from=resume, or start over with another --out_dir or "
             f"--overwrite=True")
    if init_from == 'resume' and not ckpt.exists():
        fail(f"--init_from=resume but {ckpt} does not exist; train from scratch first")
    return load_checkpoint(ckpt) if init_from == 'resume' else None  # readable? fail now, not later


def resume_shape(ckpt, model_args, where, fix="resume with the checkpoint's settings"):
    """The model_args a resume builds: the checkpoint's shape. A shape setting of 0 means the checkpoint's value
    (as it meant the teacher's for init_from='teacher'), and so do mlp, qkv_bias, tie_head, rope_base and norm_eps
    for a student that started from another model (they were that model's); any other setting that differs is one
    line naming them all, block_size too (the data's blocks must fit the rotary phases the student was built
    with). Settings newer than the checkpoint take their defaults, which it was trained with."""
    from model import SIZES, IndraConfig
    defaults = {f.name: f.default for f in fields(IndraConfig)}
    saved = {**defaults, **ckpt['model_args']}
    keep = [k for k in SHAPE_KEYS if k not in SIZES + ('block_size',)] if ckpt.get('inherited') else []
    asked = {k: saved[k] if k in keep or (k in SHAPE_KEYS and v == 0 and not isinstance(v, bool)) else v
             for k, v in {**defaults, **model_args}.items()}
    mine, theirs = asdict(IndraConfig(**asked)), asdict(IndraConfig(**saved))  # 0s resolved alike: head_dim, ...
    differ = [k for k in SHAPE_KEYS if mine[k] != theirs[k]]
    differ = [k for k in differ if asked[k] != saved[k]] or differ  # name what was set, not what followed from it
    if differ:
        fail(f"{where} holds a student with " + ", ".join(f"{k}={theirs[k]}" for k in differ)
             + " but this run asks for " + ", ".join(f"{k}={mine[k]}" for k in differ)
             + f"; {fix}")
    return asked


def rng_state(data_gen, cuda):
    """Every random state a run draws from: the batch order (data_gen), torch (dropout, sampling), Python,
    NumPy, and CUDA's on a GPU run. NumPy's is kept as a tensor and a list (weights_only loads those)."""
    numpy_state = np.random.get_state()
    rng = {'data': data_gen.get_state(), 'torch': torch.get_rng_state(), 'python': list(random.getstate()),
           'numpy': torch.from_numpy(numpy_state[1].copy()), 'numpy_pos': list(numpy_state[2:])}
    if cuda:
        rng['cuda'] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng, data_gen, cuda):
    data_gen.set_state(rng['data'])
    torch.set_rng_state(rng['torch'])
    if cuda and 'cuda' in rng:
        torch.cuda.set_rng_state_all(rng['cuda'])
    random.setstate((rng['python'][0], tuple(rng['python'][1]), rng['python'][2]))
    np.random.set_state(('MT19937', rng['numpy'].numpy(), *rng['numpy_pos']))


def snapshot(parts, progress, data_gen, cuda, **extra):
    """Everything a resume needs: each part's state_dict (None for an absent EMA), the loop's progress, every
    RNG, and extra (the model's arguments, the config, the tokenizer a sampler needs, ...)."""
    return {**{k: None if p is None else p.state_dict() for k, p in parts.items()},
            **{k: progress[k] for k in PROGRESS}, 'rng': rng_state(data_gen, cuda), **extra}


def restore(ckpt, parts, data_gen, cuda, where):
    """Load a checkpoint into the parts of a run built with its settings, and set every RNG as it was; returns
    the loop's progress. A run whose auxiliary modules or EMA differ from the checkpoint's is one line."""
    model, aux, ema = parts['model'], parts['aux'], parts['ema']
    model.load_state_dict(ckpt['model'])
    saved_aux = ckpt.get('aux', {})
    if set(saved_aux) != set(aux.state_dict()):
        fail(f"{where} was trained with {sorted({k.split('.')[0] for k in saved_aux}) or 'no'} auxiliary modules, "
             f"this run asks for {sorted(aux.keys()) or 'none'}; resume with the checkpoint's feature_weight and "
             f"student_tokenizer")
    aux.load_state_dict(saved_aux)
    parts['optimizer'].load_state_dict(ckpt['optimizer'])
    parts['scaler'].load_state_dict(ckpt['scaler'])
    if ema is not None:
        if ckpt.get('ema') is None:
            fail(f"{where} has no EMA (it was trained with ema_decay=0); resume with --ema_decay=0")
        try:
            ema.load_state_dict(ckpt['ema'], where)
        except ValueError as e:
            fail(str(e))
    set_rng_state(ckpt['rng'], data_gen, cuda)
    return {k: ckpt[k] for k in PROGRESS}


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM asks the run to finish its optimizer step, write ckpt_path and exit 0: signal holds
    the signal's name once one came (train.py looks after each step). A second one stops at once, without saving."""

    def __init__(self, ckpt_path):
        self.signal, self.ckpt_path = None, ckpt_path
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: finishing this step, then writing {self.ckpt_path} (send it again to stop at once, "
              f"without saving)", flush=True)

    def requested(self, ddp):
        """Whether to stop after this step: a signal came to this rank or, under torchrun, to any other."""
        if ddp and all_sum(torch.tensor(float(self.signal is not None))) > 0:
            self.signal = self.signal or 'a signal to another rank'
        return self.signal is not None

    def exit(self, step, argv):
        """After the checkpoint is written: say how to resume, and exit 0."""
        args = ' '.join(a for a in argv if not a.startswith('--init_from='))
        print(f"stopped by {self.signal} after step {step}: {self.ckpt_path} holds everything; resume with\n"
              f"  python train.py {args} --init_from=resume")
        sys.exit(0)


def start_log(out_path, config, resume, iter_num, evaluated):
    """Write out_path/config.json for this run; remove a fresh run's old log.jsonl and training.png, or cut a
    resumed run's log back to what the checkpoint holds (trim_log)."""
    out_path.mkdir(parents=True, exist_ok=True)
    write_json(out_path / 'config.json', config)
    if resume:
        trim_log(out_path, iter_num, evaluated)
    else:
        (out_path / 'log.jsonl').unlink(missing_ok=True)
        (out_path / 'training.png').unlink(missing_ok=True)


def trim_log(out_path, iter_num, evaluated):
    """On resume, keep only the records the checkpoint has lived through (a run killed after its last checkpoint
    logged steps that will run again) and drop a line cut short by the kill."""
    path = Path(out_path) / 'log.jsonl'
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
