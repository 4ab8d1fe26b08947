"""
Use the student elsewhere: a checkpoint as a Hugging Face directory (transformers, vLLM) or as one GGUF file
(llama.cpp, Ollama). A student with a SwiGLU MLP is a Llama, and with q/k/v biases a Qwen2, weight for weight:
each head's [Re | Im] halves are the pairs (i, i + d/2) that rotate_half turns (inherit.py), so the one name
table through which init_from='teacher' reads a teacher (inherit.weight_table) writes the student back out,
each stacked student tensor split by the rows of the Hugging Face tensors it holds. What to run next with
each target: docs/export.md.

    python export.py --ckpt out/best.pt --out out/hf                              # transformers, vLLM
    python export.py --ckpt out/best.pt --format gguf --out out/student.gguf      # llama.cpp, Ollama
    python export.py --ckpt out/best.pt --out out/hf-bf16 --dtype bfloat16 --ema  # the EMA weights, in bf16

The tokenizer is the checkpoint's (the teacher's files as train.py saved them, or the student's own BPE).
Nothing is written unless all of it is: the export is made under a temporary name beside --out and renamed
into place at the end.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

import vocab
from checkpoint import load_student
from export_gguf import gguf_plan
from inherit import ARCHITECTURES, weight_table
from teacher import resolve
from tokenizer import tokenizer_hash

# text where tokenizers that split differently differ: digits, contractions in capitals, runs of blanks, non-Latin
PROBE = "ROMEO: Who's THERE? 'Tis I -- in 1599, at 3.14159;\n\n  \tnaïve  café, 日本語のテキスト ١٢٣ I'LL go.  "
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
CLASSES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}
# Every IndraConfig field, and what a Llama or Qwen2 config makes of it. The rest cannot be held by either:
# export refuses those, naming the setting that would make the student exportable. tests/test_export.py checks
# that this table covers every field, so a new student setting has to be placed here.
HELD = {'vocab_size': 'vocab_size', 'block_size': 'max_position_embeddings', 'n_layer': 'num_hidden_layers',
        'n_head': 'num_attention_heads', 'n_embd': 'hidden_size', 'n_kv_head': 'num_key_value_heads',
        'head_dim': 'head_dim', 'mlp_hidden': 'intermediate_size', 'qkv_bias': 'Qwen2 when True, else Llama',
        'tie_head': 'tie_word_embeddings', 'norm_eps': 'rms_norm_eps', 'rope_base': 'rope_theta',
        'dropout': 'training only', 'attn_impl': 'two kernels of one computation',
        'gradient_checkpointing': 'training only'}
REFUSED = {'mlp': (lambda c: c.mlp != 'swiglu', "mlp={v!r}: Llama and Qwen2 have SwiGLU MLPs (train with --mlp=swiglu)"),
           'logit_clamp': (lambda c: c.logit_clamp > 0, ("logit_clamp={v:g}: neither bounds its logits by c * tanh(logits"
                                                          " / c) (train with --logit_clamp=0)"))}
# Seed 001's Cognate student (cognate.py): its settings are refused together, in one message (check_exportable)
COGNATE = ('recursions', 'act', 'act_ponder_weight', 'act_diversity_weight', 'act_target_variance', 'ltm', 'ltm_dim',
           'ltm_decay')
REFUSED.update(dict.fromkeys(COGNATE, (lambda c: c.recursions > 1 or c.ltm, (
    "recursions, ACT and a long-term memory (a Cognate student, seed 001) have no place in either: sample and "
    "evaluate it with sample.py and eval.py (to export, train with --recursions=1 --ltm=False)"))))


def fail(msg):
    raise SystemExit(f"indra: {msg}")


def check_exportable(cfg, where):
    """One line naming every setting of this student that no Llama or Qwen2 can hold, with the one that can."""
    bad = list(dict.fromkeys(msg.format(v=getattr(cfg, k)) for k, (refused, msg) in REFUSED.items() if refused(cfg)))
    if bad:
        fail(f"{where} holds a student that no standard architecture computes: {'; '.join(bad)}")


def checkpoint_tokenizer(ckpt, where):
    """The Hugging Face tokenizer the student reads: its own BPE, or the teacher's files kept in the checkpoint. A
    checkpoint saved before it kept them falls back, in one printed line, to the teacher spec if it still resolves."""
    if ckpt.get('student_tokenizer'):  # a byte-level BPE trained with the data (vocab.py), no chat template
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(ckpt['student_tokenizer']),
                                       eos_token=vocab.EOS, pad_token=vocab.EOS)
    spec = ckpt['config']['teacher']
    if ckpt.get('tokenizer_files'):
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in ckpt['tokenizer_files'].items():
                (Path(tmp) / name).write_text(text, encoding='utf-8')
            tok = AutoTokenizer.from_pretrained(tmp)
    else:
        print(f"indra: {where} was saved before checkpoints kept their tokenizer; taking the tokenizer of teacher {spec!r}")
        try:
            path = resolve(spec)
        except SystemExit as e:  # the reason, in this line: the teacher spec is all an old checkpoint has
            fail(f"{where} keeps no tokenizer (it was saved before checkpoints did) and its teacher {spec!r} is gone "
                 f"({str(e).removeprefix('indra: ').split(';')[0]}); export where that teacher is, or train again")
        tok = AutoTokenizer.from_pretrained(path)
    if tokenizer_hash(tok) != ckpt['tokenizer_hash']:
        fail(f"the tokenizer of {where} (teacher {spec!r}) is not the one it was trained with (hash "
             f"{tokenizer_hash(tok)} != {ckpt['tokenizer_hash']}); point the teacher spec at the original")
    return tok


def hf_config(cfg, tok, eos_id, dtype):
    """The Llama (or, with q/k/v biases, Qwen2) config that computes what this student computes."""
    kind = next(k for k, bias in ARCHITECTURES.items() if bias == cfg.qkv_bias)
    # norm_eps 0 is the activations' machine epsilon (model.py): float32's, in the float32 the student keeps them in
    eps = cfg.norm_eps or torch.finfo(torch.float32).eps
    return AutoConfig.for_model(
        kind, architectures=[CLASSES[kind]], vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
        intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim, hidden_act='silu',
        max_position_embeddings=cfg.block_size, rms_norm_eps=eps, tie_word_embeddings=cfg.tie_head,
        rope_parameters={'rope_type': 'default', 'rope_theta': cfg.rope_base}, bos_token_id=tok.bos_token_id,
        eos_token_id=eos_id, pad_token_id=eos_id if tok.pad_token_id is None else tok.pad_token_id,
        dtype=str(dtype).removeprefix('torch.'))


def hf_tensors(model, config):
    """{Hugging Face name: float32 tensor}: each student tensor split along dim 0 by the rows of the tensors it
    stacks (inherit.weight_table read the other way), their shapes those of transformers' own model for config
    (built on the meta device: shapes, no memory). A tied head is the embedding, stored once."""
    with torch.device('meta'):
        shapes = {k: p.shape for k, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    params, out = dict(model.named_parameters()), {}
    for name, targets in weight_table(model.config):
        rows = [shapes[t][0] for t in targets]
        assert sum(rows) == params[name].shape[0], f"{name} has {params[name].shape[0]} rows, {targets} {rows}"
        for t, part in zip(targets, params[name].detach().float().split(rows)):
            assert part.shape == shapes[t], f"{name} -> {t}: {tuple(part.shape)}, transformers has {tuple(shapes[t])}"
            out[t] = part.clone()
    assert set(out) == set(shapes), f"the weight table leaves out {sorted(set(shapes) - set(out))}"
    return out


def write_hf(path, config, tensors, tok, dtype):
    """config.json, the tokenizer with its chat template (read back as AutoTokenizer will read it: it must tokenize as
    the student's does), model.safetensors and generation_config.json with its eos."""
    path.mkdir()
    config.rope_theta = config.rope_parameters['rope_theta']  # the key transformers 4 (and what runs on it) reads
    config.save_pretrained(path)
    tok.save_pretrained(path)
    settings = json.loads((path / 'tokenizer_config.json').read_text())
    settings['tokenizer_class'] = 'PreTrainedTokenizerFast'  # tokenizer.json as it is, in transformers 4 and 5 alike
    (path / 'tokenizer_config.json').write_text(json.dumps(settings, indent=2, ensure_ascii=False) + '\n')
    # transformers picks the tokenizer class from the model type where it has one: every qwen2 directory's becomes a
    # Qwen2Tokenizer, which splits text Qwen2's way whatever tokenizer.json says
    back = AutoTokenizer.from_pretrained(path)
    texts = [PROBE] + ([tok.apply_chat_template([{'role': 'user', 'content': PROBE}], tokenize=False)]
                       if tok.chat_template else [])
    wrong = next((t for t in texts if back(t, add_special_tokens=False).input_ids
                  != tok(t, add_special_tokens=False).input_ids), None)
    if wrong is not None:
        fail(f"transformers reads the tokenizer of a {config.model_type} directory as {type(back).__name__}, which "
             f"tokenizes {wrong[:30]!r}... otherwise than this student's tokenizer; export it with --format gguf, "
             f"or train a Llama-shaped student (--qkv_bias=False)")
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, path / 'model.safetensors',
              metadata={'format': 'pt'})
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(path)


