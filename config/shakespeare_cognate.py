# Seed 001's Cognate student on the quickstart's teacher and data (docs/cognate.md): 3 complex-attention blocks of
# 384 applied 3 times with shared weights (a tiny recursive model), ACT mixing each token's passes, a gated
# long-term memory of 64 in every block, trained with MuGrokfast (Muon on the blocks' matrices + AdamW + Grokfast):
#
#   python train.py config/shakespeare_cognate.py
#
# 29.50M parameters, as the quickstart's student (the same tied embedding, 64.0%; the blocks' wider MLPs take the
# other three blocks' share), at about 1.7x its FLOPs per token (9 block passes instead of 6) and 1.27x its time
# a step on a 2-core EPYC with bf16. At the quickstart's wall-clock there (153 steps) it ends at val CE 5.15
# against the quickstart's 5.25, and the quickstart's student with MuGrokfast alone at 5.09 (docs/cognate.md).
# Each evaluation prints ACT's mean passes per token and the halting probabilities' variance (seed 001 counted
# a variance above 0.05 as ACT working), and the memory's mean gate.
from pathlib import Path
exec((Path(__file__).parent / 'shakespeare.py').read_text())  # the quickstart's settings, then these

out_dir = 'out-cognate'

n_layer = 3
n_head = 6
n_embd = 384
mlp_hidden = 3584  # 3 x (attention 0.59M + MLP 2.75M + memory 0.20M) + embedding 18.87M = 29.50M
recursions = 3
act = True
act_ponder_weight = 0.01
act_diversity_weight = 0.01  # seed 001's
act_target_variance = 0.1  # seed 001's
ltm = True
ltm_dim = 64
ltm_decay = 0.9

# seed 001's MuGrokfast settings after its "nuclear fix" (halved LRs, a weaker filter)
optimizer = 'mugrokfast'
learning_rate = 5e-4  # AdamW: embedding, norms, biases, the halting head
min_lr = 5e-5
muon_lr = 5e-3  # Muon: the blocks' matrices
grokfast_alpha = 0.98
grokfast_lambda = 0.02
grad_clip = 1.0
