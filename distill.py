"""
One batch's distillation: what the teacher says about it and the loss the student learns from it
(loss(), per micro-step), and the held-out measure of the same (evaluate(), at every evaluation).

The plain run: the teacher's final hidden states on the batch, the student's on the same tokens,
and losses.DistillationLoss over both. Each option changes one thing through one named call into
its own room: the teacher's cached top-k targets (teacher.py), an own tokenizer's projector
(vocab.py), the student's own answers (onpolicy.py), matching the insides (matching.py), a Cognate
student's ACT terms (cognate.py).

    distill = Distill(model, teacher_model, criterion, autocast)
    loss, parts = distill.loss(batch, at=(step, micro_step))  # parts: 'ce', 'kl', the options'
    stats = distill.evaluate(data, eval_iters=8, seed=1337)
"""
import math

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cognate
import vocab
from losses import DistillationLoss, Teacher, counted_tokens
from machine import all_sum, compiled
from matching import Matching, student_internals, teacher_internals
from onpolicy import OnPolicy, divergence_only
from teacher import teacher_hidden


class HiddenStates(torch.nn.Module):
    """The student up to its final hidden states, (B, T) ids -> (B, T, C): the loss applies the head
    itself. A module of its own because DDP synchronizes gradients through a module's forward.
    insides=True: (hidden states, the insides of the blocks that matching reads)."""

    def __init__(self, model, matching=None):
        super().__init__()
        self.model, self.matching = model, matching

    def forward(self, idx, attention_mask=None, insides=False):
        if insides:
            m = self.matching
            return student_internals(self.model, idx, attention_mask, m.student_layers,
                                     m.student_att)
        return self.model.hidden_states(idx, attention_mask)


