"""The release's training arithmetic: structure loss, AdaXW with clamping, poly schedule, data order, RNG."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from pipelines.training.config import scaled_size
from pipelines.training.reproducibility import EpochSampler, rng_state, set_rng_state
from utils.distributed import DistContext, smallest_replica_batch
from utils.losses import RELEASE_WEIGHTS, deep_supervision_loss, structure_loss
from utils.optim import AdaXW, clip_gradient, poly_lr, set_lr


@pytest.fixture(scope="module")
def recipe(reference_dir):
    """The release's numbers from recipe_reference.npz."""
    return dict(np.load(reference_dir / "recipe_reference.npz"))


def test_structure_loss_matches_release(recipe):
    pred, mask = torch.from_numpy(recipe["loss_pred"]), torch.from_numpy(recipe["loss_mask"])
    got = structure_loss(pred, mask).item()
    assert got == pytest.approx(float(recipe["loss_release"]), rel=1e-6, abs=1e-7)


def test_weighted_bce_matches_the_intended_loss(recipe):
    pred, mask = torch.from_numpy(recipe["loss_pred"]), torch.from_numpy(recipe["loss_mask"])
    got = structure_loss(pred, mask, weighted_bce=True).item()
    assert got == pytest.approx(float(recipe["loss_weighted"]), rel=1e-6, abs=1e-7)
    assert abs(got - float(recipe["loss_release"])) > 1e-4  # the option really changes the loss


def test_deep_supervision_weights_p1_to_p4(recipe):
    mask = torch.from_numpy(recipe["loss_mask"])
    base = torch.from_numpy(recipe["loss_pred"])
    preds = [base * s for s in (1.0, 0.5, -0.3, 2.0)] + [torch.zeros_like(base)]  # 5th (frequency) ignored
    total, terms = deep_supervision_loss(preds, mask)
    expected = [structure_loss(p, mask) for p in preds[:4]]
    assert [t.item() for t in terms] == pytest.approx([e.item() for e in expected], rel=1e-6)
    assert total.item() == pytest.approx(sum(w * e.item() for w, e in zip(RELEASE_WEIGHTS, expected)), rel=1e-6)


def _adaxw_run(recipe, steps: int, optimizer: AdaXW | None = None, params=None):
    """Apply the fixture's clamped gradients for `steps` steps; returns (w, b, optimizer)."""
    if params is None:
        params = (torch.nn.Parameter(torch.from_numpy(recipe["adaxw_w0"]).clone()),
                  torch.nn.Parameter(torch.from_numpy(recipe["adaxw_b0"]).clone()))
    w, b = params
    opt = optimizer or AdaXW([w, b], lr=float(recipe["adaxw_lr"]),
                             weight_decay=float(recipe["adaxw_weight_decay"]))
    done = len(opt.state[w]) and opt.state[w]["step"]
    for t in range(done, done + steps):
        w.grad = torch.from_numpy(recipe["adaxw_grads_w"][t]).clone()
        b.grad = torch.from_numpy(recipe["adaxw_grads_b"][t]).clone()
        clip_gradient(opt, float(recipe["grad_clamp"]))
        opt.step()
    return w, b, opt


