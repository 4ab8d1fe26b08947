# Half the teacher on the plays: SmolLM2-135M-Instruct cut to 16 of its 30 layers at full width, 2 of 3 key/value
# groups and 1,024 of 1,536 neurons (66.08M parameters, 49.1% of it; the agent recipe's half-size shape,
# config/agent_cpu_half.py) and distilled on the quickstart's batches (prune.py; docs/from-the-teacher.md). It is
# the first cut of the two-cut 29.5M student:
#
#   python train.py config/shakespeare_half.py        # cut 1: out-half/best.pt
#   python train.py config/shakespeare_two_cut.py     # cut 2: from out-half/best.pt to 29.5M
#   python eval.py --ckpt out-half/best.pt out-two-cut/best.pt
from pathlib import Path
exec((Path(__file__).parent / 'shakespeare_pruned.py').read_text())  # the one-cut recipe's settings, then these

out_dir = 'out-half'
n_layer = 16  # the 16 of 30 layers of highest Block Influence
n_embd = 0  # 0 = the teacher's: all 576 channels
n_head = 6  # 2 of its 3 key/value groups
n_kv_head = 0
head_dim = 0
mlp_hidden = 1024
max_iters = 60
eval_interval = 30
