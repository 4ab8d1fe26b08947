"""
Evaluate trained students against their teacher on the held-out split, all on the same tokens.

    python eval.py --ckpt out/best.pt
    python eval.py --ckpt out-kd/best.pt out-ce/best.pt --json eval.json      # several students, one table
    python eval.py --ckpt out-agent/best.pt                                   # + answers generated and graded

Per checkpoint, over every held-out token that counts (a text split is cut into windows of
block_size tokens, each target counted once; example data counts the answer tokens only):
student and teacher CE and perplexity, bits per byte (CE over the bytes the tokens stand for:
comparable across tokenizers), KL(teacher || student) at T=1, and top-1 agreement with the
teacher. On chat example data (data/agent) the student also answers every held-out prompt
greedily, and its answers are graded by the dataset's own rules (score() in its prepare.py)
beside the teacher's greedy answers recorded there: exact match, agreement with the teacher,
valid JSON on tool calls, and seed 001's signs of mode collapse. A table is printed; --json
writes everything.

What a quantized teacher costs: --teacher_vs loads the same teacher a second way (4bit or 8bit
with bitsandbytes on CUDA, or another dtype) and reports it as one more row, its KL measured
from the teacher as loaded in --dtype; no checkpoint needed:

    python eval.py --teacher_vs=4bit --data_dir=data/shakespeare/smollm2-135m-instruct
"""
import argparse
import importlib.util
import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import AutoConfig

import vocab
from checkpoint import load_checkpoint
from data import pad_examples
from losses import counted_tokens
from machine import DTYPES, TORCH_DTYPE, autocast as autocast_for, choose_dtype, pick_device
from model import Indra, IndraConfig
from monitor import collapsed, repetition
from teacher import load_teacher, resolve, teacher_hidden, teacher_slug
from tokenizer import chat_batch, token_bytes, tokenizer_hash

ROOT = Path(__file__).resolve().parent


def data_dir(config):
    path = Path(config['data_dir']) if config['data_dir'] else ROOT / 'data' / config['dataset'] / teacher_slug(config['teacher'])
    if not (path / 'meta.json').exists():
        raise SystemExit(f"indra: no token files in {path}; make them with python data/{config['dataset']}/prepare.py "
                         f"--teacher={config['teacher']}")
    return path


def batches(path, meta, split, block_size, batch_size, max_tokens):
    """(ids, attention mask, loss mask) batches covering the split. A text stream: windows of block_size tokens
    that overlap by one, so every token after the first is a target exactly once. Examples: one per row,
    right-padded, shortest first."""
    data = np.memmap(path / f'{split}.bin', dtype=meta['dtype'], mode='r')
    if meta.get('format') != 'examples':
        n = min(len(data), max_tokens + 1) if max_tokens else len(data)
        starts = list(range(0, n - 1, block_size - 1))
        for i in range(0, len(starts), batch_size):
            rows = [torch.from_numpy(data[s:min(s + block_size, n)].astype(np.int64)) for s in starts[i:i + batch_size]]
            L = max(len(r) for r in rows)
            x, am = torch.zeros(len(rows), L, dtype=torch.long), torch.zeros(len(rows), L, dtype=torch.long)
            for b, r in enumerate(rows):
                x[b, :len(r)], am[b, :len(r)] = r, 1
            yield x, am, None
        return
    mask = np.memmap(path / f'{split}.mask.bin', dtype=np.uint8, mode='r')
    spans = np.fromfile(path / f'{split}.idx', dtype=np.int64).reshape(-1, 2)
    order = np.argsort(spans[:, 1], kind='stable')
    for i in range(0, len(order), batch_size):
        yield pad_examples(data, mask, spans[order[i:i + batch_size]].tolist(), block_size, meta['eos_id'])