class Distill:
    """The student (an Indra) learning from teacher_model through criterion (a DistillationLoss
    whose kd_weight and temperature the loop sets per step), under autocast. ddp: train through
    DistributedDataParallel; compile_on: a batch to torch.compile the student on (None: eager).
    The options, each None when off: matching (matching.Matching), projector (vocab.Projector),
    onpolicy (onpolicy.OnPolicy)."""

    def __init__(self, model, teacher_model, criterion, autocast, ddp=False, compile_on=None,
                 matching=None, projector=None, onpolicy=None):
        self.model, self.teacher, self.criterion = model, teacher_model, criterion
        self.autocast, self.matching, self.projector = autocast, matching, projector
        self.onpolicy = onpolicy
        self.device = next(model.parameters()).device
        self.teacher_head = teacher_model.get_output_embeddings().weight.to(self.device)  # may copy
        chunk, clamp = criterion.chunk_tokens, criterion.logit_clamp
        self.eval_kl = DistillationLoss(kd_weight=1.0, temperature=1.0, chunk_tokens=chunk,
                                        logit_clamp=clamp)
        self.eval_ce = DistillationLoss(kd_weight=0.0, chunk_tokens=chunk)  # a teacher's: no clamp
        self.hidden = HiddenStates(model, matching)
        if compile_on is not None:
            self.hidden = compiled(self.hidden, compile_on, autocast)
        # training runs through DDP, which averages the gradients over the ranks in backward
        self.train_hidden = DDP(self.hidden, broadcast_buffers=False) if ddp else self.hidden
        self.held_out = None  # (batches with the teacher's targets, its CE), made when first needed
        cfg = model.config  # a Cognate student's figures: ACT's passes, halting variance, gate
        self.cognate = ['passes', 'halt_var'] * cfg.act + ['gate'] * cfg.ltm
        # the parts of the loss in the log ('kl' is the divergence kd_loss), then the options'
        self.logged = ['loss', 'ce', 'kl'] + ['projector_ce'] * bool(projector) \
            + (matching.logged if matching else []) + ['onpolicy'] * bool(onpolicy) + self.cognate

    # ---- what the teacher says ----
    def teacher_says(self, b):
        """(a Teacher for the loss or None, the insides of its layers mapped for matching, the
        projector's CE or None) for the data.Batch b."""
        if self.projector is not None:  # an own tokenizer: the teacher through the projector
            aligned = vocab.aligned_teacher(self.teacher, b, self.autocast)
            t, p_ce = self.through_projector(*aligned, b.x)
            return t, {}, p_ce
        if b.cached is not None:  # the teacher's targets, computed once
            return b.cached, {}, None
        if self.criterion.kd_weight > 0 or self.matching or b.sampled:
            return (*self.run_teacher(b.x, b.attention_mask), None)
        return None, {}, None  # cross-entropy alone: no teacher needed

    def run_teacher(self, x, attention_mask=None):
        """The teacher on a batch of its tokens: a Teacher for the loss (its final hidden states and
        head), and the insides of the layers matching reads ({} when nothing is matched)."""
        m = self.matching
        with torch.no_grad(), self.autocast:
            if m and (m.teacher_layers or m.teacher_att):
                h, inside = teacher_internals(self.teacher, x, attention_mask, m.teacher_layers,
                                              m.teacher_att)
            else:
                h, inside = teacher_hidden(self.teacher, x, attention_mask), {}
            return Teacher(hidden=h.to(self.device), head=self.teacher_head), inside

    def through_projector(self, h, has, x):
        """The teacher's aligned states h (B, T, Ct), where has, through the projector: (a Teacher
        over the student's vocabulary, the projector's own CE)."""
        return vocab.through_projector(self.projector, self.model.lm_head.weight, h, has, x,
                                       self.eval_ce, self.autocast)

    # ---- the student's loss ----
    def loss(self, b, at=(0, 0)):
        """The loss of one micro-batch, to backprop, and its parts, detached, for the log: 'ce',
        'kl' (the divergence kd_loss) and the options'. at: (optimizer step, micro-step), which seed
        on-policy sampling."""
        criterion, parts = self.criterion, {}
        if self.onpolicy is not None:  # on a share of the micro-steps the student answers itself
            b = self.onpolicy.batch(self.model, b, *at, self.autocast)
            parts['onpolicy'] = torch.tensor(float(b.sampled))
        if b.sampled:  # its own tokens are no labels to imitate: the divergence alone (GKD)
            criterion = divergence_only(criterion)
        t, inside, p_ce = self.teacher_says(b)
        x, am = b.x, b.attention_mask
        with self.autocast:
            if self.matching:
                h, mine = self.train_hidden(x, am, insides=True)
            else:
                h = self.train_hidden(x, am)
            head = self.model.lm_head.weight
            loss, parts['ce'], parts['kl'] = criterion(h, head, x, am, b.loss_mask, teacher=t)
            if self.cognate:  # ACT's ponder cost and diversity term, on the tokens the loss counts
                extra, figures = cognate.terms(self.model, counted_tokens(x, am, b.loss_mask))
                loss = loss + extra
                parts.update(figures)
            if p_ce is not None:  # the projector learns from its own CE, beside the student
                loss = loss + p_ce
                parts['projector_ce'] = p_ce
            if self.matching:  # + the weighted feature and attention matching losses
                loss = self.matching.add_losses(loss, parts, mine, inside, am)
        return loss, {k: v.detach().float().item() for k, v in parts.items()}

    # ---- the held-out measure ----
    @torch.no_grad()
    def held_out_batches(self, data, eval_iters, seed):
        """eval_iters fixed held-out batches, each with what the teacher says about it, and the
        teacher's CE on them. The batches are the same at every evaluation and the teacher is
        frozen, so its forward runs once per run. An own tokenizer keeps the teacher's aligned
        states: what the projector makes of them changes as it learns. Under torchrun each rank
        keeps every world_size-th batch; the sums are taken over all ranks."""
        if self.held_out is None:
            ranks = dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ranks else (0, 1)
            print(f"held-out set: {eval_iters} batches of {data.batch_size} x {data.block_size}; "
                  f"the teacher runs on them once, now")
            gen = torch.Generator().manual_seed(seed + 1)
            batches, t_ce = [], torch.zeros(())
            for i in range(eval_iters):
                b = data.batch('val', gen, load=i % world == rank)
                if b is None:
                    continue
                if self.projector is not None:  # the teacher's aligned states, projected later
                    batches.append((b, vocab.aligned_teacher(self.teacher, b, self.autocast)))
                    continue
                t = self.run_teacher(b.x, b.attention_mask)[0]
                with self.autocast:
                    t_ce += self.eval_ce(t.hidden, t.head[:self.model.config.vocab_size], b.x,
                                         b.attention_mask, b.loss_mask)[1].float().cpu()
                batches.append((b, t))
            self.held_out = batches, (all_sum(t_ce) / eval_iters).item()
        return self.held_out

    @torch.no_grad()
    def evaluate(self, data, eval_iters, seed, ema=None):
        """Student CE and KL(teacher || student) at T=1 on the held-out batches, beside the
        teacher's CE; with an EMA, its weights' CE and KL on the same batches too."""
        stats = self.held_out_stats(data, eval_iters, seed)
        if ema is not None:
            with ema.applied(self.model):
                averaged = self.held_out_stats(data, eval_iters, seed)
            stats.update(ema_val_ce=averaged['val_ce'], ema_val_kl=averaged['val_kl'])
        return stats

    def held_out_stats(self, data, eval_iters, seed):
        batches, t_ce = self.held_out_batches(data, eval_iters, seed)
        self.model.eval()
        totals = torch.zeros(3 + len(self.cognate))  # CE, KL, the projector's CE, Cognate's figures
        for b, t in batches:
            if self.projector is not None:  # KL from the projected teacher, and the projector's CE
                t, p_ce = self.through_projector(*t, b.x)
                totals[2] += p_ce.float().cpu()
            with self.autocast:
                h = self.hidden(b.x, b.attention_mask)
                _, ce, kl = self.eval_kl(h, self.model.lm_head.weight, b.x, b.attention_mask,
                                         b.loss_mask, teacher=t)
            totals[:2] += torch.stack([ce.float().cpu(), kl.float().cpu()])
            if self.cognate:
                counted = counted_tokens(b.x, b.attention_mask, b.loss_mask)
                figures = cognate.terms(self.model, counted)[1]
                totals[3:] += torch.stack([figures[k].float().cpu() for k in self.cognate])
        self.model.train()
        ce, kl, p_ce, *figures = (all_sum(totals) / eval_iters).tolist()
        t_ce = p_ce if self.projector is not None else t_ce
        return {'val_ce': ce, 'val_ppl': math.exp(ce), 'val_kl': kl, 'teacher_val_ce': t_ce,
                'teacher_val_ppl': math.exp(t_ce),
                **{f'val_{k}': v for k, v in zip(self.cognate, figures)}}


def options_for_run(config, model, teacher_model, data, own_vocab):
    """train.py's options, each None when off: (the modules trained beside the student and thrown
    away after, Distill's keyword arguments for them). Matching's projections to the teacher's width
    (matching.py), an own tokenizer's projector (vocab.py), on-policy batches (onpolicy.py)."""
    c, aux = config, torch.nn.ModuleDict()
    matching = Matching.for_run(model.config, teacher_model.config, c['layer_map'],
                                c['feature_weight'], c['attention_weight'], c['feature_loss'])
    if matching and matching.features is not None:
        aux['features'] = matching.features
    if own_vocab:
        aux['projector'] = vocab.Projector(teacher_model.config.hidden_size, model.config.n_embd)
    onpolicy = OnPolicy.for_data(c['onpolicy_frac'], c['onpolicy_temperature'], data, c['seed']) \
        if c['onpolicy_frac'] else None
    return aux, dict(matching=matching, projector=aux['projector'] if own_vocab else None,
                     onpolicy=onpolicy)
