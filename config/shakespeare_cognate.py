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
exec((Path(__file__).parent / 'shakespeare.py').read_text())  # the quickstart's settings
exec((Path(__file__).parent / 'cognate.py').read_text())  # then the Cognate student and MuGrokfast

out_dir = 'out-cognate'
