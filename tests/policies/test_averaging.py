"""The weight average (fluxguide/policies/averaging.py): the exponential moving average it promises, the buffers it
copies, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fluxguide.policies.averaging import PolicyAverage


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_the_average_is_the_exponential_moving_average_of_the_iterates() -> None:
    policy = net()
    start = [p.detach().clone() for p in policy.parameters()]
    average = PolicyAverage(policy, 0.9)
    iterates = []
    for _ in range(3):
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p))
        iterates.append([p.detach().clone() for p in policy.parameters()])
        average.update(policy)
    for i, p in enumerate(average.average.parameters()):
        w0, w1, w2, w3 = start[i], iterates[0][i], iterates[1][i], iterates[2][i]
        expected = 0.9 ** 3 * w0 + 0.9 ** 2 * 0.1 * w1 + 0.9 * 0.1 * w2 + 0.1 * w3
        torch.testing.assert_close(p, expected)
        assert not p.requires_grad
    assert int(average.updates) == 3
    # the policy's own weights are untouched, and its buffers are copied, not averaged
    torch.testing.assert_close(policy[0].weight, iterates[2][0])
    policy.train()(torch.randn(8, 3))  # BatchNorm updates its running statistics
    average.update(policy)
    torch.testing.assert_close(average.average[1].running_mean, policy[1].running_mean)


def test_the_average_is_a_checkpointable_module() -> None:
    policy = net()
    average = PolicyAverage(policy, 0.5)
    average.update(policy)
    state = average.state_dict()
    assert "updates" in state and "average.0.weight" in state
    restored = PolicyAverage(net(), 0.5)
    restored.load_state_dict(state)
    assert int(restored.updates) == 1


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, float("nan")])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\), e\.g\. 0\.98"):
        PolicyAverage(net(), decay)


def test_another_policy_is_refused() -> None:
    average = PolicyAverage(net(), 0.9)
    with pytest.raises(ValueError, match="the same \\(unwrapped\\) policy"):
        average.update(nn.Linear(3, 4))
