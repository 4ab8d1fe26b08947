"""
Instruction data for the agent recipe, made here with no network: prompts from generators with
known answers, responses from the teacher itself through its chat template (sequence-level
distillation, Kim & Rush 2016: the student learns the teacher's answers, not the right ones).

    python data/agent/prepare.py                                  # embedded teacher: ~10 min on 2 CPU cores
    python data/agent/prepare.py --teacher=/path/to/model_dir --n_train=400 --n_val=40

Tasks (equal shares): arithmetic, word problems, counting words, comparing numbers, alphabetical
order, first letters, capital letters, reversing words, who speaks a Shakespeare line, which line
comes next, and tool calls answered with an exact JSON call. Held-out prompts are disjoint from the
training prompts, and their Shakespeare passages come from the held-out plays.

Into data/agent/<teacher slug>/, train.py's example format (meta.json format 'examples'):
  {split}.jsonl     one example per line: kind, prompt, answer (known), check, the teacher's response
  {split}.bin       chat-formatted tokens of every example, one after another
  {split}.idx       int64 (start, length) per example
  {split}.mask.bin  uint8 per token: 1 on the teacher's answer and its end-of-turn token, 0 on the prompt
  responses-*.jsonl the generation cache, appended batch by batch: an interrupted run goes on where it stopped
"""
import argparse
import importlib.util
import json
import os
import pathlib
import random
import re
import sys
import time
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, for teacher.py, from any working directory
import teacher as teacher_lib  # noqa: E402
from checkpoint import write_atomic  # noqa: E402
from tokenizer import chat_batch, chat_prompt, encode, tokenizer_hash  # noqa: E402
from machine import DTYPES, TORCH_DTYPE, choose_dtype, pick_device  # noqa: E402


