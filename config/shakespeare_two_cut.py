# The 29.5M student on the plays in two cuts instead of one: the half-size student of config/shakespeare_half.py
# (the teacher cut to 16 layers, 2 of 3 key/value groups, 1,024 neurons, and distilled 60 steps) cut again to
# config/shakespeare_pruned.py's shape as far as it can (6 layers of 384, 6 query heads over 2 key/value heads,
# all its 1,024 neurons: 28.31M) and distilled. Both cuts together take about the wall-clock of the one cut's
# 200 steps (docs/stages.md: 591 s against 656 s on a 2-core Xeon with AMX; val CE 4.7520 against 4.4911):
#
#   python train.py config/shakespeare_half.py        # cut 1: out-half/best.pt
#   python train.py config/shakespeare_two_cut.py     # cut 2
#   python train.py config/shakespeare_pruned.py      # the one cut, for comparison
#   python eval.py --ckpt out-two-cut/best.pt out-pruned/best.pt
from pathlib import Path
exec((Path(__file__).parent / 'shakespeare_pruned.py').read_text())  # the one cut's shape and settings, then these

out_dir = 'out-two-cut'
init_from = 'out-half/best.pt'  # its 6 layers of highest Block Influence, channels and heads by activation
mlp_hidden = 1024  # all of the half-size student's (the one cut keeps 1,200 of the teacher's 1,536)
max_iters = 76  # with cut 1's 60 steps, about the wall-clock of the one cut's 200 (measured)
