"""
One batch's distillation: what the teacher says about it, and the loss the student learns from; and
the held-out measure of the same during training. train.py's loop calls loss() per micro-step and
evaluate() at every evaluation; everything that differs between kinds of run is decided here:

  the teacher live      it runs on the batch: its final hidden states (losses.py makes the logits chunk by
                        chunk) and, with matching, the insides of its mapped layers (matching.py)
  cached targets        the batch brings the teacher's top-k log-probs (teacher.py --cache)
  an own tokenizer      the teacher runs on its tokens of the same text; at the aligned positions its state
                        goes through the projector into the student's vocabulary, and the projector learns
                        from its own CE beside the student (vocab.py)
  on-policy             for a share of the example batches the student answers the prompts itself, and the
                        loss is the divergence alone on its answer's tokens (onpolicy.py)

    distill = Distill(model, teacher_model, criterion, autocast, matching=None, projector=None, onpolicy=None)
    loss, parts = distill.loss(batch, at=(step, micro_step))  # parts: 'ce', 'kl' (the divergence), 'feature',
        # 'attention', 'projector_ce', 'onpolicy', a Cognate student's 'passes', 'halt_var', 'gate' (model.cognate_terms)
    stats = distill.evaluate(data, eval_iters=8, seed=1337)
"""
import copy
import math

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import vocab
from losses import DistillationLoss, Teacher, counted_tokens
from machine import all_sum
from matching import teacher_internals
from teacher import teacher_hidden


