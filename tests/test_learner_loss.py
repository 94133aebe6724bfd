"""The Mask-GRPO objective (`algorithm.losses.clipped`): ratios against RECORDED behaviour log-probs, per-row
clipping, k3 KL, averaging, and trained steps."""
from __future__ import annotations

import math

import pytest
import torch

from algorithm.config import AlgorithmConfig
from algorithm.losses import k3_kl
from algorithm.losses.clipped import Clipped
from algorithm.transitions import policy_step_logprobs, transition
from learner import Learner
from policy.logprob import RowView, Rows
from benchmarks.tiny_models import random_showo, sample_groups
from tests.updates import configs, given


def mask_grpo_row_loss(logp, behaviour, adv, clip_low=0.9, clip_high=1.2, kl_beta=0.0, ref_logp=None):
    return Clipped(AlgorithmConfig(clip_low=clip_low, clip_high=clip_high, kl_beta=kl_beta))(logp, behaviour, adv,
                                                                                               ref_logp)


pytestmark = pytest.mark.usefixtures("single_torch_thread")

# ----- hand-computed rows -------------------------------------------------------------------------------------
# (ratio, advantage, loss, d loss / d logp, clipped)  with clip range [0.9, 1.2]
CASES = [
    (1.5, 1.0, -1.2, 0.0, True),     # above the range, A > 0: clipped value, no gradient
    (1.5, -1.0, 1.5, 1.5, False),    # above the range, A < 0: unclipped (pessimistic) branch, d/dlogp = −A·r
    (0.5, 1.0, -0.5, -0.5, False),   # below the range, A > 0: unclipped
    (0.5, -1.0, 0.9, 0.0, True),     # below the range, A < 0: clipped, no gradient
    (1.1, 2.0, -2.2, -2.2, False),   # inside the range
    (1.0, 0.75, -0.75, -0.75, False),  # on-policy
    (1.3, 0.0, 0.0, 0.0, False),     # zero advantage: nothing
]


@pytest.mark.parametrize("ratio,adv,loss,grad,clipped", CASES)
def test_clipped_surrogate_hand_computed(ratio, adv, loss, grad, clipped):
    behaviour = torch.tensor([-3.0], dtype=torch.float64)
    logp = (behaviour + math.log(ratio)).clone().requires_grad_(True)
    out = mask_grpo_row_loss(logp, behaviour, torch.tensor([adv], dtype=torch.float64), 0.9, 1.2)
    out.loss.sum().backward()
    assert out.ratio.item() == pytest.approx(ratio, rel=1e-12)
    assert out.loss.item() == pytest.approx(loss, abs=1e-12)
    assert logp.grad.item() == pytest.approx(grad, abs=1e-12)
    assert bool(out.clipped.item()) is clipped
    assert out.kl is None


def test_min_is_per_row_not_after_averaging():
    """Two rows, one clipped and one not: the loss is the sum of per-row minima (the release took the min of
    the batch averages, which here would give a different value and gradient)."""
    behaviour = torch.zeros(2, dtype=torch.float64)
    logp = torch.tensor([math.log(1.5), math.log(0.5)], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    out = mask_grpo_row_loss(logp, behaviour, adv, 0.9, 1.2)
    out.loss.sum().backward()
    assert out.loss.tolist() == pytest.approx([-1.2, -0.5])
    assert logp.grad.tolist() == pytest.approx([0.0, -0.5])
    after_avg = -min((1.5 + 0.5) / 2, (1.2 + 0.9) / 2) * 2
    assert out.loss.sum().item() != pytest.approx(after_avg)


def test_absurd_staleness_gives_zero_gradient_not_nan():
    logp = torch.tensor([0.0], requires_grad=True)
    out = mask_grpo_row_loss(logp, torch.tensor([-500.0]), torch.tensor([1.0]), 0.9, 1.2)
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and logp.grad.item() == 0.0 and out.clipped.item()


def test_k3_hand_computed():
    cur = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -2.0, -1.0], dtype=torch.float64)
    expected = [math.exp(d) - d - 1 for d in (-0.5, 0.0, 2.0)]
    assert k3_kl(cur, ref).tolist() == pytest.approx(expected, rel=1e-12)
    out = mask_grpo_row_loss(cur, cur, torch.zeros(3, dtype=torch.float64), kl_beta=0.1, ref_logp=ref)
    assert out.kl.tolist() == pytest.approx(expected)
    assert out.loss.tolist() == pytest.approx([0.1 * e for e in expected])
    with pytest.raises(ValueError, match="reference"):
        mask_grpo_row_loss(cur, cur, torch.zeros(3), kl_beta=0.1)


