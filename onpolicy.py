"""
On-policy distillation: the student answers the prompts itself, and the teacher grades every token of that
answer (GKD, Agarwal et al. 2024, arXiv:2306.13649; MiniLLM, Gu et al. 2024, arXiv:2306.08543).

Trained only on the teacher's recorded answers, a student predicts the next token well on prefixes it never
makes itself; generating on its own, its errors compound on prefixes it never saw (exposure bias). Here a share
`onpolicy_frac` of the training batches of example data (data/agent) is answered by the student: its prompts,
left-padded, go through Indra.generate (with the key/value cache) at `onpolicy_temperature`, up to the data's
longest answer or block_size, stopping at eos. The batch is then prompt + sampled answer, right-padded like any
example batch; the teacher runs on it, and the divergence kd_loss (GKD: 'jsd' with jsd_beta, or MiniLLM's
'reverse_kl') is taken on the sampled answer's tokens only: the prompt, padding and anything after eos never
count. The student's own tokens are no labels to imitate, so such a batch has no CE term: its loss is
T^2 x D alone (kd_weight 1), as in GKD. No gradient flows through the sampling.

Which micro-steps are sampled, and the sampling itself, are drawn from a generator seeded by (seed, step,
micro-step): no new state, so a resumed run, and a run on any number of ranks, samples the same answers.

    policy = OnPolicy(frac=0.5, temperature=1.0, max_new_tokens=64, eos_id=eos, seed=1337)
    if policy.chosen(step, micro_step):
        batch = policy.sampled(model, batch, step, micro_step, autocast)   # a data.Batch with sampled=True
"""
import copy

import numpy as np
import torch

from data import Batch, pad_examples


def fail(msg):
    raise SystemExit(f"indra: {msg}")


def draws(seed, step, micro_step):
    """Two independent 32-bit numbers for micro-step `micro_step` of optimizer step `step`: the same on every rank,
    in every resumed run, and unrelated to the numbers of any other micro-step (NumPy's SeedSequence hashes them)."""
    return np.random.SeedSequence([seed, step, micro_step]).generate_state(2).tolist()


def prompts_and_answers(b):
    """Per row of an example batch b (right-padded, the loss mask on the answer): (prompt ids, answer ids), the
    answer being the tokens the loss mask marks (the recorded one) and the prompt everything real before it."""
    out = []
    for x, am, lm in zip(b.x.tolist(), b.attention_mask.tolist(), b.loss_mask.tolist()):
        n = sum(am)  # right-padded: the first n tokens are real
        start = next((i for i in range(n) if lm[i]), n)
        out.append((x[:start], [t for t, m in zip(x[start:n], lm[start:n]) if m]))
    return out


def answer_batch(prompts, answers, eos_id, block_size, device, sampled=True):
    """Rows of prompt + answer, right-padded with eos_id (as data.pad_examples pads), as a Batch: attention mask 1
    on every real token, loss mask 1 on the answer's tokens. An answer is cut after its first eos (kept: the
    student learns where to stop) and at block_size; tokens after eos are not part of the row. sampled: whether
    the answers are the student's own (the batch then takes the divergence alone)."""
    ids, mask, spans = [], [], []
    for p, a in zip(prompts, answers):
        a = a[:a.index(eos_id) + 1] if eos_id in a else a
        spans.append((len(ids), len(p) + len(a)))
        ids += p + a
        mask += [0] * len(p) + [1] * len(a)
    x, am, lm = pad_examples(np.array(ids), np.array(mask), spans, block_size, eos_id)
    return Batch(x.to(device), am.to(device), lm.to(device), sampled=sampled)


def divergence_only(criterion):
    """The criterion for the student's own answers: the divergence alone (kd_weight 1), as in GKD; the CE
    on its own tokens is only logged."""
    criterion = copy.copy(criterion)
    criterion.kd_weight = 1.0
    return criterion


class OnPolicy:
    """frac: the share of micro-steps the student answers (GKD's lambda); temperature: their sampling temperature
    (0: greedy); max_new_tokens: the longest answer to sample (the data's longest recorded answer); eos_id: the end
    of an answer (the assistant's end of turn on chat data); seed: the run's."""

    def __init__(self, frac, temperature, max_new_tokens, eos_id, seed):
        self.frac, self.temperature, self.max_new_tokens = frac, temperature, max_new_tokens
        self.eos_id, self.seed = eos_id, seed

    @classmethod
    def for_data(cls, frac, temperature, data, seed):
        """The policy for a run on data (a data.Data); only example data has prompts to answer."""
        if not data.examples:
            fail(f"--onpolicy_frac={frac} lets the student answer prompts, and {data.path} is one stream of text; "
                 f"use example data (e.g. --dataset=agent) or --onpolicy_frac=0")
        return cls(frac, temperature, data.longest_answer, data.eos_id, seed)

    def chosen(self, step, micro_step):
        """Whether this micro-step trains on the student's own answers."""
        return draws(self.seed, step, micro_step)[0] / 2 ** 32 < self.frac

    def batch(self, model, b, step, micro_step, autocast):
        """The batch to learn from at this micro-step: b, or on a chosen micro-step the student's own
        answers to its prompts (sampled())."""
        return self.sampled(model, b, step, micro_step, autocast) if self.chosen(step, micro_step) else b

    @torch.no_grad()
    def sampled(self, model, b, step, micro_step, autocast):
        """The batch b with its recorded answers replaced by the student's (model: the unwrapped Indra), sampled
        in eval mode (no dropout) from a generator of its own, so the run's random state is untouched."""
        prompts = [p for p, _ in prompts_and_answers(b)]
        L, block = max(map(len, prompts)), model.config.block_size
        x = torch.tensor([[self.eos_id] * (L - len(p)) + p for p in prompts], device=b.x.device)  # left-padded
        am = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=b.x.device)
        n = min(self.max_new_tokens, block - L)
        answers = [[] for _ in prompts]
        if n > 0:  # a prompt that fills the block leaves nothing to answer: such rows count no token
            gen = torch.Generator(device=b.x.device).manual_seed(draws(self.seed, step, micro_step)[1])
            was_training = model.training
            model.eval()
            with autocast:
                out = model.generate(x, n, temperature=self.temperature, eos_id=self.eos_id, attention_mask=am,
                                     generator=gen)
            model.train(was_training)
            answers = out[:, L:].tolist()
        return answer_batch(prompts, answers, self.eos_id, block, b.x.device)
