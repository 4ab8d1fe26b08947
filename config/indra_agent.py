# The Indra agent recipe of seed 000, as written: a 12-layer, 768-wide student (201.7M
# parameters with Qwen2.5's 151,936 logits, tied embeddings) distilled from
# Qwen2.5-0.5B-Instruct loaded in 4-bit.
#
#   python train.py config/indra_agent.py
#
# Needs: one CUDA GPU with 6-8 GB or more (seed 000: ~12-13 samples/s at seq 256 on such a
# card), bitsandbytes for the 4-bit teacher and the 8-bit AdamW, and the teacher itself: it
# comes from the Hugging Face hub on first use (about 1 GB) and is cached there. Offline,
# point at a local copy instead:
#   python train.py config/indra_agent.py --teacher=/path/to/Qwen2.5-0.5B-Instruct
#   python train.py config/indra_agent.py --teacher=/path/to/qwen2.5-0.5b-instruct.gguf --teacher_quantization=none
# The first run makes the agent data with this teacher's own answers (data/agent/prepare.py, the teacher
# in bf16 on the GPU), then evaluate with: python eval.py --ckpt out-indra-agent/best.pt
# Wiring check on a CPU with the embedded teacher (a minute or two):
#   python train.py config/indra_agent.py --teacher=smollm2-135m-instruct --dataset=shakespeare \
#       --device=cpu --teacher_quantization=none --max_iters=2 --gradient_accumulation_steps=2 --eval_iters=1
out_dir = 'out-indra-agent'
teacher = 'Qwen/Qwen2.5-0.5B-Instruct'
teacher_quantization = '4bit'
dataset = 'agent'  # instruction data with the teacher's own answers (data/agent/prepare.py)

n_layer = 12
n_head = 12
n_embd = 768
gradient_checkpointing = False  # seed 000: speed over memory, since it fits

block_size = 256  # seed 000: "critical for speed"
batch_size = 1
gradient_accumulation_steps = 32  # an effective batch of 32 sequences

optimizer = 'adamw8bit'  # seed 000: "huge VRAM saver"
dtype = 'auto'  # AMP: bf16 on GPUs that have it, else float16 (the GradScaler switches on by itself)
learning_rate = 3e-4
min_lr = 3e-5
max_iters = 5000
warmup_iters = 200
eval_interval = 250
eval_iters = 40
kd_weight = 0.5
temperature = 2.0
