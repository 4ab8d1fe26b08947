# The agent recipe of seed 000 at CPU size: distill the embedded SmolLM2-135M-Instruct into the
# quickstart's 29.5M complex-attention student on the agent instructions (data/agent/prepare.py):
# padded chat examples, the loss on the assistant's tokens only, the teacher's logits on its own
# greedy answers.
#
#   python data/agent/prepare.py            # once: the teacher answers 2,860 prompts (~12 min)
#   python train.py config/agent_cpu.py     # 17.5 min on 2 CPU cores (Xeon, AVX-512 bf16): val CE 10.9 -> 2.1
#                                           # (the teacher: 0.62 on its own answers)
#   python eval.py --ckpt out-agent/best.pt
#   python sample.py --ckpt out-agent/best.pt --chat --prompt "What is 12 + 7? Answer with only the number."
out_dir = 'out-agent'
dataset = 'agent'
teacher = 'smollm2-135m-instruct'

n_layer = 6
n_head = 6
n_embd = 384
block_size = 256  # every example fits: prompt + answer <= ~190 tokens
batch_size = 16  # examples per step, padded to the longest
gradient_accumulation_steps = 1

learning_rate = 2e-3
min_lr = 2e-4
max_iters = 420
warmup_iters = 20
eval_interval = 140
eval_iters = 8
log_interval = 20

kd_weight = 0.5
temperature = 2.0
device = 'cpu'
dtype = 'auto'  # bf16 autocast where this CPU runs it faster than float32 (measured at start), else float32
