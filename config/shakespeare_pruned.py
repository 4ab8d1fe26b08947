# The quickstart (config/shakespeare.py) with a student cut from the teacher instead of started at random:
# SmolLM2-135M-Instruct (30 layers of 576, 9 query heads over 3 key/value heads of 64, a SwiGLU MLP of 1,536,
# 134.5M parameters) pruned to the quickstart student's size, 29.5M parameters with the tied embedding, then
# distilled on the same 200 steps of 8 x 256 tokens (prune.py, Minitron-style):
#
#   python train.py config/shakespeare_pruned.py
#
# It keeps the 6 of 30 layers of highest Block Influence, the 384 of 576 embedding channels, 2 of 3 key/value
# groups (6 query heads) and 1,200 of 1,536 MLP neurons in each layer that carry the most activation on 8
# training batches, and prints what it kept and the CE before and after. The 0s below are the teacher's.
from pathlib import Path
exec((Path(__file__).parent / 'shakespeare.py').read_text())  # the quickstart's settings, then these

out_dir = 'out-pruned'
init_from = 'teacher'

n_layer = 6
n_embd = 384
n_head = 6  # 2 whole key/value groups of the teacher's 3 query heads each
n_kv_head = 0  # follows: n_head / 3
head_dim = 0
mlp_hidden = 1200  # 6 x (attention 0.39M + MLP 1.38M) + embedding 18.87M = 29.53M (the quickstart's: 29.50M)
keep_layers = []  # [] = by Block Influence; e.g. [0, 6, 12, 18, 24, 29] for evenly spaced
prune_batches = 8

learning_rate = 1e-3  # inherited weights: half the quickstart's from-scratch rate
min_lr = 1e-4
