"""
Seeing what training does: the FLOPs behind every log line's MFU, repetition statistics that
catch a collapsing student, and the run's records (out/log.jsonl always; Weights & Biases and
Aim when switched on). Used by train.py and bench.py; plot.py draws the records; the peak an
MFU is taken against, and memory, come from machine.py.

    rec = Records(out_dir, config, wandb_log=True, wandb_mode='offline')
    rec.log({'iter': 10, 'loss': 3.2})
    repetition(ids)  ->  {'distinct_1': .., 'distinct_2': .., 'top_share': ..}
    watch(model, prompts, ...)  ->  a sample per fixed prompt, with its repetition statistics

MFU counts FLOPs with the PaLM formula (Chowdhery et al. 2022, appendix B): 6N + 12 L T C per
trained token and 2N + 4 L T C per teacher token (forward only), N the parameters that take part
in matmuls (a tied head once, an embedding lookup not), against machine.peak_flops(): measured on
a CPU (the best of several matmuls in the training dtype), looked up for a GPU (dense, no sparsity).
"""
import importlib
import json
import uuid
from collections import Counter
from pathlib import Path

import torch

from tokenizer import chat_prompt

# Fixed prompts for the mode-collapse watch: seed 001's test questions for chat data, a line of verse otherwise.
WATCH_PROMPTS = {'chat': ['If a store has 15 apples and sells 7, how many are left?', 'What is 25 + 17?',
                          'The capital of France is Paris. What is the capital of France?'],
                 'text': ['ROMEO:\nBut soft, what light through yonder window breaks?\n']}


def student_flops_per_token(model, block_size):
    """Forward + backward FLOPs per trained token: 6N for the matmuls (N without the embedding when the head has a
    matrix of its own: a lookup is no matmul) + 12 L T (n_head head_dim) for the attention scores and output."""
    cfg, attn = model.config, model.blocks[0].attn
    n = model.num_params() - (0 if cfg.tie_head else model.wte.weight.numel())
    n += (cfg.recursions - 1) * sum(p.numel() for p in model.blocks.parameters())  # Cognate: every pass, the blocks
    return 6 * n + 12 * cfg.n_layer * cfg.recursions * block_size * attn.n_head * attn.head_dim


def teacher_flops_per_token(teacher, block_size):
    """Forward FLOPs per token (2N + 4 L T C) of a Hugging Face causal LM."""
    cfg = teacher.config
    n = sum(p.numel() for p in teacher.parameters())
    if not getattr(cfg, 'tie_word_embeddings', False):
        n -= teacher.get_input_embeddings().weight.numel()  # a lookup, not a matmul; the separate head is
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * n + 4 * cfg.num_hidden_layers * block_size * cfg.num_attention_heads * head_dim


def repetition(ids):
    """Distinct-n (unique n-grams / n-grams, Li et al. 2016) and the share of the most frequent token, for one
    generated sequence of token ids. A collapsed student (seed 001: '::::::', 'did did did') has distinct-2
    near 0 and one token taking most of the output."""
    n = len(ids)
    grams = lambda k: [tuple(ids[i:i + k]) for i in range(n - k + 1)]
    distinct = lambda k: len(set(grams(k))) / max(1, n - k + 1)
    return {'distinct_1': distinct(1), 'distinct_2': distinct(2),
            'top_share': Counter(ids).most_common(1)[0][1] / n if n else 0.0}


def collapsed(stats, min_distinct_2=0.3, max_top_share=0.5):
    """True when a generation looks like mode collapse: few distinct bigrams, or one token dominating."""
    return stats['distinct_2'] < min_distinct_2 or stats['top_share'] > max_top_share


