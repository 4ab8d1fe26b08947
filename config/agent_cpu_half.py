# The agent recipe's half-size student, stage 1 of 2: SmolLM2-135M-Instruct cut to under half its parameters
# and distilled on the teacher's recorded answers (supervised). Stage 2 (config/agent_cpu_onpolicy.py) starts
# from this run's best.pt and trains on the student's own answers.
#
#   python data/agent/prepare.py                  # once: the teacher answers 2,860 prompts
#   python train.py config/agent_cpu_half.py      # stage 1
#   python train.py config/agent_cpu_onpolicy.py  # stage 2, from out-agent-half/best.pt
#   python eval.py --ckpt out-agent-half/best.pt out-agent-onpolicy/best.pt
from pathlib import Path
exec((Path(__file__).parent / 'agent_cpu.py').read_text())  # the agent recipe's settings, then these

out_dir = 'out-agent-half'
init_from = 'teacher'

# The shape, by calibration CE on the agent data right after the cut, at about 49% of the teacher's parameters:
# 10 layers at the teacher's shape (63.71M) 12.40; 18 layers with 1 of 3 key/value groups and 1,024 neurons
# (65.49M) 6.96; this one (66.08M) 5.92 (the teacher's shape: 3.03). Keeping the width and cutting inside the
# layers also recovered fastest at 29.5M (docs/from-the-teacher.md).
n_layer = 16  # the 16 of 30 layers of highest Block Influence
n_embd = 0  # 0 = the teacher's: all 576 channels
n_head = 6  # 2 of its 3 key/value groups (3 query heads each)
n_kv_head = 0  # follows: n_head / 3
head_dim = 0
mlp_hidden = 1024  # of 1,536: 16 x 2.36M + embedding 28.31M = 66.08M, 49.1% of the teacher's 134.5M
keep_layers = []  # [] = by Block Influence, measured on prune_batches training batches
prune_batches = 8

learning_rate = 1e-3
min_lr = 1e-4
max_iters = 200
eval_interval = 50

kd_loss = 'jsd'
jsd_beta = 0.5
temperature = 1.0