class HiddenStates(torch.nn.Module):
    """The student up to its final hidden states: (B, T) ids -> (B, T, C); the loss applies the tied head itself.
    A module of its own because DDP synchronizes gradients through a module's forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, attention_mask=None, layers=(), attention_layers=()):
        return self.model.hidden_states(idx, attention_mask, layers, attention_layers)


class Distill:
    """The student model (Indra) learning from teacher_model through criterion (a DistillationLoss, whose
    kd_weight and temperature the loop sets per step), under autocast. matching: a matching.Matching or None;
    projector: the own tokenizer's vocab.Projector or None. compile_on: a batch to compile the student on (None:
    eager); ddp: wrap the training forward in DistributedDataParallel; onpolicy: an onpolicy.OnPolicy or None."""

    def __init__(self, model, teacher_model, criterion, autocast, matching=None, projector=None, compile_on=None,
                 ddp=False, onpolicy=None):
        self.model, self.teacher, self.criterion, self.autocast = model, teacher_model, criterion, autocast
        self.matching, self.projector, self.onpolicy = matching, projector, onpolicy
        self.device = next(model.parameters()).device
        self.teacher_head = teacher_model.get_output_embeddings().weight.to(self.device)  # a copy if device-mapped
        chunk, clamp = criterion.chunk_tokens, criterion.logit_clamp
        self.eval_kl = DistillationLoss(kd_weight=1.0, temperature=1.0, chunk_tokens=chunk, logit_clamp=clamp)
        self.eval_ce = DistillationLoss(kd_weight=0.0, chunk_tokens=chunk)  # the teacher's and the projector's: no clamp
        self.hidden = HiddenStates(model)
        if compile_on is not None:
            self._compile(compile_on)
        # training runs through DDP, which averages the gradients over the ranks in backward; evaluation needs none
        self.train_hidden = DDP(self.hidden, broadcast_buffers=False) if ddp else self.hidden
        self.held_out = None  # (batches with the teacher's targets, the teacher's CE): made at the first evaluation
        cfg = model.config  # a Cognate student's figures (seed 001): ACT's passes and halting variance, the memory gate
        self.cognate = ['passes', 'halt_var'] * cfg.act + ['gate'] * cfg.ltm
        # the parts of the loss in the log ('kl' is the divergence kd_loss)
        self.logged = ['loss', 'ce', 'kl'] + ['projector_ce'] * bool(projector) \
            + ['feature'] * bool(matching and matching.feature_weight) \
            + ['attention'] * bool(matching and matching.attention_weight) + ['onpolicy'] * bool(onpolicy) \
            + self.cognate

    def _compile(self, batch):
        """torch.compile the student now, on a real batch, so that the first timed step is not the compilation;
        where it cannot compile (no C++ compiler, an unsupported platform), say so in one line and run eager."""
        print("compiling the student (torch.compile; a minute or so on a CPU)")
        try:
            self.hidden = torch.compile(HiddenStates(self.model))
            with torch.random.fork_rng(), self.autocast:  # leaves the RNG as it was (dropout draws from it)
                self.hidden(batch.x, batch.attention_mask).sum().backward()
            self.model.zero_grad(set_to_none=True)
        except Exception as e:
            print(f"indra: torch.compile is unavailable here ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  f"running the student uncompiled")
            self.hidden = HiddenStates(self.model)

    # ---- what the teacher says ----
    def run_teacher(self, x, attention_mask=None):
        """The teacher on a batch of its tokens: a Teacher for the loss, and the hidden states and attention of the
        layers mapped for matching ({} when nothing is matched)."""
        m = self.matching
        with torch.no_grad(), self.autocast:
            if not (m and (m.teacher_layers or m.teacher_att)):
                h = teacher_hidden(self.teacher, x, attention_mask)
                return Teacher(hidden=h.to(self.device), head=self.teacher_head), {}
            last, inside = teacher_internals(self.teacher, x, attention_mask, m.teacher_layers, m.teacher_att)
            return Teacher(hidden=last.to(self.device), head=self.teacher_head), inside

    def through_projector(self, h, has, x):
        """The teacher's aligned states h (B, T, Ct), where has, through the projector: (a Teacher over the student's
        vocabulary, the projector's own CE)."""
        return vocab.through_projector(self.projector, self.model.lm_head.weight, h, has, x, self.eval_ce,
                                       self.autocast)

    def teacher_says(self, b):
        """(a Teacher for the loss or None, the insides of the layers mapped for matching, the projector's CE or
        None) for the data.Batch b."""
        if self.projector is not None:
            t, p_ce = self.through_projector(*vocab.aligned_teacher(self.teacher, b, self.autocast), b.x)
            return t, {}, p_ce
        if b.cached is not None:
            return b.cached, {}, None
        if self.criterion.kd_weight > 0 or self.matching or b.sampled:
            return (*self.run_teacher(b.x, b.attention_mask), None)
        return None, {}, None

    # ---- the student's loss ----
    def loss(self, b, at=(0, 0)):
        """The loss of one micro-batch, to backprop, and its parts, detached, for the log: 'ce', 'kl' (the
        divergence kd_loss), and when switched on 'feature', 'attention', 'projector_ce' and 'onpolicy' (1 when
        the student answered this batch). at: (optimizer step, micro-step), which seed on-policy sampling."""
        if self.onpolicy is not None and self.onpolicy.chosen(*at):
            b = self.onpolicy.sampled(self.model, b, *at, self.autocast)
        criterion = self.criterion
        if b.sampled:  # the student's own tokens are no labels: the divergence alone (GKD), the CE only logged
            criterion = copy.copy(criterion)
            criterion.kd_weight = 1.0
        t, inside, p_ce = self.teacher_says(b)
        parts = {} if p_ce is None else {'projector_ce': p_ce.detach()}
        if self.onpolicy is not None:
            parts['onpolicy'] = torch.tensor(float(b.sampled))
        x, am, m = b.x, b.attention_mask, self.matching
        with self.autocast:
            if m:
                h, mine = self.train_hidden(x, am, m.student_layers, m.student_att)
            else:
                h = self.train_hidden(x, am)
            loss, parts['ce'], parts['kl'] = criterion(h, self.model.lm_head.weight, x, am, b.loss_mask, teacher=t)
            if self.cognate:  # ACT's ponder cost and diversity term, over the tokens the loss counts
                extra, figures = self.model.cognate_terms(counted_tokens(x, am, b.loss_mask))
                loss = loss + extra
                parts.update(figures)
            if p_ce is not None:
                loss = loss + p_ce  # the projector learns from its own CE, beside the student
            for k, part in (m.losses(mine, inside, am) if m else {}).items():  # feature, then attention matching
                parts[k] = part
                loss = loss + m.weight[k] * part
        return loss, {k: v.detach().float().item() for k, v in parts.items()}

    # ---- the held-out measure ----
    @torch.no_grad()
    def held_out_batches(self, data, eval_iters, seed):
        """eval_iters fixed held-out batches, each with what the teacher says about it, and the teacher's CE on them.
        The batches are the same at every evaluation and the teacher is frozen, so its forward runs once per run
        (a few MB of hidden states), not at every evaluation and again for the EMA weights. An own tokenizer keeps
        the teacher's aligned states: what the projector makes of them changes as it learns.
        Under torchrun each rank keeps every world_size-th batch; the sums are then taken over all ranks."""
        if self.held_out is None:
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            print(f"held-out set: {eval_iters} batches of {data.batch_size} x {data.block_size}; the teacher runs on "
                  f"them once, now")
            gen = torch.Generator().manual_seed(seed + 1)
            batches, t_ce = [], torch.zeros(())
            for i in range(eval_iters):
                b = data.batch('val', gen, load=i % world == rank)
                if b is None:
                    continue
                if self.projector is not None:
                    batches.append((b, vocab.aligned_teacher(self.teacher, b, self.autocast)))
                    continue
                t = self.run_teacher(b.x, b.attention_mask)[0]
                with self.autocast:
                    t_ce += self.eval_ce(t.hidden, t.head[:self.model.config.vocab_size], b.x, b.attention_mask,
                                         b.loss_mask)[1].float().cpu()
                batches.append((b, t))
            self.held_out = batches, (all_sum(t_ce) / eval_iters).item()
        return self.held_out

    @torch.no_grad()
    def evaluate(self, data, eval_iters, seed, ema=None):
        """Student CE and KL(teacher || student) at T=1 on the held-out batches, beside the teacher's CE; with an
        EMA, its weights' CE and KL on the same batches too (ema_val_ce, ema_val_kl; seed 002). An own tokenizer:
        KL from the projected teacher, and the projected teacher's CE on the student's tokens."""
        stats = self.held_out_stats(data, eval_iters, seed)
        if ema is not None:
            with ema.applied(self.model):
                averaged = self.held_out_stats(data, eval_iters, seed)
            stats.update(ema_val_ce=averaged['val_ce'], ema_val_kl=averaged['val_kl'])
        return stats

    def held_out_stats(self, data, eval_iters, seed):
        batches, t_ce = self.held_out_batches(data, eval_iters, seed)
        self.model.eval()
        totals = torch.zeros(3 + len(self.cognate))  # CE, KL, projector CE, the Cognate figures
        for b, t in batches:
            if self.projector is not None:
                t, p_ce = self.through_projector(*t, b.x)
                totals[2] += p_ce.float().cpu()
            with self.autocast:
                _, ce, kl = self.eval_kl(self.hidden(b.x, b.attention_mask), self.model.lm_head.weight, b.x,
                                         b.attention_mask, b.loss_mask, teacher=t)
            totals[:2] += torch.stack([ce.float().cpu(), kl.float().cpu()])
            if self.cognate:
                figures = self.model.cognate_terms(counted_tokens(b.x, b.attention_mask, b.loss_mask))[1]
                totals[3:] += torch.stack([figures[k].float().cpu() for k in self.cognate])
        self.model.train()
        ce, kl, p_ce, *cognate = (all_sum(totals) / eval_iters).tolist()
        t_ce = p_ce if self.projector is not None else t_ce
        return {'val_ce': ce, 'val_ppl': math.exp(ce), 'val_kl': kl, 'teacher_val_ce': t_ce,
                'teacher_val_ppl': math.exp(t_ce), **{f'val_{k}': v for k, v in zip(self.cognate, cognate)}}