@torch.no_grad()
def watch(model, prompts, texts, encode, decode, tokens, seed, block_size, autocast, device):
    """Sample `tokens` tokens from each fixed prompt (texts: the prompts as the student reads them, e.g. in the
    chat template) with a fixed seed, temperature 1 and no filtering (the distribution as it is), and measure the
    repetition in what came out. Seed 001's collapsed runs answered every question with colons or 'did did did';
    this is the check it ran by hand, at every evaluation. Training's RNG is left as it was."""
    results = []
    model.eval()
    gpus = [torch.device(device).index or torch.cuda.current_device()] if str(device).startswith('cuda') else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        for prompt, text in zip(prompts, texts):
            ids = encode(text)[-(block_size // 2):]
            with autocast:
                out = model.generate(torch.tensor([ids], device=device), tokens, temperature=1.0)
            new = out[0, len(ids):].tolist()
            results.append({'prompt': prompt, 'sample': decode(new), **repetition(new)})
    model.train()
    return results


class Watch:
    """A run's collapse watch: `tokens` tokens sampled from fixed prompts at every evaluation (in the chat
    template on chat data, with the questions of the Cognate recipe), and how repetitive they are."""

    def __init__(self, data, tokenizer, tokens, seed, autocast, device):
        chat = data.meta.get('chat')
        self.prompts = WATCH_PROMPTS['chat' if chat else 'text']
        self.texts = [chat_prompt(tokenizer, p) if chat else p for p in self.prompts]
        self.data, self.tokens, self.seed, self.autocast, self.device = data, tokens, seed, autocast, device

    def sample(self, model, block_size):
        """The samples and their worst figures, for the evaluation's record."""
        samples = watch(model, self.prompts, self.texts, self.data.encode, self.data.decode, self.tokens,
                        self.seed, block_size, self.autocast, self.device)
        return dict(watch=samples, watch_distinct_2=min(r['distinct_2'] for r in samples),
                    watch_top_share=max(r['top_share'] for r in samples))

    @staticmethod
    def lines(samples):
        return '\n'.join(watch_lines(samples))


def step_line(r, logged, memory):
    """The printed line of one optimizer step, from its record r, the logged parts of its loss and its memory."""
    parts = ', '.join(f'{k} {v:.4f}' for k, v in logged.items() if k != 'loss')
    return (f"iter {r['iter']}: loss {r['loss']:.4f} ({parts}, kd {r['kd_weight']:.2f}, T {r['temperature']:.2f}) | "
            f"lr {r['lr']:.2e}, grad norm {r['grad_norm']:.2f} | {r['dt'] * 1000:.0f} ms, {r['samples_per_s']:.1f} "
            f"samples/s, {r['tokens_per_s']:,.0f} tok/s, MFU {'%.1f%%' % (100 * r['mfu']) if r['mfu'] else 'n/a'} | "
            f"{memory}")


def eval_line(stats, own_vocab):
    """The printed line of one evaluation (the teacher seen through the projector when the student has its own
    tokenizer)."""
    who = 'projected teacher' if own_vocab else 'teacher'
    line = (f"val CE {stats['val_ce']:.4f} (ppl {stats['val_ppl']:.1f}), KL to {who} {stats['val_kl']:.4f}, {who} CE "
            f"{stats['teacher_val_ce']:.4f} (ppl {stats['teacher_val_ppl']:.1f})")
    if 'ema_val_ce' in stats:
        line += f"; EMA val CE {stats['ema_val_ce']:.4f}, KL {stats['ema_val_kl']:.4f}"
    if 'val_passes' in stats:  # seed 001 counted a halting variance above 0.05 as ACT working
        line += f"; ACT {stats['val_passes']:.2f} passes per token, halting variance {stats['val_halt_var']:.4f}"
    if 'val_gate' in stats:
        line += f"; memory gate {stats['val_gate']:.3f}"
    return line


def watch_lines(samples):
    """The printed lines for the watch's samples: each sample, and a loud warning for one that looks collapsed."""
    lines = []
    for r in samples:
        lines.append(f"  watch: {r['sample'][:100]!r} (distinct-2 {r['distinct_2']:.2f}, top token {r['top_share']:.0%})")
        if collapsed(r):
            lines.append(f"  !!! MODE COLLAPSE? the student answers {r['prompt'][:40]!r} with {r['sample'][:60]!r}: "
                         f"{r['distinct_2']:.0%} distinct bigrams, one token is {r['top_share']:.0%} of it (seed 001). "
                         f"Check the KL in training.png; lower learning_rate or raise kd_weight")
    return lines


def require(module, switch):
    """Import an optional logger only when its switch is on; if it is missing, one line saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"indra: --{switch}=True needs the {module} package: pip install {module} "
                         f"(or run with --{switch}=False)") from None


class Records:
    """Every record goes to out_dir/log.jsonl (one JSON object per line); numeric fields also go to
    Weights & Biases (seed 001, offline mode supported) and Aim (seed 003) when switched on."""

    def __init__(self, out_dir, config, resume=False, wandb_log=False, wandb_project='indra', wandb_run_name='',
                 wandb_mode='online', aim_log=False, aim_repo=''):
        self.path = Path(out_dir) / 'log.jsonl'
        self.wandb = self.aim = None
        if wandb_log:
            wandb = require('wandb', 'wandb_log')
            id_file = Path(out_dir) / 'wandb_run_id'  # a resumed run continues the same W&B run
            run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name or None, mode=wandb_mode, id=run_id,
                                    config=config, dir=str(out_dir), resume='allow')
        if aim_log:
            aim = require('aim', 'aim_log')
            self.aim = aim.Run(repo=aim_repo or str(out_dir), experiment=wandb_project)
            self.aim['hparams'] = config

    @classmethod
    def for_run(cls, out_dir, config, resume):
        """The records of a train.py run, with the trackers its settings switch on."""
        keys = ('wandb_log', 'wandb_project', 'wandb_run_name', 'wandb_mode', 'aim_log', 'aim_repo')
        return cls(out_dir, config, resume, **{k: config[k] for k in keys})

    def log(self, record):
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != 'iter'}
        if self.wandb is not None:
            self.wandb.log(numbers, step=record['iter'])
        if self.aim is not None:
            for k, v in numbers.items():
                self.aim.track(v, name=k, step=record['iter'])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.aim is not None:
            self.aim.close()
