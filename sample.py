"""
Generate text with a trained indra student.

    python sample.py --ckpt out/best.pt
    python sample.py --ckpt out/best.pt --prompt "ROMEO:" --num_samples 3 --max_new_tokens 200
    python sample.py --ckpt out/best.pt --chat --prompt "What is 2 + 3?"

The tokenizer is rebuilt from the checkpoint's teacher spec and checked against the hash the
checkpoint was trained with; a student with its own tokenizer (train.py --student_tokenizer) carries
it in the checkpoint. --chat wraps the prompt in the teacher's chat template and shows the teacher's
answers (same sampling settings) beside the student's.
"""
import argparse
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from checkpoint import load_student
from teacher import load_teacher, load_tokenizer
from tokenizer import chat_prompt, encode, tokenizer_hash

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--ckpt', default='out/best.pt', help='checkpoint written by train.py')
parser.add_argument('--prompt', default=None,
                    help="text to continue (default: a line of verse, or a question with --chat)")
parser.add_argument('--chat', action='store_true',
                    help="wrap the prompt in the teacher's chat template; the teacher answers too")
parser.add_argument('--no_teacher', action='store_true',
                    help='with --chat: the student only (skips loading the teacher)')
parser.add_argument('--num_samples', type=int, default=2)
parser.add_argument('--max_new_tokens', type=int, default=120)
parser.add_argument('--temperature', type=float, default=0.8,
                    help='0 = greedy: the argmax at every step (top_k, top_p then change nothing), '
                    'as transformers generate(do_sample=False) on an export')
parser.add_argument('--top_k', type=int, default=50, help='0 = off')
parser.add_argument('--top_p', type=float, default=1.0, help='1.0 = off')
parser.add_argument('--seed', type=int, default=1337)
parser.add_argument('--ema', action='store_true',
                    help='use the EMA of the weights (runs with ema_decay > 0)')
parser.add_argument('--device', default='cpu')
args = parser.parse_args()
sys.stdout.reconfigure(line_buffering=True)  # every line shows at once, also in a file or a pipe

path = Path(args.ckpt)
model, ckpt = load_student(path, args.ema)  # weights_only=True; any error is one line
model.to(args.device)
torch.manual_seed(args.seed)

teacher = ckpt['config']['teacher']
tokenizer, enc = load_tokenizer(teacher)
if tokenizer_hash(tokenizer) != ckpt['tokenizer_hash']:
    raise SystemExit(f"indra: the tokenizer of teacher {teacher!r} has changed since {path} was "
                     f"trained (hash {tokenizer_hash(tokenizer)} != {ckpt['tokenizer_hash']}); "
                     f"point the teacher spec at the original")

if args.chat:
    prompt = args.prompt or "Write one line of verse about the sea."
    text = chat_prompt(tokenizer, prompt)
else:
    text = args.prompt or "ROMEO:\nBut soft, what light"
t_ids = encode(enc, tokenizer, text)  # a chat template's special tokens become their ids
own = Tokenizer.from_str(ckpt['student_tokenizer']) if ckpt.get('student_tokenizer') else None
ids = own.encode(text).ids if own else t_ids
teacher_decode = lambda new: tokenizer.decode(new, skip_special_tokens=True)  # noqa: E731
decode = own.decode if own else teacher_decode
if len(ids) >= model.config.block_size:
    raise SystemExit(f"indra: the prompt is {len(ids)} tokens, the student's block_size "
                     f"{model.config.block_size}; shorten --prompt")

x = torch.tensor([ids] * args.num_samples, device=args.device)
out = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                     top_p=args.top_p, eos_id=ckpt['eos_id'])
print(f"student of {model.num_params() / 1e6:.1f}M parameters from {path} (step {ckpt['iter_num']}"
      f"{', EMA weights' if args.ema else ''}), teacher {teacher}")
answers = {'student': out[:, len(ids):].tolist()}
if args.chat and not args.no_teacher:  # the teacher answers the same prompt, sampled alike
    t_model, _, _ = load_teacher(teacher, device=args.device)
    torch.manual_seed(args.seed)
    sampling = dict(do_sample=False) if args.temperature <= 0 else dict(
        do_sample=True, temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
    tx = torch.tensor([t_ids] * args.num_samples, device=args.device)
    t_eos = tokenizer.eos_token_id
    t_out = t_model.generate(input_ids=tx, attention_mask=torch.ones_like(tx),
                             max_new_tokens=args.max_new_tokens,
                             eos_token_id=t_eos, pad_token_id=t_eos, **sampling)
    answers['teacher'] = t_out[:, len(t_ids):].tolist()
for i in range(args.num_samples):
    print('-' * 60)
    if args.chat:
        print(f"user: {prompt}")
    for who, rows in answers.items():
        eos = ckpt['eos_id'] if who == 'student' else tokenizer.eos_token_id
        new = rows[i][:rows[i].index(eos)] if eos in rows[i] else rows[i]
        text_out = (decode if who == 'student' else teacher_decode)(new)
        print(f"{who}: {text_out}" if args.chat else text + text_out)