@torch.no_grad()
def token_metrics(students, teacher, tok_bytes, path, meta, split, block_size, batch_size, max_tokens, device, autocast):
    """Sums over the counted targets for every student and the teacher -> the metrics per model."""
    t_model, t_head = teacher[0], teacher[1].float()
    sums = defaultdict(float)
    for x, am, lm in batches(path, meta, split, block_size, batch_size, max_tokens):
        x, am = x.to(device), am.to(device)
        count = counted_tokens(x, am, None if lm is None else lm.to(device))[:, :-1].bool()  # the loss's own rule
        y = x[:, 1:][count]  # (N,) the targets that count
        with autocast:
            th = teacher_hidden(t_model, x, am)[:, :-1][count]
        sums['tokens'] += len(y)
        sums['bytes'] += tok_bytes[y.cpu()].sum().item()
        hs = []
        for model in students:
            with autocast:
                hs.append(model.hidden_states(x, am)[:, :-1][count])
        for i in range(0, len(y), 512):  # rows at a time: (512, V) logits, never (tokens, V)
            yi = y[i:i + 512]
            t_logp = F.log_softmax(th[i:i + 512].float() @ t_head.T, -1)
            sums['teacher_nll'] += -t_logp.gather(1, yi[:, None]).sum().item()
            for k, (model, h) in enumerate(zip(students, hs)):
                s_logp = F.log_softmax(model.head(h[i:i + 512].float()).float(), -1)
                sums[k, 'nll'] += -s_logp.gather(1, yi[:, None]).sum().item()
                sums[k, 'kl'] += (t_logp.exp() * (t_logp - s_logp)).sum().item()
                sums[k, 'top1'] += (s_logp.argmax(-1) == t_logp.argmax(-1)).sum().item()
    n, nbytes = sums['tokens'], sums['bytes']
    assert n > 0, f"no held-out tokens count in {path / split}.bin; check the data"
    out = [{**rates(sums[k, 'nll'], n, nbytes), 'kl': sums[k, 'kl'] / n, 'top1_agreement': sums[k, 'top1'] / n}
           for k in range(len(students))]
    return out, {**rates(sums['teacher_nll'], n, nbytes), 'tokens': int(n), 'bytes': int(sums['bytes'])}


def rates(nll, n, nbytes):
    """CE, perplexity and bits per byte from a summed NLL (nats) over n targets that stand for nbytes bytes."""
    return {'ce': nll / n, 'ppl': math.exp(nll / n), 'bits_per_byte': nll / (math.log(2) * max(nbytes, 1))}


@torch.no_grad()
def own_vocab_metrics(model, tok, path, split, block_size, batch_size, max_tokens, device, autocast):
    """A student with its own tokenizer, on its own token files of the same held-out text (path: student-bpeN/):
    CE, perplexity and bits per byte. Its tokens cover the same bytes as the teacher's, so bits per byte compare
    it with the teacher and with the other students; KL and top-1 agreement need one vocabulary, so none here."""
    lengths = torch.from_numpy(vocab.token_lengths(tok))
    lengths[tok.token_to_id(vocab.EOS)] = 0  # as token_bytes counts the teacher's eos: no text
    nll, n, nbytes = 0.0, 0, 0
    for x, am, _ in batches(path, json.loads((path / 'meta.json').read_text()), split, block_size, batch_size,
                            max_tokens):
        x, am = x.to(device), am.to(device)
        count = counted_tokens(x, am)[:, :-1].bool()
        y = x[:, 1:][count]
        with autocast:
            h = model.hidden_states(x, am)[:, :-1][count]
        for i in range(0, len(y), 512):
            logp = F.log_softmax(model.head(h[i:i + 512].float()).float(), -1)
            nll -= logp.gather(1, y[i:i + 512, None]).sum().item()
        n, nbytes = n + len(y), nbytes + lengths[y.cpu()].sum().item()
    return {**rates(nll, n, nbytes), 'kl': None, 'top1_agreement': None, 'tokens': n, 'bytes': nbytes}


class TeacherAsStudent(nn.Module):
    """A teacher loaded another way (quantized, another dtype), measured against the reference teacher on the
    same tokens through the students' interface: hidden_states, then head."""

    def __init__(self, model):
        super().__init__()
        self.model, self.weight = model, model.get_output_embeddings().weight  # bitsandbytes keeps the head unquantized

    def hidden_states(self, x, attention_mask=None):
        return teacher_hidden(self.model, x, attention_mask)

    def head(self, h):
        return h.float() @ self.weight.float().T


def load_grader(dataset):
    """The dataset's prepare.py, loaded by path, when it grades answers (defines score); else None."""
    path = ROOT / 'data' / dataset / 'prepare.py'
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f'prepare_{dataset}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module if hasattr(module, 'score') else None


