# Seed 001's Cognate student on the agent recipe (config/agent_cpu.py, data/agent/prepare.py): the same
# recursive student as config/shakespeare_cognate.py (3 blocks of 384 applied 3 times, ACT, a gated memory of
# 64 in every block, MuGrokfast at seed 001's settings), on chat examples, where the collapse watch asks seed
# 001's three questions at every evaluation (docs/cognate.md):
#
#   python data/agent/prepare.py            # once: the teacher answers the prompts
#   python train.py config/agent_cpu_cognate.py
#   python eval.py --ckpt out-agent-cognate/best.pt
from pathlib import Path
exec((Path(__file__).parent / 'agent_cpu.py').read_text())  # the agent recipe's settings
exec((Path(__file__).parent / 'cognate.py').read_text())  # then the Cognate student and MuGrokfast

out_dir = 'out-agent-cognate'
