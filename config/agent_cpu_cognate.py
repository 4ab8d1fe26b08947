# Seed 001's Cognate student on the agent recipe (config/agent_cpu.py, data/agent/prepare.py): the same
# recursive student as config/shakespeare_cognate.py (3 blocks of 384 applied 3 times, ACT, a gated memory of
# 64 in every block, MuGrokfast at seed 001's settings), on chat examples, where the collapse watch asks seed
# 001's three questions at every evaluation (docs/cognate.md):
#
#   python data/agent/prepare.py            # once: the teacher answers the prompts
#   python train.py config/agent_cpu_cognate.py
#   python eval.py --ckpt out-agent-cognate/best.pt
from pathlib import Path
exec((Path(__file__).parent / 'agent_cpu.py').read_text())  # the agent recipe's settings, then these

out_dir = 'out-agent-cognate'

n_layer = 3
n_head = 6
n_embd = 384
mlp_hidden = 3584  # 29.50M parameters, as config/agent_cpu.py's student
recursions = 3
act = True
ltm = True
ltm_dim = 64
ltm_decay = 0.9

optimizer = 'mugrokfast'  # seed 001's settings, as config/shakespeare_cognate.py
learning_rate = 5e-4
min_lr = 5e-5
muon_lr = 5e-3
grokfast_alpha = 0.98
grokfast_lambda = 0.02
grad_clip = 1.0
