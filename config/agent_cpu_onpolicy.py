# On-policy distillation (onpolicy.py, GKD) on the agent recipe: the student cut from the teacher
# (config/agent_cpu_pruned.py) answers half of its training batches itself, and the teacher grades every token
# of those answers with the generalized JSD; the other half are the teacher's recorded answers, as before.
#
#   python data/agent/prepare.py                 # once: the teacher answers 2,860 prompts
#   python train.py config/agent_cpu_onpolicy.py
#   python train.py config/agent_cpu_onpolicy.py --onpolicy_frac=0 --max_iters=200 --out_dir=out-agent-pruned
#   python eval.py --ckpt out-agent-pruned/best.pt out-agent-onpolicy/best.pt
#
# The second run is config/agent_cpu_pruned.py: the same student and loss on recorded answers alone, for the
# same wall-clock. An on-policy step costs more than a supervised one (the student samples up to 64 tokens for
# 16 prompts first), so this run takes fewer steps; the figures are in docs/onpolicy.md.
from pathlib import Path
exec((Path(__file__).parent / 'agent_cpu_pruned.py').read_text())  # the pruned agent recipe, then these

out_dir = 'out-agent-onpolicy'
onpolicy_frac = 0.5  # GKD's lambda: half the batches answered by the student
onpolicy_temperature = 1.0  # sampled from the student's own distribution, as GKD does
max_iters = 120  # the wall-clock of config/agent_cpu_pruned.py's 200 supervised steps: here an on-policy step
                 # took 2.2x a supervised one (7.4-9.8 s against 3.2-3.5 s), so a mixed step 1.64x
eval_interval = 40