@torch.no_grad()
def answer(model, tokenizer, enc, prompts, eos_id, max_new_tokens, batch_size, device, autocast):
    """The student's greedy answers to chat prompts: [(token ids, text)], prompts left-padded in batches."""
    out = []
    for i in range(0, len(prompts), batch_size):
        x, am = chat_batch(enc, tokenizer, prompts[i:i + batch_size], eos_id, device)
        with autocast:
            new = model.generate(x, max_new_tokens, temperature=0, eos_id=eos_id, attention_mask=am)
        new = new[:, x.shape[1]:].tolist()
        for row in new:
            row = row[:row.index(eos_id)] if eos_id in row else row
            out.append((row, tokenizer.decode(row, skip_special_tokens=True).strip()))
    return out


def answer_metrics(grader, examples, responses, ids=None):
    """Exact match against the known answers, valid JSON on tool calls, and seed 001's collapse signs, for one
    model's responses (ids: their token ids, for the repetition statistics)."""
    right = [grader.score(e, r) for e, r in zip(examples, responses)]
    tools = [r for e, r in zip(examples, responses) if e['check'] == 'json']
    kinds = sorted({e['kind'] for e in examples})
    m = {'exact_match': float(np.mean(right)),
         'by_kind': {k: float(np.mean([ok for e, ok in zip(examples, right) if e['kind'] == k])) for k in kinds},
         'valid_json': float(np.mean([grader.parse_json(r) is not None for r in tools])) if tools else None,
         'distinct_answers': len(set(responses)) / len(responses),
         'most_common_answer': Counter(responses).most_common(1)[0][1] / len(responses)}
    if ids is not None:
        stats = [repetition(r) for r in ids if len(r) >= 2]
        m.update({'distinct_2': float(np.mean([s['distinct_2'] for s in stats])) if stats else 0.0,
                  'top_token_share': float(np.mean([s['top_share'] for s in stats])) if stats else 0.0,
                  'collapsed': float(np.mean([collapsed(s) for s in stats])) if stats else 1.0})
    return m


