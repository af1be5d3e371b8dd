"""LoRA rank sweep on the built-in arithmetic task (Hu et al. 2021, "LoRA", Tables 6 and 7).

The paper's observation: a very small rank (even r = 1 or 2) adapts a pretrained model about as
well as r = 8 or 64, while the trainable parameter count grows linearly with r. Here the
quickstart's pretrained model (configs/quickstart.py: a 0.8M-parameter Qwen3-style model trained
from scratch on the task) is LoRA-SFT'd at r in {1, 2, 4, 8, 16} on every linear layer, and the
held-out accuracy (greedy decoding, exact answer match) is reported with the trainable
parameter count. As in the paper, alpha is held fixed (at the quickstart's 32) rather than
tuned per rank, so the LoRA scale alpha / r changes with r. The pretraining is identical for
every point and runs once (SHARE_PRETRAIN).

  python experiments/run_sweep.py experiments/lora_rank_sweep.py

Results go to experiments/results/lora_rank_sweep/ (results.md, results.csv, results.png; the
runs themselves under runs/, not committed).
"""

NAME = "lora_rank_sweep"
BASE = "configs/quickstart.py"
OVERRIDES = {
    "lora.alpha": 32.0,
    # Only the final model is compared; the sweep keeps the console and the disk quiet.
    "metrics.progress_bar": False,
    "metrics.tensorboard": False,
}
POINTS = [(f"rank{r}", {"lora.rank": r}) for r in (1, 2, 4, 8, 16)]
SHARE_PRETRAIN = True
COLUMNS = {
    "rank r": "lora.rank",
    "trainable params": "trainable_params",
    "% of model": "trainable_percent",
    "accuracy before LoRA": "accuracy_before",
    "accuracy after LoRA": "accuracy_after",
    "final train loss": "sft/loss",
    "held-out loss": "sft_eval/loss",
}
PLOT = {
    "x": "lora.rank",
    "y": ["accuracy_after"],
    "baseline": "accuracy_before",
    "logx": True,
    "title": "held-out accuracy vs LoRA rank (arithmetic task)",
}
