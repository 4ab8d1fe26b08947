"""The agent dataset (data/agent/prepare.py), its padded batches and masks, its grading rules, and eval.py,
all on the tiny random teacher (its answers are noise, but they go through the real chat template, generation,
cache, token files and masks).
Run: python -m pytest tests/test_agent.py"""
import importlib.util
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from data import pad_examples
from losses import DistillationLoss, Teacher, counted_tokens
from model import Indra, IndraConfig
from tokenizer import chat_prompt, token_bytes
from test_train import ROOT, run, tiny_args


def load_agent():
    spec = importlib.util.spec_from_file_location('agent_prepare', ROOT / 'data' / 'agent' / 'prepare.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


agent = load_agent()


@pytest.fixture(scope='module')
def agent_data(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp('agent')
    agent.prepare(tiny_teacher, out, n_train=33, n_val=11, batch_size=8, max_new_tokens=12, device='cpu',
                  dtype='float32')
    return out


def read(path, split):
    meta = json.loads((path / 'meta.json').read_text())
    return (meta, np.fromfile(path / f'{split}.bin', dtype=meta['dtype']), np.fromfile(path / f'{split}.mask.bin', dtype=np.uint8),
            np.fromfile(path / f'{split}.idx', dtype=np.int64).reshape(-1, 2),
            [json.loads(line) for line in (path / f'{split}.jsonl').read_text().splitlines()])


def test_examples_are_the_chat_prompt_then_the_teachers_answer(agent_data, tiny_teacher):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    for split, n in (('train', 33), ('val', 11)):
        meta, data, mask, spans, examples = read(agent_data, split)
        assert meta['format'] == 'examples' and meta['chat'] and meta['eos_id'] == tok.convert_tokens_to_ids('<|im_end|>')
        assert len(spans) == len(examples) == n and len(data) == len(mask) == spans[:, 1].sum()
        assert (spans[1:, 0] == spans[:-1, 0] + spans[:-1, 1]).all()  # one after another, nothing in between
        for (start, length), e in zip(spans, examples):
            ids, m = data[start:start + length].tolist(), mask[start:start + length]
            prompt = tok(chat_prompt(tok, e['prompt']), add_special_tokens=False).input_ids
            assert ids[:len(prompt)] == prompt and not m[:len(prompt)].any()  # the prompt: context, never a target
            assert m[len(prompt):].all() and length > len(prompt)  # the answer (and its end of turn): all targets
            answer = ids[len(prompt):]
            assert (answer[-1] == meta['eos_id']) == e['ended']
            answer = answer[:-1] if e['ended'] else answer
            assert tok.decode(answer, skip_special_tokens=True).strip() == e['response']


def test_held_out_prompts_are_disjoint_and_from_held_out_plays():
    splits = agent.make_prompts(440, 110)
    assert not {e['prompt'] for e in splits['train']} & {e['prompt'] for e in splits['val']}
    assert len({e['prompt'] for e in splits['train']}) == 440
    assert {e['kind'] for e in splits['val']} == {t.__name__ for t in agent.TASKS}
    val_text = ''.join(text for name, text in agent.shakespeare.read_plays() if name in agent.shakespeare.VAL_PLAYS)
    lines = [e['answer'] for e in splits['val'] if e['kind'] == 'next_line']
    assert lines and all(line in val_text for line in lines)


def test_generation_resumes_from_its_cache(agent_data, tiny_teacher, tmp_path):
    """A run killed mid-write: its whole lines are kept (not asked again), the cut one is dropped and redone."""
    cache = next(agent_data.glob('responses-*.jsonl'))
    lines = cache.read_text().splitlines(keepends=True)
    out = tmp_path / 'agent'
    out.mkdir()
    (out / cache.name).write_text(''.join(lines[:5]) + lines[5][:20])
    agent.prepare(tiny_teacher, out, n_train=33, n_val=11, batch_size=8, max_new_tokens=12, device='cpu',
                  dtype='float32')
    again = (out / cache.name).read_text().splitlines(keepends=True)
    assert again[:5] == lines[:5] and len(again) == len(lines)
    assert sorted(json.loads(line)['prompt'] for line in again) == sorted(json.loads(line)['prompt'] for line in lines)


def test_padded_batch_masks(agent_data, tiny_teacher):
    """Acceptance: on a real padded batch, pad tokens are never attended to and never counted, and prompt
    tokens are never counted: the masked KD loss is a mean over the answer tokens alone."""
    meta, data, mask, spans, _ = read(agent_data, 'train')
    picks = np.argsort(spans[:, 1])[[0, len(spans) // 2, -1]]  # shortest, middle, longest: real padding
    x, am, lm = pad_examples(data, mask, spans[picks].tolist(), 1024, meta['eos_id'])
    lengths = spans[picks, 1]
    assert x.shape == (3, lengths.max()) and (am.sum(1).numpy() == lengths).all() and lengths.min() < lengths.max()
    assert not (lm * (1 - am)).any()  # a pad is never a target
    w = counted_tokens(x, am, lm)
    for b, (start, n) in enumerate(spans[picks].tolist()):
        target_is_answer = torch.zeros(x.shape[1])
        target_is_answer[:n - 1] = torch.from_numpy(mask[start + 1:start + n].astype(np.float32))
        assert torch.equal(w[b], target_is_answer)  # counted: exactly the predictions of answer tokens

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    student = Indra(IndraConfig(vocab_size=teacher.config.vocab_size, block_size=1024, n_layer=2, n_head=2, n_embd=32)).eval()
    noisy = x.masked_fill(am == 0, 7) + (1 - am) * torch.randint(0, 50, x.shape)  # other ids under the pads

    def loss(ids):
        with torch.no_grad():
            th = teacher.model(input_ids=ids, attention_mask=am).last_hidden_state
            h = student.hidden_states(ids, am)
        crit = DistillationLoss(kd_weight=0.5, temperature=2.0)
        return h, crit(h, student.lm_head.weight, ids, am, lm, Teacher(hidden=th, head=teacher.lm_head.weight))

    h, (total, ce, kl) = loss(x)
    h2, (total2, ce2, kl2) = loss(noisy)
    real = am.bool()
    assert torch.equal(h[real], h2[real])  # right pads come after every real token: causally unseen
    n = int(am[0].sum())  # left-padded, as generation batches prompts: the pads are before, masked out
    left, left_am = torch.cat([noisy[0, n:], x[0, :n]])[None], torch.cat([am[0, n:], am[0, :n]])[None]
    with torch.no_grad():
        alone, padded = student.hidden_states(x[:1, :n]), student.hidden_states(left, left_am)
    assert torch.allclose(padded[0, -n:], alone[0], atol=1e-5)  # rotary phases are relative: only the mask matters
    assert torch.allclose(total, total2) and torch.allclose(ce, ce2) and torch.allclose(kl, kl2)
    logits = student.lm_head(h)[:, :-1]  # the CE part by hand: mean over the answer targets only
    want = F.cross_entropy(logits[w[:, :-1].bool()], x[:, 1:][w[:, :-1].bool()])
    assert torch.allclose(ce, want, atol=1e-5)
    changed = x.clone()
    b, t = torch.nonzero(w)[0].tolist()
    changed[b, t + 1] = (changed[b, t + 1] + 1) % 50  # an answer token: now the loss must move
    assert not torch.allclose(loss(changed)[1][1], ce)


@pytest.mark.parametrize('response,check,want', [
    ("The first letter of the word 'river' is 'R'.", 'text', 'r'),
    ('The answer is "apple".', 'text', 'apple'),
    ('blue, green, red.', 'text', 'blue green red'),
    ("It's 'CASTLE'", 'case', 'CASTLE'),
    ('castle', 'case', 'castle'),
    ('23 + 45 = 78', 'number', '78'),
    ('Tom has 1,017 apples.\n#### 1,017\nThe answer is', 'number', '1017'),
    ('no digits here', 'number', None),
    ('```json\n{"name": "set_timer", "arguments": {"minutes": 5}}\n```', 'json',
     '{"arguments": {"minutes": 5}, "name": "set_timer"}'),
    ('{"name": "set_timer", "arguments": {"minutes": 5}', 'json', None),  # unbalanced: not valid JSON
])
def test_answers_are_extracted_the_same_way_for_teacher_and_student(response, check, want):
    assert agent.extract(response, check) == want


def test_score_compares_extracted_answers():
    call = {'check': 'json', 'answer': '{"name": "get_time", "arguments": {"city": "Oslo"}}'}
    assert agent.score(call, 'Sure: {"arguments": {"city": "Oslo"}, "name": "get_time"}')
    assert not agent.score(call, '{"name": "get_time", "arguments": {"city": "Lima"}}')
    assert agent.score({'check': 'number', 'answer': '42'}, '6 x 7 = 42')
    assert not agent.score({'check': 'case', 'answer': 'CASTLE'}, 'castle')


def test_token_bytes_count_the_text(tiny_teacher):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    text = "To be, or not to be: 'tis the question. Café 1599\n  indented"
    ids = tok(text, add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids('<|im_end|>')]
    assert token_bytes(tok, len(tok) + 10)[ids].sum().item() == len(text.encode('utf-8'))


@pytest.fixture(scope='module')
def text_student(tiny_teacher, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('eval_text')
    run('train.py', *tiny_args(tiny_teacher, tiny_data, out, max_iters=4, eval_interval=4, watch_tokens=0, plot=False))
    return out


def test_eval_on_text_counts_every_target_once(text_student, tiny_teacher, tiny_data, tmp_path):
    stdout = run('eval.py', '--ckpt', text_student / 'ckpt.pt', '--json', tmp_path / 'e.json', '--dtype=float32')
    r = json.loads((tmp_path / 'e.json').read_text())
    val = np.fromfile(f'{tiny_data}/val.bin', dtype=json.loads(open(f'{tiny_data}/meta.json').read())['dtype'])
    assert r['teacher']['tokens'] == len(val) - 1 and 'bits/byte' in stdout
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    assert r['teacher']['bytes'] == token_bytes(tok, len(tok))[torch.from_numpy(val[1:].astype(np.int64))].sum()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()  # the teacher's CE by hand, same windows
    ids = torch.from_numpy(val.astype(np.int64))
    nll = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 63):  # block_size 64, overlapping by one
            w = ids[s:s + 64][None]
            nll += F.cross_entropy(teacher(w).logits[0, :-1], w[0, 1:], reduction='sum').item()
    assert r['teacher']['ce'] == pytest.approx(nll / (len(ids) - 1), rel=1e-4)
    s = r['students'][0]
    assert s['bits_per_byte'] == pytest.approx(s['ce'] * r['teacher']['tokens'] / (math.log(2) * r['teacher']['bytes']))
    assert s['kl'] > 0 and 0 <= s['top1_agreement'] <= 1 and s['step'] == 4


def test_agent_train_eval_and_chat_sample(agent_data, tiny_teacher, tmp_path):
    """The agent path end to end: train on the padded examples, eval.py grades the student's greedy answers
    beside the teacher's, sample.py --chat shows both."""
    data = tmp_path / 'data'
    shutil.copytree(agent_data, data)
    run('train.py', *tiny_args(tiny_teacher, data, tmp_path / 'out', max_iters=4, eval_interval=4, watch_tokens=4,
                               plot=False), '--dataset=agent')
    stdout = run('eval.py', '--ckpt', tmp_path / 'out' / 'best.pt', '--dtype=float32')
    r = json.loads((tmp_path / 'out' / 'eval.json').read_text())
    examples = [json.loads(line) for line in (data / 'val.jsonl').read_text().splitlines()]
    teacher = r['teacher']['answers']
    assert teacher['exact_match'] == pytest.approx(np.mean([e['teacher_correct'] for e in examples]))
    a = r['students'][0]['answers']
    for key in ('exact_match', 'agreement', 'valid_json', 'distinct_2', 'top_token_share', 'collapsed'):
        assert a[key] is not None and 0 <= a[key] <= 1, key
    assert 'exact match by task' in stdout and '= teacher' in stdout
    text = run('sample.py', f'--ckpt={tmp_path / "out" / "best.pt"}', '--chat', '--prompt=What is 2 + 3?',
               '--max_new_tokens=5', '--num_samples=1')
    assert 'user: What is 2 + 3?' in text and '\nstudent: ' in text and '\nteacher: ' in text


def test_kd_vs_ce_pairs_the_runs_and_keeps_finished_ones(tiny_teacher, tiny_data, tmp_path):
    train_args = [a for a in tiny_args(tiny_teacher, tiny_data, tmp_path, max_iters=3, warmup_iters=1)
                  if not a.startswith(('--out_dir=', '--eval_interval='))]  # kd_vs_ce.py sets these per run
    args = ['kd_vs_ce.py', '--seeds', '1', '2', '--out_dir', tmp_path, '--', *train_args]
    stdout = run(*args)
    r = json.loads((tmp_path / 'eval.json').read_text())
    pairs = sorted((s['seed'], s['kd_weight']) for s in r['students'])
    assert pairs == [(1, 0.0), (1, 0.9), (2, 0.0), (2, 0.9)]  # each seed with the config's kd_weight and with 0
    assert '| mean |' in stdout and 'every KD run beat every CE-only run: ' in stdout
    assert all(s['step'] == 3 for s in r['students'])
    again = run(*args)  # finished runs are kept, not trained again
    assert again.count('finished earlier, kept') == 4
