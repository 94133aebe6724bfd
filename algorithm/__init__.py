"""The algorithm: what Mask-GRPO decides, apart from the machinery that runs it.

- `transitions`: the transition probability of one unmasking step (candidate 1, candidate 2, AR-style), each
  definition written once and used for the sampler's record, the learner's score and the term count;
- `advantages/`: advantage estimators (`group`, `running`, `tree`: per-depth credit in group trees);
- `selectors/`: which (sample, step) rows train (`all`, `first_k`, `random_k`, `every_n`, `after_branch`,
  `entropy`, `certainty_change`);
- `losses/`: policy losses (`clipped`: Mask-GRPO's per-step clipped surrogate with a k3 KL; `reinforce`);
- `tree`: group trees (one prefix per prompt, branches at given steps);
- `plan`: a training step's groups -> the learner's `GroupUpdate`s (advantages and train masks per row);
- `config`: the `algorithm` config section.

A variant is one module that registers a class (`algorithm.registry`), named by one config value. The learner
(`learner/`) keeps the mechanics: micro-batches, padding, NaN poisoning, the optimizer step.
"""
