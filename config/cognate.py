# Seed 001's Cognate student and its MuGrokfast settings, for any recipe: 3 complex-attention blocks of 384
# applied 3 times with shared weights, ACT over the passes, a gated long-term memory of 64 in every block
# (docs/cognate.md). config/shakespeare_cognate.py and config/agent_cpu_cognate.py take it after their recipe's
# settings; on the command line it goes after the recipe's config:
#
#   python train.py config/agent_cpu.py config/cognate.py
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
