# The agent recipe on a CPU (config/agent_cpu.py) with the student cut from the teacher instead of started at
# random: SmolLM2-135M-Instruct pruned to 29.5M parameters (a fifth of it; docs/from-the-teacher.md), then
# distilled on the teacher's recorded answers. The shape is the one that recovered fastest in the pruning
# ablations at this size: depth kept over width (12 layers of 384, 1 of 3 key/value groups, 600 MLP neurons).
#
#   python data/agent/prepare.py              # once: the teacher answers 2,860 prompts
#   python train.py config/agent_cpu_pruned.py
#   python eval.py --ckpt out-agent-pruned/best.pt
#
# The divergence is GKD's JSD at T=1 (Agarwal et al. 2024), the one config/agent_cpu_onpolicy.py grades the
# student's own answers with, so the two differ in onpolicy_frac alone. Figures: docs/onpolicy.md.
from pathlib import Path
exec((Path(__file__).parent / 'agent_cpu.py').read_text())  # the agent recipe's settings, then these

out_dir = 'out-agent-pruned'
init_from = 'teacher'

n_layer = 12
n_embd = 384
n_head = 3  # 1 whole key/value group of the teacher's 3 query heads
n_kv_head = 0  # follows: n_head / 3
head_dim = 0
mlp_hidden = 600  # 12 x (attention 0.20M + MLP 0.69M) + embedding 18.87M = 29.54M (the agent student's: 29.50M)
keep_layers = []  # [] = by Block Influence, measured on prune_batches training batches
prune_batches = 8

learning_rate = 1e-3  # inherited weights: half the from-scratch rate, as config/shakespeare_pruned.py
min_lr = 1e-4
max_iters = 200
eval_interval = 50

kd_loss = 'jsd'
jsd_beta = 0.5
temperature = 1.0
