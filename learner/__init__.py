"""The Mask-GRPO learner: advantages, the clipped objective, step reduction, a DeepSpeed engine,
weight export to rollout workers and crash-safe checkpoints.

On every learner rank (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set by the launcher; none needed for
one process; ``DS_ACCELERATOR=cpu`` on the CPU)::

    learner = Learner(Showo.from_pretrained(path), LearnerConfig(zero_stage=2, reduction="first_k"))
    if (ck := latest_checkpoint(root)) is not None:
        learner.resume(ck)
    metrics = learner.train_step(groups, rewards, prompts)     # this rank's groups; all ranks together
    for bucket in learner.iter_weight_buckets(256 << 20):      # all ranks iterate; rank 0 gets the buckets
        send(bucket)                                           # receiver: apply_weight_bucket(model, bucket)
    learner.save_checkpoint(root, keep_last=3)                 # all ranks together
"""
from .advantages import AdvantageResult, PromptStatTracker, RewardError, compute_advantages, group_advantages
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import LearnerConfig
from .engine import Learner, NonFiniteUpdateError
from .loss import mask_grpo_row_loss, policy_step_logprobs
from .reduction import select_steps
from .weights_export import WeightBucket, apply_weight_bucket, iter_weight_buckets

__all__ = ["AdvantageResult", "PromptStatTracker", "RewardError", "compute_advantages", "group_advantages",
           "latest_checkpoint", "load_checkpoint", "save_checkpoint", "LearnerConfig", "Learner",
           "NonFiniteUpdateError", "mask_grpo_row_loss", "policy_step_logprobs", "select_steps", "WeightBucket",
           "apply_weight_bucket", "iter_weight_buckets"]
