"""On-policy distillation (onpolicy.py): the student's sampled answers, the mask its loss takes them through, the
loss against the supervised one, the seeding, and exact resume, on the tiny random teacher and example data.
Run: python -m pytest tests/test_onpolicy.py"""
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from data import Batch, pad_examples
from distill import Distill
from losses import DistillationLoss, counted_tokens
from model import Indra, IndraConfig
from onpolicy import OnPolicy, answer_batch, draws, prompts_and_answers
from test_recovery import equal, same_records
from test_scale import same_records as close_records, torchrun
from test_train import records, run, tiny_args


def example_batch(path, rows=6):
    """A real padded batch of the tiny example data: the shortest, the longest of at most 40 tokens and some between."""
    meta = json.loads((Path(path) / 'meta.json').read_text())
    data = np.fromfile(Path(path) / 'train.bin', dtype=meta['dtype'])
    mask = np.fromfile(Path(path) / 'train.mask.bin', dtype=np.uint8)
    spans = np.fromfile(Path(path) / 'train.idx', dtype=np.int64).reshape(-1, 2)
    order = [i for i in np.argsort(spans[:, 1], kind='stable') if spans[i, 1] <= 40]  # room left to answer in 64
    picks = np.array(order)[np.linspace(0, len(order) - 1, rows).astype(int)]
    x, am, lm = pad_examples(data, mask, spans[picks].tolist(), 64, meta['eos_id'])
    return Batch(x, am, lm), meta['eos_id']


