"""The Mask-GRPO learner: the clipped objective, a DeepSpeed engine, weight export to rollout workers and
crash-safe checkpoints. The driver decides the rows that train and their advantages (`algorithm.plan`); a learner
rank only computes (what a row computes: `algorithm.transitions` and `algorithm.losses`).

On every learner rank (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set by the launcher; none needed for
one process)::

    learner = Learner(build_model(policy_cfg), LearnerConfig(zero_stage=2), AlgorithmConfig(), device="cuda")
    if (ck := latest_checkpoint(root)) is not None:
        learner.resume(ck)
    stats = learner.train_step(groups)                         # this rank's GroupUpdates; all ranks together
    for bucket in learner.iter_weight_buckets(256 << 20):      # all ranks iterate; rank 0 gets the buckets
        send(bucket)                                           # receiver: apply_weight_bucket(model, bucket)
    learner.save_checkpoint(root, keep_last=3)                 # all ranks together
"""
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import LearnerConfig
from .engine import Learner, NonFiniteUpdateError
from .update import GroupUpdate, UpdateStats
from .weights_export import WeightBucket, apply_weight_bucket, iter_weight_buckets

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint", "LearnerConfig", "Learner",
           "NonFiniteUpdateError", "GroupUpdate", "UpdateStats",
           "WeightBucket", "apply_weight_bucket", "iter_weight_buckets"]
