"""Small random Show-o models and sampled groups for the learner's tests, benchmarks and smoke runs."""
from __future__ import annotations

from typing import Optional

import torch

from policy.sampler import SamplerConfig, UnmaskingSampler
from policy.showo import PhiArch, Showo, ShowoConfig
from policy.trajectory import Trajectory


def tiny_showo_config(hidden: int = 64, layers: int = 2, heads: int = 4, num_vq_tokens: int = 16,
                      codebook_size: int = 64, max_seq_length: int = 16) -> ShowoConfig:
    """The fixtures' tiny layout (text vocab 100, ten specials, bos = eos = 99) at a chosen size."""
    return ShowoConfig(vocab_size=100 + 10 + codebook_size + 1, llm_vocab_size=100, codebook_size=codebook_size,
                       num_vq_tokens=num_vq_tokens, num_new_special_tokens=10, max_seq_length=max_seq_length,
                       bos_id=99, eos_id=99,
                       phi=PhiArch(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, max_position_embeddings=512))


def random_showo(seed: int = 0, config: Optional[ShowoConfig] = None, std: float = 0.2) -> Showo:
    """A Show-o with seeded random weights (normal(0, std) matrices, so that its predictions are not flat)."""
    gen = torch.Generator().manual_seed(seed)
    model = Showo(config or tiny_showo_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def sample_groups(model: Showo, num_groups: int, group_size: int, steps: int, seed: int = 0) -> tuple[
        list[Trajectory], list[str]]:
    """`num_groups` groups of `group_size` rollouts (one prompt each) with the batched sampler, and the
    prompts' names. Prompt g's text is a few token ids derived from g."""
    sampler = UnmaskingSampler(model, SamplerConfig(steps=steps))
    trajs, prompts = [], []
    for g in range(num_groups):
        text = [(7 * g + j) % 90 + 1 for j in range(3 + g % 4)]
        area = model.layout.text_area([text])
        tr = sampler.sample(area, [seed * 100_003 + g * 1_000 + i for i in range(group_size)], group_size)
        tr.meta["group_id"] = g
        trajs.append(tr)
        prompts.append(f"prompt {g}")
    return trajs, prompts


FIXED_BATCH_SEED = 5


def fixed_batch() -> tuple[dict[str, torch.Tensor], list[Trajectory], list[torch.Tensor], list[str]]:
    """The learner tests' fixed batch: 2 groups x 3 rollouts x 4 steps from a tiny random Show-o (seed 5), fixed
    rewards; returns (the model's state dict, trajectories, rewards, prompts)."""
    model = random_showo(seed=FIXED_BATCH_SEED)
    trajs, prompts = sample_groups(model, num_groups=2, group_size=3, steps=4, seed=2)
    rewards = [torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.2, 0.9, 0.4])]
    return model.state_dict(), trajs, rewards, prompts


def model_with(state: dict[str, torch.Tensor]) -> Showo:
    """A fresh tiny random Show-o (the fixed batch's architecture) holding `state`."""
    model = random_showo(seed=FIXED_BATCH_SEED)
    model.load_state_dict(state)
    return model
