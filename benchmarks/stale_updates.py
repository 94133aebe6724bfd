"""Why stale updates stalled: Mask-GRPO on the default world in one process (no Ray), with a batch launched
`--staleness` steps before it is trained, so the learning dynamics are isolated from the distributed machinery.

    python -m benchmarks.stale_updates --staleness 1 learner.stale_logprobs=recorded      # the old behaviour
    python -m benchmarks.stale_updates --staleness 1                                      # the fix (recompute)
    python -m benchmarks.stale_updates --staleness 1 learner.stale_logprobs=recorded learner.clip_low=1e-6 \\
        learner.clip_high=1e6                                                             # no clip
    python -m benchmarks.stale_updates --staleness 1 --recentre learner.stale_logprobs=recorded

It runs the same components as the driver in sequence (sampler, reward worker, the driver's `plan_update`,
learner, weight copy) and prints one JSON line: the training reward of the first and last 10 steps, the share of
clipped rows, the largest ratio and the minutes taken. `--recentre` re-centres each group's advantages at every
step so that Σ_i A_i·r_i = 0 (r: ratio to the recorded behaviour log-probs): it removes the importance weights'
net common component while keeping the clip. Extra arguments are config overrides of configs/default.yaml.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None) -> int:
    from cluster.advantages import PromptStatTracker, plan_update
    from cluster.config import load_config, section
    from cluster.data import PromptSchedule, train_prompts
    from cluster.launch import reward_decoder_spec, reward_specs
    from cluster.pretrain import ensure_base_policy
    from learner.engine import Learner
    from learner.loss import policy_step_logprobs
    from learner.weights_export import apply_weight_bucket
    from policy.factory import load_policy
    from policy.sampler import UnmaskingSampler
    from rewards.worker import RewardWorker

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--staleness", type=int, default=0, help="steps between sampling a batch and training on it")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recentre", action="store_true", help="make Σ_i A_i·r_i = 0 per group and step")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"seed={args.seed}", f"max_steps={args.steps}", f"learner.total_steps={args.steps}",
                                    *args.overrides])
    ensure_base_policy(cfg)
    pcfg, lcfg, scfg = section(cfg, "policy"), section(cfg, "learner"), section(cfg, "sampler")
    policy = load_policy(pcfg, "cpu", with_decoder=False)
    sampler_model = policy.model.eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    learner = Learner(load_policy(pcfg, "cpu", with_decoder=False).model, lcfg, device="cpu")
    reward = RewardWorker(reward_specs(cfg, cfg.rewards), decoder=reward_decoder_spec(cfg), device="cpu")
    prompts = train_prompts(cfg)
    group_size, per_step = cfg.data.group_size, cfg.data.prompts_per_step
    schedule = PromptSchedule(len(prompts), per_step, cfg.seed)
    tracker = PromptStatTracker(lcfg.running_buffer, lcfg.running_min_count, lcfg.adv_eps, lcfg.adv_std_unbiased)

    def rollout(step: int):
        items = [prompts[i] for i in schedule.indices(step)]
        seeds = [x for slot in range(per_step) for x in schedule.seeds(step, slot, group_size)]
        traj = UnmaskingSampler(sampler_model, scfg).sample(policy.text_areas([it.prompt for it in items]), seeds,
                                                             group_size)
        groups = [traj.select(slice(i * group_size, (i + 1) * group_size)) for i in range(per_step)]
        for i, g in enumerate(groups):
            g.policy_version, g.meta = learner.version, {"group_id": step * per_step + i}
        return items, groups

    queue, out, t0 = {}, [], time.time()
    for step in range(args.steps):
        for k in range(step, min(step + args.staleness, args.steps - 1) + 1):
            if k not in queue:
                queue[k] = rollout(k)
        items, groups = queue.pop(step)
        scores = reward.score_groups([{"codes": g.final_codes, "prompts": [it.prompt] * group_size,
                                       "metadata": [it.metadata] * group_size} for g, it in zip(groups, items)])
        rewards = [sc["rewards"] for sc in scores]
        plan = plan_update(groups, rewards, [it.prompt for it in items], lcfg, scfg.steps, tracker,
                           [g.meta["group_id"] for g in groups], step)
        if args.recentre:
            for g in plan.groups:
                recorded = g.trajectory.behaviour_step_logprob(lcfg.transition)
                r = (policy_step_logprobs(learner.policy, g.trajectory, lcfg.transition) - recorded).exp()
                a = g.advantages[:, None].double().expand_as(r)
                g.advantages = (a - (a * r).sum(0, keepdim=True) / r.sum(0, keepdim=True)).float()
                g.behaviour_logprob = recorded
        stats = learner.train_step(plan.groups).metrics()
        for bucket in learner.iter_weight_buckets(int(cfg.cluster.weight_bucket_mb) << 20):
            apply_weight_bucket(sampler_model, bucket)
        out.append({"reward": float(torch.cat(rewards).mean()), "clip": stats["clip_frac"],
                    "ratio_max": stats["ratio_max"]})
    r = [o["reward"] for o in out]
    print(json.dumps({"staleness": args.staleness, "overrides": args.overrides, "recentre": args.recentre,
                      "seed": args.seed, "steps": args.steps, "reward_first10": round(statistics.fmean(r[:10]), 3),
                      "reward_last10": round(statistics.fmean(r[-10:]), 3),
                      "clip_frac": round(statistics.fmean(o["clip"] for o in out), 4),
                      "ratio_max": round(max(o["ratio_max"] for o in out), 2),
                      "minutes": round((time.time() - t0) / 60, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