def _shakespeare():
    """data/shakespeare/prepare.py, loaded by path: its plays and its held-out play list."""
    spec = importlib.util.spec_from_file_location('shakespeare_prepare', HERE.parent / 'shakespeare' / 'prepare.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shakespeare = _shakespeare()

# ---- prompts with known answers ------------------------------------------------
NAMES = ['Tom', 'Anna', 'Ravi', 'Mei', 'Lucas', 'Sara', 'Omar', 'Ines', 'Kofi', 'Yuki', 'Elena', 'Ben']
THINGS = ['apples', 'books', 'coins', 'pencils', 'stamps', 'marbles', 'cookies', 'shells', 'cards', 'eggs']
CITIES = ['Lisbon', 'Paris', 'Tokyo', 'Cairo', 'Lima', 'Oslo', 'Delhi', 'Nairobi', 'Toronto', 'Madrid',
          'Berlin', 'Seoul', 'Sydney', 'Quito', 'Dublin', 'Hanoi', 'Prague', 'Accra', 'Vienna', 'Manila',
          'Rome', 'Athens', 'Bogota', 'Dakar', 'Helsinki', 'Jakarta', 'Kyiv', 'Lagos', 'Mumbai', 'Santiago']
CURRENCIES = ['USD', 'EUR', 'JPY', 'GBP', 'INR', 'BRL', 'CAD']
TOOLS = {
    'get_weather': ('the current weather in a city', {'city': 'string'}),
    'convert_currency': ('convert an amount of money', {'amount': 'number', 'from': 'string', 'to': 'string'}),
    'set_timer': ('start a timer', {'minutes': 'number'}),
    'get_time': ('the local time in a city', {'city': 'string'}),
}


def arithmetic(rng, src):
    a, b, op = rng.randint(2, 60), rng.randint(2, 60), rng.choice('+-')
    a, b = (max(a, b), min(a, b)) if op == '-' else (a, b)
    return f"What is {a} {op} {b}? Answer with only the number.", str(a + b if op == '+' else a - b), 'number'


def word_problem(rng, src):
    name, thing, a, b = rng.choice(NAMES), rng.choice(THINGS), rng.randint(3, 30), rng.randint(2, 20)
    if rng.random() < 0.5:
        return (f"{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have now? "
                f"Answer with only the number.", str(a + b), 'number')
    a, b = max(a, b), min(a, b)
    return (f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have left? "
            f"Answer with only the number.", str(a - b), 'number')


def count_words(rng, src):
    words = rng.sample(src['words'], rng.randint(2, 7))
    return f"How many words are in this list: {' '.join(words)}? Answer with only the number.", str(len(words)), 'number'


def larger(rng, src):
    a, b = rng.sample(range(1, 100), 2)
    return f"Which number is larger, {a} or {b}? Answer with only the number.", str(max(a, b)), 'number'


def alphabetical(rng, src):
    a, b = rng.sample(src['words'], 2)
    return (f"Which word comes first in alphabetical order, {a} or {b}? Answer with only the word.",
            min(a, b), 'text')


def first_letter(rng, src):
    w = rng.choice(src['words'] + CITIES)
    return f"What is the first letter of the word '{w}'? Answer with only the letter.", w[0], 'text'


def capitals(rng, src):
    w = rng.choice(src['words'])
    return f"Write the word '{w}' in capital letters. Answer with only the word.", w.upper(), 'case'


def reverse_words(rng, src):
    words = rng.sample(src['words'], 3)
    return (f"Reverse the order of these words: {' '.join(words)}. Answer with only the words.",
            ' '.join(reversed(words)), 'text')


def speeches(text):
    """[(speaker, [lines])] of a cleaned play: a 'NAME:' line opens a speech, a blank line ends it."""
    out = []
    for block in text.split('\n\n'):
        lines = block.strip('\n').split('\n')
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Z' .-]+:", lines[0]):
            out.append((lines[0][:-1].title(), [line.strip() for line in lines[1:] if line.strip()]))
    return out


def who_speaks(rng, src):
    while True:  # three short consecutive speeches by different speakers
        play = rng.choice(src['speeches'])
        i = rng.randrange(len(play) - 3)
        chunk = play[i:i + 3]
        if len({s for s, _ in chunk}) == 3 and all(1 <= len(lines) <= 2 and len(' '.join(lines)) < 120
                                                   for _, lines in chunk):
            break
    passage = '\n'.join(f"{s}: {' '.join(lines)}" for s, lines in chunk)
    speaker, lines = rng.choice(chunk)
    return (f"Read this passage from a play:\n{passage}\n\nWho says \"{rng.choice(lines)}\"? "
            f"Answer with only the name.", speaker, 'text')


def next_line(rng, src):
    while True:  # one speech of 3 to 6 short lines
        _, lines = rng.choice(rng.choice(src['speeches']))
        if 3 <= len(lines) <= 6 and max(len(line) for line in lines) < 70 and len(set(lines)) == len(lines):
            break
    k = rng.randrange(len(lines) - 1)
    return ("Read these lines from a play:\n" + '\n'.join(lines) + f"\n\nWhich line comes right after "
            f"\"{lines[k]}\"? Answer with only that line.", lines[k + 1], 'text')


def tool_call(rng, src):
    name = rng.choice(list(TOOLS))
    about, params = TOOLS[name]
    if name in ('get_weather', 'get_time'):
        city = rng.choice(CITIES)
        args = {'city': city}
        request = f"What is the weather like in {city}?" if name == 'get_weather' else f"What time is it in {city}?"
    elif name == 'convert_currency':
        amount, (src, dst) = rng.randint(5, 500), rng.sample(CURRENCIES, 2)
        args = {'amount': amount, 'from': src, 'to': dst}
        request = f"How much is {amount} {src} in {dst}?"
    else:
        minutes = rng.randint(1, 90)
        args = {'minutes': minutes}
        request = f"Set a timer for {minutes} minutes."
    tool = json.dumps({'name': name, 'description': about, 'parameters': params})
    answer = json.dumps({'name': name, 'arguments': args})
    return (f"You can call this tool:\n{tool}\nRequest: {request}\nAnswer with only the JSON call, "
            f"as {{\"name\": ..., \"arguments\": {{...}}}}.", answer, 'json')


TASKS = [arithmetic, word_problem, count_words, larger, alphabetical, first_letter, capitals, reverse_words,
         who_speaks, next_line, tool_call]


def make_prompts(n_train, n_val, seed=0):
    """{'train': [...], 'val': [...]} of {kind, prompt, answer, check}, tasks in turn. No prompt is in both
    splits (nor twice in one); the val passages come from the held-out plays, the train ones from the rest.
    Word tasks draw from the plays' common words (lowercase, 4-9 letters, 20+ uses): thousands of them."""
    plays = shakespeare.read_plays()
    counts = Counter(w for _, text in plays for w in re.findall(r"\b[a-z]{4,9}\b", text))
    words = sorted(w for w, c in counts.items() if c >= 20)
    src = {split: {'words': words, 'speeches': [speeches(text) for name, text in plays
                                                 if (name in shakespeare.VAL_PLAYS) == (split == 'val')]}
           for split in ('train', 'val')}
    rng, seen, out = random.Random(seed), set(), {}
    for split, n in (('val', n_val), ('train', n_train)):
        out[split] = []
        for tries in range(50 * n + 1000):
            if len(out[split]) == n:
                break
            task = TASKS[len(out[split]) % len(TASKS)]
            prompt, answer, check = task(rng, src[split])
            if prompt not in seen:
                seen.add(prompt)
                out[split].append({'kind': task.__name__, 'prompt': prompt, 'answer': answer, 'check': check})
        assert len(out[split]) == n, f"only {len(out[split])} distinct {split} prompts of {n}; ask for fewer"
    return out


# ---- grading: the same rules for the teacher's and the student's responses ---------
def extract(response, check):
    """The answer in a response, normalized: the last number ('number'); the first JSON object, re-serialized
    with sorted keys, or None ('json'); else the last quoted span if any (models write: the letter is 'R'),
    otherwise the first line, stripped of punctuation at its ends and lowercased ('case' keeps case)."""
    if check == 'number':
        numbers = re.findall(r'-?\d+', response.replace(',', ''))
        return str(int(numbers[-1])) if numbers else None
    if check == 'json':
        obj = parse_json(response)
        return None if obj is None else json.dumps(obj, sort_keys=True)
    quoted = re.findall(r'(?:^|[\s:(])["\']([^"\'\n]+)["\']', response)
    text = quoted[-1] if quoted else (response.strip().split('\n') or [''])[0]
    text = ' '.join(text.replace(',', ' ').split()).strip(' .!?;:"\'')
    return text if check == 'case' else text.lower()


def parse_json(response):
    """The JSON object that starts at the response's first '{' (words or code fences around it are allowed), or
    None. Only the first: an object nested in a broken call must not pass for a call."""
    start = response.find('{')
    if start == -1:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(response[start:])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def score(example, response):
    """Whether a response's answer equals the known one; answers compare after extract()."""
    return extract(response, example['check']) == extract(example['answer'], example['check'])


# ---- the teacher answers ---------------------------------------------------------
def end_of_turn(tok):
    """The token the chat template closes an assistant turn with ('<|im_end|>' for ChatML teachers)."""
    text = tok.apply_chat_template([{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'MARK'}],
                                   tokenize=False)
    after = text[text.rindex('MARK') + len('MARK'):]
    ids = tok(after, add_special_tokens=False).input_ids
    assert ids, f"the chat template writes nothing after an assistant turn ({text!r}); cannot tell where one ends"
    return ids[0]


@torch.no_grad()
def generate(model, tok, enc, prompts, cache_path, stop_ids, batch_size, max_new_tokens):
    """{prompt: {'ids': the teacher's greedy answer tokens, 'ended': whether it closed its turn}}, read from
    cache_path and completed there: each finished batch is appended and flushed, so a killed run loses one batch."""
    done = {}
    if cache_path.exists():
        for line in cache_path.read_text(encoding='utf-8').splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run, cut short
                continue
            done[r['prompt']] = r
        # rewritten with the whole lines only: appending after a cut line would glue the next one to it
        write_atomic(cache_path, ''.join(json.dumps(r) + '\n' for r in done.values()).encode('utf-8'))
    todo = sorted({p for p in prompts if p not in done}, key=len)  # similar lengths batch with less padding
    if not todo:
        return done
    device = model.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    bar = tqdm(total=len(todo), desc='teacher answers', unit='prompt', initial=0, dynamic_ncols=True)
    with open(cache_path, 'a', encoding='utf-8') as f:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            x, am = chat_batch(enc, tok, batch, pad, device)
            out = model.generate(input_ids=x, attention_mask=am, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop_ids, pad_token_id=pad)[:, x.shape[1]:].tolist()
            for p, new in zip(batch, out):
                stop = next((j for j, t in enumerate(new) if t in stop_ids), None)
                r = {'prompt': p, 'ids': new if stop is None else new[:stop], 'ended': stop is not None}
                done[p] = r
                f.write(json.dumps(r) + '\n')
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return done


def pad_fraction(lengths, batch_size, rng, batches=500):
    """Share of the tokens of random batches (padded to their longest example) that are padding."""
    lengths = np.asarray(lengths)
    picks = lengths[rng.integers(len(lengths), size=(batches, batch_size))]
    return 1.0 - picks.sum() / (picks.max(axis=1).sum() * batch_size)


def prepare(teacher, out_dir=None, n_train=2640, n_val=220, batch_size=32, max_new_tokens=64, device='auto', seed=0,
            dtype='auto'):
    """Make the agent dataset for teacher (a spec teacher.py understands) in out_dir; return out_dir. The teacher's
    greedy answers depend on the dtype it runs in: meta.json records it (teacher_dtype), and train.py refuses to
    train in another dtype on them. dtype 'auto' measures the faster one here (machine.py)."""
    out_dir = pathlib.Path(out_dir) if out_dir else HERE / teacher_lib.teacher_slug(teacher)
    device = pick_device(device)
    t0 = time.time()
    width = teacher_lib.teacher_config(teacher).hidden_size  # the probe: the teacher's shapes
    teacher_dtype, line = choose_dtype(dtype, device, width)
    print(line)
    model, tok, enc = teacher_lib.load_teacher(teacher, dtype=TORCH_DTYPE[teacher_dtype], device=device)
    eot = end_of_turn(tok)
    stop_ids = sorted({eot} | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
    splits = make_prompts(n_train, n_val, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'meta.json').unlink(missing_ok=True)  # the old meta must not vouch for new files mid-write
    cache_path = out_dir / f'responses-{tokenizer_hash(tok)}-greedy-{max_new_tokens}-{teacher_dtype}.jsonl'
    print(f"{n_train} train + {n_val} held-out prompts; teacher {teacher} answers them greedily "
          f"(at most {max_new_tokens} tokens, batches of {batch_size}, on {device}, {teacher_dtype}), cached in {cache_path}")
    answers = generate(model, tok, enc, [e['prompt'] for s in splits.values() for e in s], cache_path, stop_ids,
                       batch_size, max_new_tokens)

    max_id = max([len(tok) - 1, *tok.get_vocab().values()])
    dtype = shakespeare.token_dtype(max_id)
    stats = {}
    for split, examples in splits.items():
        ids, spans, mask, rows = [], [], [], []
        for e in examples:
            r = answers[e['prompt']]
            prompt = encode(enc, tok, chat_prompt(tok, e['prompt']))
            answer = r['ids'] + ([eot] if r['ended'] else [])  # the teacher's own tokens, as it generated them
            spans.append((len(ids), len(prompt) + len(answer)))
            ids += prompt + answer
            mask += [0] * len(prompt) + [1] * len(answer)
            e = {**e, 'response': tok.decode(r['ids'], skip_special_tokens=True).strip(), 'ended': r['ended']}
            e['teacher_correct'] = score(e, e['response'])
            rows.append(e)
        write_atomic(out_dir / f'{split}.bin', shakespeare.to_array(ids, dtype).tobytes())
        write_atomic(out_dir / f'{split}.idx', np.array(spans, dtype=np.int64).tobytes())
        write_atomic(out_dir / f'{split}.mask.bin', np.array(mask, dtype=np.uint8).tobytes())
        write_atomic(out_dir / f'{split}.jsonl', ''.join(json.dumps(e) + '\n' for e in rows).encode('utf-8'))
        stats[split] = (np.array(spans)[:, 1], np.array(mask), rows)
    meta = {'teacher': teacher, 'tokenizer_hash': tokenizer_hash(tok), 'vocab_size': len(tok),
            'dtype': np.dtype(dtype).name, 'eos_id': int(eot), 'format': 'examples', 'chat': True,
            'train_examples': n_train, 'val_examples': n_val, 'max_new_tokens': max_new_tokens, 'seed': seed,
            'teacher_dtype': teacher_dtype}
    write_atomic(out_dir / 'meta.json', (json.dumps(meta, indent=2) + '\n').encode('utf-8'))

    rng = np.random.default_rng(0)
    for split, (lengths, mask, examples) in stats.items():
        q = np.percentile(lengths, [0, 10, 50, 90, 100]).astype(int)
        right = np.mean([e['teacher_correct'] for e in examples])
        print(f"{split}: {len(lengths):,} examples, {lengths.sum():,} tokens ({mask.sum():,} of them answers, "
              f"{mask.mean():.0%}); length min {q[0]} / p10 {q[1]} / median {q[2]} / p90 {q[3]} / max {q[4]}; "
              f"{sum(not e['ended'] for e in examples)} answers cut at {max_new_tokens} tokens; "
              f"the teacher is right on {right:.0%}")
    for b in (8, 16, 32):
        print(f"padding: {pad_fraction(stats['train'][0], b, rng):.0%} of the tokens in a batch of {b} random "
              f"training examples")
    print("teacher exact match by task (train): " + ', '.join(
        f"{k} {np.mean([e['teacher_correct'] for e in stats['train'][2] if e['kind'] == k]):.0%}"
        for k in [t.__name__ for t in TASKS]))
    print(f"done in {time.time() - t0:.0f}s -> {out_dir}")
    return out_dir


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('--teacher', default='smollm2-135m-instruct', help='teacher spec (see teacher.py)')
    parser.add_argument('--out_dir', default=None, help='default: data/agent/<teacher slug>/')
    parser.add_argument('--n_train', type=int, default=2640)
    parser.add_argument('--n_val', type=int, default=220)
    parser.add_argument('--batch_size', type=int, default=32, help='prompts the teacher answers at once')
    parser.add_argument('--max_new_tokens', type=int, default=64, help='longest teacher answer')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--dtype', default='auto', choices=DTYPES,
                        help="the teacher's dtype; 'auto' measures the faster here. train.py trains in the same one")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows at once, also in a file or a pipe
    prepare(args.teacher, args.out_dir, args.n_train, args.n_val, args.batch_size, args.max_new_tokens,
            args.device, args.seed, args.dtype)
