"""Data parallelism is exact: two gloo processes with batch ``n`` each take the same update as one process with
batch ``2n`` on the same data, and the metric collectives pool every rank's samples.

"The same data" is arranged explicitly: the single process's batch is split in rank order. Prompts are sliced;
the initial noise comes from one seeded generator, which rank ``r`` first advances by ``r * n`` draws, so its
noise is rows ``r*n .. (r+1)*n - 1`` of the single process's (checked, not assumed). Both runs build the same
policy and optimizer and call the algorithms' own updates (:meth:`RewardGradient.update`,
:meth:`BehaviourCloning.update`), which wrap the module for data parallelism and return metrics already
averaged over ranks; gradient clipping is active, so averaging must happen before it. The two ranks are started
with ``torch.multiprocessing`` under a gloo process group, in one spawn for every check (seconds).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensordict import TensorDict
from torch import nn

from fluxguide import distributed, keys
from fluxguide.algos import RewardGradient, RewardGradientConfig
from fluxguide.algos.bc import BCConfig, BCLoss, BehaviourCloning
from fluxguide.backbones.registry import build_backbone, build_reward
from fluxguide.data.episodes import TARGET
from fluxguide.policies.registry import build_policy
from fluxguide.worlds.shapes import train_prompts

WORLD = 2
PER_RANK = 2  #: samples per rank; the single process takes WORLD * PER_RANK
UPDATES = 2
#: Tiny settings of the script tests (a random shapes world, 3 steps, a small attention policy).
POLICY = {"hidden_dim": 16, "num_layers": 1, "num_heads": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build() -> tuple[RewardGradient, nn.Module]:
    """The reward-gradient setup every process builds from the same seed (RewardGradient wraps the policy)."""
    torch.manual_seed(0)
    backbone = build_backbone("shapes-random", seed=0, num_steps=3)
    reward = build_reward("shapes-clip", backbone, seed=0)
    policy = build_policy("attention", backbone, **POLICY)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    # grad_last_k < steps and gradient checkpointing: the policy runs with and without a graph, and again in
    # the backward pass; max_grad_norm is small enough to clip every update.
    config = RewardGradientConfig(num_steps=3, grad_last_k=2, gradient_checkpointing=True, max_grad_norm=0.05)
    return RewardGradient(backbone, policy, reward, optimizer, config), policy


def reward_gradient_run(r: int, world: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[dict]]:
    """``UPDATES`` updates on rank ``r``'s share of each batch: final parameters, noise used, metrics."""
    algo, policy = build()
    prompts = train_prompts()
    n = WORLD * PER_RANK // world
    noises, metrics = [], []
    for u in range(UPDATES):
        batch = prompts[u * WORLD * PER_RANK:(u + 1) * WORLD * PER_RANK][r * n:(r + 1) * n]
        gen = torch.Generator().manual_seed(100 + u)
        algo.backbone.noise(r * n, gen)  # skip the rows of the ranks before this one
        noises.append(algo.backbone.noise(n, torch.Generator().set_state(gen.get_state())))
        metrics.append(algo.update(batch, gen))  # averaged over ranks, the std pooled over every rank's samples
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}, noises, metrics


def bc_batch() -> TensorDict:
    """A fixed batch of ``WORLD * PER_RANK * 4`` observation / target pairs of the shapes world's shapes."""
    g = torch.Generator().manual_seed(7)
    b = WORLD * PER_RANK * 4
    backbone = build_backbone("shapes-random", seed=0)
    cond = backbone.encode(["a red circle"])
    length, d_txt, d_vec = cond.txt.shape[1], cond.txt.shape[2], cond.vec.shape[1]
    seq, c = backbone.latent_seq, backbone.latent_channels
    return TensorDict({
        keys.IMG: torch.randn(b, seq, c, generator=g), keys.PRED: torch.randn(b, seq, c, generator=g),
        keys.TXT: torch.randn(b, length, d_txt, generator=g), keys.VEC: torch.randn(b, d_vec, generator=g),
        keys.T: torch.rand(b, generator=g), keys.STEP: torch.randint(3, (b,), generator=g),
        TARGET: 0.1 * torch.randn(b, seq, c, generator=g),
    }, batch_size=[b])


def bc_run(r: int, world: int) -> dict[str, torch.Tensor]:
    """Two BC updates (Gaussian NLL with its learned std, clipped) on rank ``r``'s share of a fixed batch."""
    torch.manual_seed(0)
    policy = build_policy("attention", build_backbone("shapes-random", seed=0), **POLICY)
    loss = BCLoss(policy, loss_type="gaussian_nll")
    optimizer = torch.optim.AdamW(loss.parameters(), lr=1e-2)
    bc = BehaviourCloning(loss, optimizer, BCConfig(lr=1e-2, lr_schedule="constant", warmup_updates=0,
                                                    total_updates=2, max_grad_norm=0.05))
    batch = bc_batch()
    n = batch.shape[0] // world
    metrics = [bc.update(batch[r * n:(r + 1) * n], step) for step in range(2)]
    return {"params": {k: v.detach().clone() for k, v in loss.state_dict().items()}, "metrics": metrics}