def agreement(grader, examples, student, teacher):
    """Share of prompts where the student's extracted answer is the teacher's (both must have one)."""
    same = []
    for e, s, t in zip(examples, student, teacher):
        mine = grader.extract(s, e['check'])
        same.append(mine is not None and mine == grader.extract(t, e['check']))
    return float(np.mean(same))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', nargs='*', default=[], help='checkpoints written by train.py')
    parser.add_argument('--split', default='val')
    parser.add_argument('--max_tokens', type=int, default=0, help='only the first N tokens of a text split; 0 = all')
    parser.add_argument('--batch_size', type=int, default=8, help='rows per forward pass')
    parser.add_argument('--max_answers', type=int, default=0, help='chat data: grade only the first N prompts; 0 = all')
    parser.add_argument('--device', default='auto', help="'auto': cuda when a GPU is visible, else cpu")
    parser.add_argument('--dtype', default='auto', choices=DTYPES,
                        help="'auto' measures the faster of bfloat16 and float32 here (machine.py)")
    parser.add_argument('--teacher_quantization', default='', help="'' = as trained; 'none' to run a 4-bit-trained "
                        "student's teacher unquantized (e.g. on CPU)")
    parser.add_argument('--teacher_vs', default='', choices=['', '4bit', '8bit', 'float32', 'bfloat16', 'float16'],
                        help="also load the teacher this way (quantized, or in this dtype) and measure it against "
                             "the teacher in --dtype on the same tokens: CE and KL")
    parser.add_argument('--teacher', default='smollm2-135m-instruct', help='the teacher, when no --ckpt is given')
    parser.add_argument('--data_dir', default='', help='token files, when no --ckpt is given')
    parser.add_argument('--json', default='', help="write the results here (default: eval.json beside the first "
                        "checkpoint, or in --data_dir)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # every line shows at once, also in a file or a pipe
    args.device = pick_device(args.device)

    if not args.ckpt and not (args.teacher_vs and args.data_dir):
        raise SystemExit("indra: nothing to evaluate; pass --ckpt out/best.pt [more.pt ...], or --teacher_vs=4bit "
                         "--data_dir=DIR to measure a quantized teacher alone")
    ckpts = [load_checkpoint(p) for p in args.ckpt]
    first = ckpts[0]['config'] if ckpts else {'teacher': args.teacher, 'teacher_quantization': 'none',
                                              'data_dir': args.data_dir, 'dataset': ''}
    for path, c in zip(args.ckpt[1:], ckpts[1:]):
        if c['tokenizer_hash'] != ckpts[0]['tokenizer_hash'] or data_dir(c['config']) != data_dir(first):
            raise SystemExit(f"indra: {path} was trained on other data or another tokenizer than {args.ckpt[0]}; "
                             f"evaluate them in separate runs")
    path = data_dir(first)
    if not (path / f'{args.split}.bin').exists():
        raise SystemExit(f"indra: {path} has no split {args.split!r} ({args.split}.bin); use --split=val or --split=train")
    # the dtype probe runs on the student's shapes (the teacher's, when only a teacher is measured)
    width = ckpts[0]['model_args']['n_embd'] if ckpts else \
        AutoConfig.from_pretrained(resolve(first['teacher'])).hidden_size
    args.dtype, line = choose_dtype(args.dtype, args.device, width)
    print(line)
    ptdtype = TORCH_DTYPE[args.dtype]
    autocast = autocast_for(args.device, args.dtype)
    print(f"loading teacher {first['teacher']}")
    t_model, tokenizer, enc = load_teacher(first['teacher'], dtype=ptdtype, device=args.device,
                                           quantization=args.teacher_quantization or first['teacher_quantization'])
    meta = json.loads((path / 'meta.json').read_text())
    want = ckpts[0]['tokenizer_hash'] if ckpts else meta['tokenizer_hash']
    if tokenizer_hash(tokenizer) != want:
        raise SystemExit(f"indra: the tokenizer of teacher {first['teacher']!r} is not the one {args.ckpt[0] if ckpts else path} "
                         f"was made with; point the teacher spec at the original")
    students, names = [], list(map(str, args.ckpt))
    for c in ckpts:
        m = Indra(IndraConfig(**c['model_args']))
        m.load_state_dict(c['model'])
        students.append(m.to(args.device).eval())
    block_size = min([m.config.block_size for m in students] or [256])
    if args.teacher_vs:  # one more row: the same teacher, quantized or in another dtype
        quantized = args.teacher_vs in ('4bit', '8bit')
        other = load_teacher(first['teacher'], dtype=ptdtype if quantized else getattr(torch, args.teacher_vs),
                             device=args.device, quantization=args.teacher_vs if quantized else 'none')[0]
        students.append(TeacherAsStudent(other))
        names.append(f"teacher {args.teacher_vs}")
    tok_bytes = token_bytes(tokenizer, t_model.get_output_embeddings().weight.shape[0])
    print(f"evaluating {len(ckpts)} student(s) and teacher {first['teacher']} on {path / args.split} "
          f"(block_size {block_size}, {args.device}, {args.dtype})")
    own = {i: Tokenizer.from_str(c['student_tokenizer']) for i, c in enumerate(ckpts) if c.get('student_tokenizer')}
    shared = [m for i, m in enumerate(students) if i not in own]  # the teacher's vocabulary: measured side by side
    per_shared, teacher = token_metrics(shared, (t_model, t_model.get_output_embeddings().weight), tok_bytes, path,
                                        meta, args.split, block_size, args.batch_size, args.max_tokens, args.device,
                                        autocast)
    per_student = []
    for i, m in enumerate(students):
        if i in own:
            spath = path / f"student-bpe{ckpts[i]['config']['student_tokenizer'][3:]}"
            per_student.append(own_vocab_metrics(m, own[i], spath, args.split, m.config.block_size,
                                                 args.batch_size, args.max_tokens, args.device, autocast))
        else:
            per_student.append(per_shared.pop(0))
    results = {'data': str(path / args.split), 'teacher': {'spec': first['teacher'], 'dtype': args.dtype,
                                                           **teacher}, 'students': []}
    for p, c, m in zip(args.ckpt, ckpts, per_student):
        results['students'].append({'ckpt': str(p), 'step': c['iter_num'], 'kd_weight': c['config']['kd_weight'],
                                    'seed': c['config']['seed'], **m})
    if args.teacher_vs:
        results['teacher_vs'] = {'as': args.teacher_vs, **per_student[-1]}
    print(f"\n{teacher['tokens']:,} held-out tokens ({teacher['bytes']:,} bytes)")
    print(f"{'model':<42} {'CE':>7} {'ppl':>9} {'bits/byte':>9} {'KL(t||s)':>9} {'top-1 agree':>11}")
    print(f"{'teacher ' + first['teacher'] + ' ' + args.dtype:<42} {teacher['ce']:7.4f} {teacher['ppl']:9.1f} "
          f"{teacher['bits_per_byte']:9.4f}")
    for name, s in zip(names, per_student):
        own_vocab = s['kl'] is None  # its own tokenizer: CE over its own tokens, no KL or agreement with the teacher
        print(f"{name[-42:]:<42} {s['ce']:7.4f} {s['ppl']:9.1f} {s['bits_per_byte']:9.4f} "
              + ("      (own tokenizer: CE per own token; compare bits/byte)" if own_vocab else
                 f"{s['kl']:9.4f} {s['top1_agreement']:11.1%}"))

    grader = load_grader(first['dataset']) if meta.get('chat') else None
    examples_path = path / f'{args.split}.jsonl'
    if grader is not None and examples_path.exists():
        examples = [json.loads(line) for line in examples_path.read_text(encoding='utf-8').splitlines()]
        examples = examples[:args.max_answers] if args.max_answers else examples
        t_answers = [e['response'] for e in examples]
        t_ids = [tokenizer(r, add_special_tokens=False).input_ids for r in t_answers]
        results['teacher']['answers'] = answer_metrics(grader, examples, t_answers, t_ids)
        print(f"\n{len(examples)} held-out prompts answered greedily (teacher: its answers recorded by prepare.py)")
        print(f"{'model':<42} {'exact':>6} {'= teacher':>9} {'JSON ok':>7} {'distinct-2':>10} {'top tok':>7} "
              f"{'collapsed':>9} {'most common':>11}")
        rows = [('teacher ' + first['teacher'], results['teacher']['answers'], None)]
        for s, m, c in zip(results['students'], students, ckpts):
            got = answer(m, tokenizer, enc, [e['prompt'] for e in examples], c['eos_id'], meta.get('max_new_tokens', 64),
                         32, args.device, autocast)
            s['answers'] = answer_metrics(grader, examples, [r for _, r in got], [i for i, _ in got])
            s['answers']['agreement'] = agreement(grader, examples, [r for _, r in got], t_answers)
            s['answers']['exact_match_vs_teacher'] = s['answers']['exact_match'] / max(
                results['teacher']['answers']['exact_match'], 1e-9)
            s['samples'] = [{'prompt': e['prompt'], 'student': r, 'teacher': e['response']}
                            for e, (_, r) in zip(examples[:20], got)]
            rows.append((s['ckpt'], s['answers'], s['answers']['agreement']))
        for name, a, agree in rows:
            print(f"{name[-42:]:<42} {a['exact_match']:6.1%} {'' if agree is None else f'{agree:.1%}':>9} "
                  f"{'' if a['valid_json'] is None else format(a['valid_json'], '.0%'):>7} {a['distinct_2']:10.2f} "
                  f"{a['top_token_share']:7.0%} {a['collapsed']:9.0%} {a['most_common_answer']:11.0%}")
        print("exact match by task: " + '; '.join(
            f"{k} " + '/'.join(f"{a['by_kind'][k]:.0%}" for _, a, _ in rows) for k in rows[0][1]['by_kind'])
            + "  (teacher/student...)")
        for s in results['students']:
            ratio, agree = s['answers']['exact_match_vs_teacher'], s['answers']['agreement']
            print(f"{s['ckpt']}: {ratio:.0%} of the teacher's exact match, same answer as the teacher on {agree:.0%}")
    out = Path(args.json) if args.json else (Path(args.ckpt[0]).parent if ckpts else path) / 'eval.json'
    out.write_text(json.dumps(results, indent=2) + '\n')
    print(f"\nwritten to {out}")


if __name__ == '__main__':
    main()