def test_adaxw_with_clamp_matches_release_trajectory(recipe):
    steps = int(recipe["adaxw_steps"])
    assert np.abs(recipe["adaxw_grads_w"]).max() > float(recipe["grad_clamp"])  # the clamp is exercised
    w, b, _ = _adaxw_run(recipe, steps)
    np.testing.assert_allclose(w.detach().numpy(), recipe["adaxw_w_final"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(b.detach().numpy(), recipe["adaxw_b_final"], rtol=0, atol=1e-7)


def test_adaxw_state_dict_resumes_the_same_trajectory(recipe):
    w, b, opt = _adaxw_run(recipe, 10)
    buffer = io.BytesIO()
    torch.save({"w": w.detach(), "b": b.detach(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    w2, b2 = torch.nn.Parameter(saved["w"].clone()), torch.nn.Parameter(saved["b"].clone())
    opt2 = AdaXW([w2, b2], lr=1.0)
    opt2.load_state_dict(saved["opt"])
    w2, b2, _ = _adaxw_run(recipe, 15, optimizer=opt2, params=(w2, b2))
    np.testing.assert_allclose(w2.detach().numpy(), recipe["adaxw_w_final"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(b2.detach().numpy(), recipe["adaxw_b_final"], rtol=0, atol=1e-7)


def test_adaxw_leaves_params_without_grad_untouched():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.full((2,), 100.0))
    opt = AdaXW([used, unused], lr=0.1, weight_decay=0.5)
    used.grad = torch.tensor([1.0, -2.0, 0.0])
    opt.step()
    assert torch.equal(unused.detach(), torch.full((2,), 100.0))  # no step and no decay, like frequency.radius
    assert unused not in opt.state
    assert not torch.equal(used.detach(), torch.ones(3))


def test_clip_gradient_clamps_each_element():
    p, q, r = (torch.nn.Parameter(torch.zeros(4)) for _ in range(3))
    opt = AdaXW([p, q, r])
    p.grad = torch.tensor([-3.0, -0.2, 0.4, 9.0])
    q.grad = torch.tensor([0.1, 0.1, 0.1, 0.1])
    clip_gradient(opt, 0.5)
    assert torch.equal(p.grad, torch.tensor([-0.5, -0.2, 0.4, 0.5]))
    assert torch.equal(q.grad, torch.tensor([0.1, 0.1, 0.1, 0.1]))  # not a norm clip: small grads untouched
    assert r.grad is None


def test_poly_lr_release_schedule():
    lrs = [poly_lr(2e-4, e, 200) for e in range(1, 201)]
    assert lrs[0] == pytest.approx(2e-4 * (199 / 200) ** 0.9)
    assert lrs[99] == pytest.approx(2e-4 * 0.5 ** 0.9)
    assert lrs[-1] == 0.0
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ValueError):
        poly_lr(2e-4, 201, 200)  # the release's resume ran past E; we refuse
    opt = AdaXW([torch.nn.Parameter(torch.zeros(1))])
    set_lr(opt, 1.5e-4)
    assert opt.param_groups[0]["lr"] == 1.5e-4


def test_multiscale_sizes_follow_the_release():
    assert [scaled_size(736, r) for r in (0.75, 1, 1.25)] == [544, 736, 928]
    assert [scaled_size(64, r) for r in (0.75, 1, 1.25)] == [64, 64, 64]
    assert [scaled_size(352, r) for r in (0.75, 1, 1.25)] == [256, 352, 448]


def _orders(n: int, batch: int, world: int, seed: int, epoch: int, skip: int = 0) -> list[list[int]]:
    """Each rank's index order for one epoch."""
    out = []
    for rank in range(world):
        sampler = EpochSampler(range(n), batch, DistContext(rank, world, rank, torch.device("cpu")), seed)
        sampler.set_epoch(epoch, skip_samples=skip * batch)
        out.append(list(sampler))
    return out


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    assert _orders(10, 2, 1, seed=3, epoch=1) == _orders(10, 2, 1, seed=3, epoch=1)
    assert _orders(10, 2, 1, seed=3, epoch=1) != _orders(10, 2, 1, seed=3, epoch=2)
    assert _orders(10, 2, 1, seed=3, epoch=1) != _orders(10, 2, 1, seed=4, epoch=1)
    assert sorted(_orders(10, 2, 1, seed=3, epoch=1)[0]) == list(range(10))


def test_epoch_sampler_shards_ranks_and_skips_done_batches():
    rank0, rank1 = _orders(8, 2, 2, seed=0, epoch=5)
    assert len(rank0) == len(rank1) == 4 and sorted(rank0 + rank1) == list(range(8))
    assert _orders(8, 2, 2, seed=0, epoch=5, skip=1) == [rank0[2:], rank1[2:]]
    # A last batch of one sample would crash BatchNorm in train mode: it is dropped.
    (odd,) = _orders(5, 2, 1, seed=0, epoch=1)
    assert len(odd) == 4


def test_rng_state_roundtrips_through_weights_only_load():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_no_batch_gives_a_data_parallel_gpu_a_single_image():
    # torch.chunk splits 7 over 3 GPUs as 3, 3, 1 and 3 over 2 as 2, 1.
    cases = [(8, 1), (8, 2), (7, 3), (5, 2), (3, 2), (16, 8)]
    assert [smallest_replica_batch(b, n) for b, n in cases] == [8, 4, 1, 2, 1, 2]
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    for n, kept in [(13, 12), (14, 12), (15, 12), (16, 16)]:  # 1, 2, 3 left over give a GPU 1 image; 4 give 2 + 2
        sampler = EpochSampler(range(n), 6, ctx, seed=0, replicas=3)
        sampler.set_epoch(1)
        assert len(list(sampler)) == kept, n
        assert sampler.batches_per_epoch() == -(-kept // 6)
    single = EpochSampler(range(13), 6, ctx, seed=0)
    single.set_epoch(1)
    assert len(list(single)) == 12