def collectives(r: int) -> dict[str, object]:
    """The metric and gradient helpers on known per-rank values."""
    values = torch.arange(3 + r, dtype=torch.float32) + 10 * r  # uneven lengths: 3 and 4
    gathered = distributed.all_gather(values)
    samples = torch.tensor([[1.0, 2.0, 4.0], [3.0, 7.0, 8.0]])[r]
    pooled = distributed.mean_over_ranks({"x_mean": float(samples.mean()), "x_std": float(samples.std())},
                                         pooled_std={"x_std": "x_mean"}, count=3)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    unused = nn.Parameter(torch.ones(2))  # never in the graph: keeps grad None
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    net(x[r * 4:(r + 1) * 4]).pow(2).mean().backward()
    if r == 1:
        net[1].bias.grad = None  # "unused" on one rank: counts as zero there, as in DDP
    distributed.average_gradients([*net.parameters(), unused])
    return {"gathered": gathered, "pooled": pooled, "grads": [p.grad.clone() for p in net.parameters()],
            "unused_grad": unused.grad, "any": distributed.any_rank(r == 1), "world": distributed.world_size()}


def worker(r: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=r, world_size=WORLD)
    try:
        result = {"rg": reward_gradient_run(r, WORLD), "bc": bc_run(r, WORLD), "collectives": collectives(r)}
        torch.save(result, Path(out) / f"rank{r}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=0, atol=atol, msg=k)


def test_two_ranks_equal_one_process_with_twice_the_batch_reward_gradient(ranks) -> None:
    single_params, single_noise, single_metrics = reward_gradient_run(0, 1)
    for u in range(UPDATES):  # the arrangement: the ranks' noise is the single process's, split in rank order
        assert torch.equal(torch.cat([ranks[r]["rg"][1][u] for r in range(WORLD)]), single_noise[u])
    assert_same_tensors(ranks[0]["rg"][0], ranks[1]["rg"][0])  # the ranks stay identical, bit for bit
    # ... and equal to the single process up to float rounding (summation order of the averaged gradients).
    # Adam divides by the gradient's RMS, so rounding in a near-zero gradient can move a weight by a visible
    # fraction of one step (lr 1e-2; 3.8e-5 was seen): the tolerance is 1% of a step.
    changed = [k for k in single_params if not torch.equal(single_params[k], build()[1].state_dict()[k])]
    assert len(changed) > 10, "the updates should move the hidden layers, not only the zero-initialised output"
    assert_same_tensors(ranks[0]["rg"][0], single_params, atol=1e-4)
    for u in range(UPDATES):  # the gathered metrics are those of the whole batch
        for k in ("reward_mean", "reward_std", "loss", "grad_norm"):
            assert ranks[0]["rg"][2][u][k] == pytest.approx(single_metrics[u][k], rel=1e-4, abs=1e-6), (u, k)
            assert ranks[1]["rg"][2][u][k] == ranks[0]["rg"][2][u][k]


def test_two_ranks_equal_one_process_with_twice_the_batch_bc(ranks) -> None:
    assert_same_tensors(ranks[0]["bc"]["params"], ranks[1]["bc"]["params"])
    single = bc_run(0, 1)
    assert_same_tensors(ranks[0]["bc"]["params"], single["params"], atol=2e-5)
    for u in range(2):  # the averaged metrics are the same on both ranks, and those of the whole batch
        assert ranks[0]["bc"]["metrics"][u] == ranks[1]["bc"]["metrics"][u]
        assert ranks[0]["bc"]["metrics"][u]["learning_rate"] == 1e-2
        for k in ("loss_bc", "mse", "grad_norm"):
            assert ranks[0]["bc"]["metrics"][u][k] == pytest.approx(single["metrics"][u][k], rel=1e-4), (u, k)


def test_collectives_gather_and_pool_every_rank(ranks) -> None:
    for r, got in enumerate(ranks):
        c = got["collectives"]
        assert c["world"] == WORLD and c["any"] is True
        assert torch.equal(c["gathered"], torch.tensor([0.0, 1, 2, 10, 11, 12, 13]))
        every = torch.tensor([1.0, 2.0, 4.0, 3.0, 7.0, 8.0])
        assert c["pooled"]["x_mean"] == pytest.approx(float(every.mean()))
        assert c["pooled"]["x_std"] == pytest.approx(float(every.std()))  # exact pooled std, not a mean of stds
        assert c["unused_grad"] is None
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    full = [torch.autograd.grad(net(x[r * 4:(r + 1) * 4]).pow(2).mean(), list(net.parameters())) for r in range(2)]
    expected = [(a + b) / 2 for a, b in zip(*full, strict=True)]
    expected[3] = full[0][3] / 2  # rank 1 dropped its bias gradient: a zero there
    for got in ranks:
        for g, e in zip(got["collectives"]["grads"], expected, strict=True):
            torch.testing.assert_close(g, e)


def test_without_a_process_group_everything_is_single_process(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed("cpu") == "cpu"
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.rank_seed(5) == 5 and distributed.rank_seed(5, step=40) == 5
    module = nn.Linear(2, 2)
    assert distributed.data_parallel(module) is module
    assert distributed.mean_over_ranks({"a": 1}) == {"a": 1.0}
    assert distributed.any_rank(False) is False


def test_clear_errors(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        distributed.init_distributed("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="NCCL backend, but CUDA is not available"):
            distributed.init_distributed("cuda")
    with pytest.raises(RuntimeError, match="supports --device cpu"):
        distributed.init_distributed("meta")
    with pytest.raises(ValueError, match="pooled_std needs count"):
        distributed.mean_over_ranks({"m": 0.0, "s": 1.0}, pooled_std={"s": "m"})