# ----- through the learner ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch():
    model = random_showo(seed=3)
    trajs, prompts = sample_groups(model, num_groups=1, group_size=2, steps=4, seed=1)
    return model.state_dict(), trajs, prompts


def _model(batch):
    from benchmarks.tiny_models import random_showo as make
    m = make(seed=3)
    m.load_state_dict(batch[0])
    return m


def _grads(batch, config, advantages, behaviour_shift: float = 0.0, behaviour=None, steps=None):
    model = _model(batch)
    trajs = batch[1]
    if behaviour is None:
        behaviour = policy_step_logprobs(model, trajs[0], config[1].transition) - behaviour_shift
    learner = Learner(model, *config)
    state = learner.accumulate_gradients([given(trajs[0], advantages, behaviour, steps=steps)])
    grads = learner.full_gradients()
    metrics = learner.apply_update(state).metrics()
    return grads, metrics, learner


def _flat(grads):
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


def _assert_close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to `rel` of the largest expected entry (float32 sums over rows in another order)."""
    err = (got - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item(), f"max error {err:.3e} vs scale {expected.abs().max().item():.3e}"


def test_stale_behaviour_ratio_is_recorded_not_detached_current(batch):
    """Behaviour log-probs recorded log 2 lower than the current policy: ratio 2 everywhere (defect 3 would
    give 1). With A > 0 every row is clipped (zero gradient); with A < 0 the gradient is twice the on-policy
    one."""
    cfg = configs(transition="candidate2", micro_batch_rows=3, warmup_steps=1)
    adv_pos, adv_neg = torch.tensor([1.0, 0.5]), torch.tensor([-1.0, -0.5])
    g_pos, m_pos, _ = _grads(batch, cfg, adv_pos, behaviour_shift=math.log(2.0))
    assert m_pos["ratio_mean"] == pytest.approx(2.0, rel=1e-5)
    assert m_pos["clip_frac"] == 1.0
    assert _flat(g_pos).abs().max().item() == 0.0
    assert m_pos["loss"] == pytest.approx(-1.2 * (1.0 + 0.5) * 4 / (4 * 2), rel=1e-6)  # −A·1.2 per row, /(T·M)

    g_on, m_on, _ = _grads(batch, cfg, adv_neg)
    g_neg, m_neg, _ = _grads(batch, cfg, adv_neg, behaviour_shift=math.log(2.0))
    assert m_on["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m_neg["clip_frac"] == 0.0
    _assert_close(_flat(g_neg), 2.0 * _flat(g_on))


def test_ratio_below_range_with_positive_advantage_is_not_clipped(batch):
    cfg = configs(transition="candidate1", micro_batch_rows=8, warmup_steps=1)
    adv = torch.tensor([1.0, 1.0])
    g_on, _, _ = _grads(batch, cfg, adv)
    g_low, m_low, _ = _grads(batch, cfg, adv, behaviour_shift=-math.log(2.0))   # ratio 0.5
    assert m_low["ratio_mean"] == pytest.approx(0.5, rel=1e-5) and m_low["clip_frac"] == 0.0
    _assert_close(_flat(g_low), 0.5 * _flat(g_on))
    _, m_neg, _ = _grads(batch, cfg, -adv, behaviour_shift=-math.log(2.0))
    assert m_neg["clip_frac"] == 1.0


def test_kl_beta_zero_builds_no_reference_model(batch):
    _, metrics, learner = _grads(batch, configs(kl_beta=0.0, warmup_steps=1), torch.tensor([1.0, -1.0]))
    assert learner.reference is None
    assert "kl" not in metrics
    with pytest.raises(ValueError, match="kl_beta"):
        Learner(_model(batch), *configs(kl_beta=0.0), reference=_model(batch))


def test_kl_against_frozen_reference_hand_checked(batch):
    cfg = configs(transition="candidate2", kl_beta=0.5, lr=5e-3, warmup_steps=1, micro_batch_rows=8)
    model = _model(batch)
    trajs = batch[1]
    learner = Learner(model, *cfg)
    ref = learner.reference
    assert ref is not None and ref is not learner.policy
    assert all(not p.requires_grad for p in ref.parameters())
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    adv = torch.tensor([1.0, -1.0])
    m1 = learner.train_step([given(trajs[0], adv)]).metrics()
    assert m1["kl"] == pytest.approx(0.0, abs=1e-10)        # policy == reference before the first update
    # after one update: the metric equals the hand-computed mean k3 of the current policy vs the reference
    cur = policy_step_logprobs(learner.policy, trajs[0], "candidate2")
    ref_lp = policy_step_logprobs(ref, trajs[0], "candidate2")
    d = (ref_lp - cur).double()
    expected = (d.exp() - d - 1).mean().item()
    m2 = learner.train_step([given(trajs[0], adv)]).metrics()
    assert expected > 1e-8
    assert m2["kl"] == pytest.approx(expected, rel=1e-4)
    for k, v in ref.state_dict().items():          # the reference stays frozen
        assert torch.equal(v, before[k]), k


def test_token_average_rescales_sequence_average(batch):
    trajs = batch[1]
    adv = torch.tensor([1.0, -0.5])
    g_seq, m_seq, _ = _grads(batch, configs(transition="candidate2", loss_average="sequence"), adv)
    g_tok, m_tok, _ = _grads(batch, configs(transition="candidate2", loss_average="token"), adv)
    t, m = trajs[0].num_steps, trajs[0].batch_size
    terms = transition("candidate2").num_terms(RowView.of(trajs[0], Rows.grid(torch.arange(m), torch.arange(t)))
                                               ).sum().item()
    assert terms == m * trajs[0].num_image_tokens          # candidate 2 scores every token exactly once
    _assert_close(_flat(g_tok), _flat(g_seq) * (t * m / terms))
    assert m_tok["loss"] == pytest.approx(m_seq["loss"] * t * m / terms, rel=1e-5)


# ----- trained steps ---------------------------------------------------------------------------------------------
def test_learner_trains_only_the_given_rows(batch):
    cfg = configs(transition="candidate1", micro_batch_rows=3)
    _, metrics, _ = _grads(batch, cfg, torch.tensor([1.0, -1.0]), steps=torch.arange(2))
    assert metrics["rows"] == 2 * 2                # 2 rollouts × first 2 of 4 steps
    assert metrics["micro_batches"] == 2           # 3 rows per micro-batch: one rollout (2 steps) each


def test_any_rows_train_with_per_row_advantages(batch):
    """A train mask that is no rectangle (sample 0 at steps 0-2, sample 1 at step 3) with per-(sample, step)
    advantages: exactly those rows train, whatever the micro-batching, and advantages outside them change nothing."""
    from learner import GroupUpdate
    traj = batch[1][0]
    train = torch.tensor([[True, True, True, False], [False, False, False, True]])
    adv = torch.tensor([[1.0, -0.5, 0.25, 9.0], [7.0, 7.0, 7.0, -1.0]])
    other = torch.where(train, adv, torch.full_like(adv, -3.0))

    def run(advantages, rows_per_pass):
        learner = Learner(_model(batch), *configs(transition="candidate1", micro_batch_rows=rows_per_pass))
        stats = learner.accumulate_gradients([GroupUpdate(traj, advantages, train)])
        return learner.full_gradients(), stats
    grads, stats = run(adv, 2)
    # runs of at most 2 rows, packed: (0: steps 0, 1), (0: step 2 + 1: step 3)
    assert stats.rows == 4 and stats.micro_batches == 2 and stats.learner_tokens == 4 * traj.num_image_tokens
    for advantages, rows in ((adv, 64), (other, 2)):
        again, _ = run(advantages, rows)
        _assert_close(_flat(again), _flat(grads))
