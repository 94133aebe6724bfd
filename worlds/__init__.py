"""Environments: the worlds a policy is trained in. A world supplies the prompts (train/held-out splits), the scenes
pretraining learns from, the image decoder of the policy's codes and the exact detector its rewards read.
`worlds.shapes` is the GenEval-shaped synthetic world of the default run."""