def export(ckpt_path, out, fmt='hf', dtype='float32', ema=False):
    """Check everything first (the checkpoint, the student's shape, its tokenizer, --out), then write --out whole."""
    out = Path(out)
    if out.exists():
        fail(f"{out} exists; remove it or pass another --out")
    model, ckpt = load_student(ckpt_path, ema)
    check_exportable(model.config, ckpt_path)
    tok = checkpoint_tokenizer(ckpt, ckpt_path)
    config = hf_config(model.config, tok, ckpt['eos_id'], DTYPES[dtype])
    tensors = hf_tensors(model, config)
    if fmt == 'gguf':
        # checks the tokenizer and names the tensors now, before anything is written
        write = gguf_plan(config, tensors, tok, None if ckpt.get('student_tokenizer') else ckpt['config']['teacher'],
                          dtype)
    else:
        write = partial(write_hf, config=config, tensors=tensors, tok=tok, dtype=DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f'.{out.name}.tmp-{os.getpid()}')
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    print(f"exported {ckpt_path} (step {ckpt['iter_num']}{', EMA weights' if ema else ''}) -> {out}: "
          f"{config.architectures[0]}, {model.config.describe()}, {dtype}"
          + (f"; rms_norm_eps {config.rms_norm_eps:.3g} (float32's machine epsilon)" if not model.config.norm_eps
             else ''))
    return out


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', default='out/best.pt', help='checkpoint written by train.py')
    parser.add_argument('--out', required=True, help='a directory (hf) or a .gguf file (gguf); must not exist')
    parser.add_argument('--format', default='hf', choices=['hf', 'gguf'])
    parser.add_argument('--dtype', default='float32', choices=list(DTYPES),
                        help="the weights' dtype (gguf: norms and biases stay float32, as llama.cpp keeps them)")
    parser.add_argument('--ema', action='store_true', help='export the EMA of the weights (runs with ema_decay > 0)')
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    export(args.ckpt, args.out, args.format, args.dtype, args.ema)