@pytest.fixture(scope='module')
def models(tiny_teacher):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    torch.manual_seed(0)
    student = Indra(IndraConfig(vocab_size=teacher.config.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    return student, teacher


def test_sampled_answers_count_only_their_own_tokens(tiny_examples, models):
    """On a real padded batch: the prompt comes back unchanged, the loss mask marks exactly the sampled answer up to
    and including its first eos, and the loss counts only predictions of those tokens: never the prompt, padding,
    or what the sampler emitted after eos."""
    b, eos = example_batch(tiny_examples)
    prompts = [p for p, _ in prompts_and_answers(b)]
    answers = [[5, 6, eos, 7, 8], [9], [eos, eos, eos], [10, 11, 12, 13, 14, 15], [], [16, eos]]  # as sampled
    s = answer_batch(prompts, answers, eos, 64, 'cpu')
    kept = [[5, 6, eos], [9], [eos], [10, 11, 12, 13, 14, 15], [], [16, eos]]
    assert s.sampled and s.x.shape == (6, max(len(p) + len(a) for p, a in zip(prompts, kept)))
    w = counted_tokens(s.x, s.attention_mask, s.loss_mask)
    for i, (p, a) in enumerate(zip(prompts, kept)):
        n = len(p) + len(a)
        assert s.x[i, :n].tolist() == p + a and s.attention_mask[i].tolist() == [1] * n + [0] * (s.x.shape[1] - n)
        assert s.loss_mask[i].tolist() == [0] * len(p) + [1] * len(a) + [0] * (s.x.shape[1] - n)
        # position t predicts token t+1: counted exactly where t+1 is an answer token
        assert w[i].tolist() == [1.0 if len(p) <= t + 1 < n else 0.0 for t in range(s.x.shape[1])]

    # the real sampler keeps the same shape of batch: prompts intact, answers counted up to the first eos at most
    student, _ = models
    policy = OnPolicy(1.0, 1.0, 12, eos, seed=0)
    s = policy.sampled(student, b, 3, 1, nullcontext())
    assert student.training  # restored after sampling in eval mode
    w = counted_tokens(s.x, s.attention_mask, s.loss_mask)
    for i, p in enumerate(prompts):
        n = int(s.attention_mask[i].sum())
        answer = s.x[i, len(p):n].tolist()
        assert s.x[i, :len(p)].tolist() == p and 1 <= len(answer) <= 12 and eos not in answer[:-1]
        assert w[i, len(p) - 1:n - 1].sum() == len(answer) and w[i].sum() == len(answer)


def test_forced_recorded_answers_give_the_supervised_loss_and_gradients(tiny_examples, models):
    """When the 'sampled' answers are the recorded ones, the on-policy batch is the supervised batch: the same loss
    and the same gradients (with kd_weight 1, where the supervised loss is the divergence alone too). With
    kd_weight 0.5 an on-policy batch still takes the divergence alone: its loss is the kd_weight-1 loss."""
    student, teacher = models
    b, eos = example_batch(tiny_examples)
    forced = answer_batch(*zip(*prompts_and_answers(b)), eos, 64, 'cpu')

    def loss_and_grads(batch, kd_weight, kd_loss):
        crit = DistillationLoss(kd_weight=kd_weight, temperature=2.0, kd_loss=kd_loss, jsd_beta=0.5)
        distill = Distill(student, teacher, crit, nullcontext())
        student.zero_grad(set_to_none=True)
        loss, parts = distill.loss(batch)
        loss.backward()
        return loss.item(), parts, {k: p.grad.clone() for k, p in student.named_parameters()}

    for kd_loss in ('jsd', 'reverse_kl'):
        want, want_parts, want_grads = loss_and_grads(b, 1.0, kd_loss)
        got, got_parts, got_grads = loss_and_grads(forced, 1.0, kd_loss)
        assert got == pytest.approx(want, rel=1e-5) and got_parts['kl'] == pytest.approx(want_parts['kl'], rel=1e-5)
        for k in want_grads:
            torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-4, atol=1e-7)
        half, _, _ = loss_and_grads(forced, 0.5, kd_loss)
        supervised_half, _, _ = loss_and_grads(b, 0.5, kd_loss)
        assert half == pytest.approx(want, rel=1e-5) and supervised_half != pytest.approx(want, rel=1e-3)


def test_sampling_is_drawn_from_seed_step_and_micro_step(tiny_examples, models):
    """The same (seed, step, micro-step) samples the same answers whatever ran before; another micro-step draws
    others; the share of sampled micro-steps is onpolicy_frac."""
    student, _ = models
    b, eos = example_batch(tiny_examples)
    policy = OnPolicy(0.3, 1.0, 12, eos, seed=1337)
    first = policy.sampled(student, b, 5, 2, nullcontext()).x
    torch.manual_seed(123)  # the global RNG plays no part
    torch.rand(10)
    assert torch.equal(policy.sampled(student, b, 5, 2, nullcontext()).x, first)
    assert not torch.equal(policy.sampled(student, b, 5, 3, nullcontext()).x, first)
    chosen = [policy.chosen(step, micro) for step in range(500) for micro in range(4)]
    assert abs(np.mean(chosen) - 0.3) < 0.03
    assert draws(1337, 5, 2) != draws(1337, 2, 5) != draws(1338, 5, 2)


@pytest.mark.slow  # four train.py runs: ~30 s
def test_an_onpolicy_stage_resumes_exactly(tiny_teacher, tiny_examples, tmp_path):
    """On-policy as a second stage: a supervised run of 2 steps, then a stage from its ckpt.pt with half the
    micro-steps answered by the student (jsd). The stage's N steps straight == N/2, resume, N/2: identical records,
    weights and optimizer state; and the stage did train on sampled answers as well as recorded ones."""
    base = dict(kd_loss='jsd', watch_tokens=0, plot=False, gradient_accumulation_steps=2, block_size=64)
    first = tmp_path / 'first'
    run('train.py', *tiny_args(tiny_teacher, tiny_examples, first, **base, max_iters=2, eval_interval=2))
    kw = dict(base, max_iters=8, eval_interval=4, lr_decay_iters=8, onpolicy_frac=0.5, init_from=first / 'ckpt.pt')
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    run('train.py', *tiny_args(tiny_teacher, tiny_examples, straight, **kw))
    run('train.py', *tiny_args(tiny_teacher, tiny_examples, split, **{**kw, 'max_iters': 4}))
    run('train.py', *tiny_args(tiny_teacher, tiny_examples, split, **kw), '--init_from=resume')
    assert records(straight)[0]['val_ce'] == [r for r in records(first) if 'val_ce' in r][-1]['val_ce']
    same_records(records(straight), records(split), keys=('loss', 'ce', 'kl', 'grad_norm', 'onpolicy', 'val_ce'))
    shares = [r['onpolicy'] for r in records(straight) if 'onpolicy' in r]
    assert len(shares) == 8 and 0 < sum(shares) < 8  # both kinds of micro-step happened
    a, b = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (straight, split))
    assert all(torch.equal(v, b['model'][k]) for k, v in a['model'].items())
    assert equal(a['optimizer'], b['optimizer'])
    assert a['inherited']['stages'][0]['checkpoint'] == str(first / 'ckpt.pt')


@pytest.mark.slow
def test_two_ranks_sample_the_answers_of_one_process(tiny_teacher, tiny_examples, tmp_path):
    """Under torchrun each rank samples the global micro-steps it computes, seeded by (seed, step, micro-step):
    two ranks record the losses, the sampled shares and the evaluations of one process (gloo sums in another
    order: within 1e-5)."""
    kw = dict(max_iters=4, lr_decay_iters=4, eval_interval=2, eval_iters=2, gradient_accumulation_steps=4,
              onpolicy_frac=0.5, kd_loss='jsd', watch_tokens=0, plot=False, block_size=64)
    one, two = tmp_path / 'one', tmp_path / 'two'
    run('train.py', *tiny_args(tiny_teacher, tiny_examples, one, **kw))
    torchrun(2, 'train.py', *tiny_args(tiny_teacher, tiny_examples, two, **kw))
    close_records(records(one), records(two), keys=('loss', 'ce', 'kl', 'grad_norm', 'onpolicy', 'val_ce'))
    assert 0 < sum(r['onpolicy'] for r in records(one) if 'onpolicy' in r) < 4
