# The agent recipe's half-size student, stage 2 of 2: on-policy distillation (onpolicy.py, GKD) from the
# supervised student of stage 1 (config/agent_cpu_half.py). Half of its training batches are answered by the
# student itself and the teacher grades every token of those answers with the generalized JSD; the other half
# are the teacher's recorded answers, as in stage 1.
#
#   python data/agent/prepare.py                  # once: the teacher answers 2,860 prompts
#   python train.py config/agent_cpu_half.py      # stage 1: out-agent-half/best.pt
#   python train.py config/agent_cpu_onpolicy.py  # stage 2: out-agent-onpolicy/best.pt
#   python eval.py --ckpt out-agent-half/best.pt out-agent-onpolicy/best.pt
#
# Every published on-policy recipe starts from a student that already learned from fixed data (docs/onpolicy.md):
# from the freshly cut teacher, the same settings hurt.
from pathlib import Path
exec((Path(__file__).parent / 'agent_cpu_half.py').read_text())  # stage 1's settings, then these

out_dir = 'out-agent-onpolicy'
init_from = 'out-agent-half/best.pt'
n_layer = 16  # stage 1's sizes (a smaller one would prune its student again)
n_embd = 576
n_head = 6
mlp_hidden = 1024

onpolicy_frac = 0.5  # GKD's lambda: half the batches answered by the student
onpolicy_temperature = 1.0  # sampled from the student's own distribution, as GKD does
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 10
max_iters = 80
eval_interval = 40
