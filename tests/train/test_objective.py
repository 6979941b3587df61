"""The random parts of a training example and the data order: fixed by (seed, step, k), independent of how the
global batch is split, and distributed as the recipes say."""

from __future__ import annotations

from pathlib import Path

import torch

from wurst.train.data import Sample
from wurst.train.objective import RECIPES, draw, sample_losses
from wurst.train.order import DataOrder

SHAPE = (16, 4, 4)


def test_a_draw_depends_on_seed_step_and_k_alone():
    recipe = RECIPES["original"]
    a = draw(seed=5, step=3, k=1, latent_shape=SHAPE, recipe=recipe)
    torch.rand(100)  # the global generator is not involved
    b = draw(seed=5, step=3, k=1, latent_shape=SHAPE, recipe=recipe)
    assert (a.t, a.drop_caption) == (b.t, b.drop_caption) and torch.equal(a.noise, b.noise)
    for other in (dict(seed=6, step=3, k=1), dict(seed=5, step=4, k=1), dict(seed=5, step=3, k=2)):
        assert not torch.equal(draw(**other, latent_shape=SHAPE, recipe=recipe).noise, a.noise)


def test_the_recipes_draw_t_and_drop_captions_as_described():
    n = 4000
    original = [draw(seed=0, step=s, k=0, latent_shape=(1,), recipe=RECIPES["original"]) for s in range(n)]
    uniform = [draw(seed=0, step=s, k=0, latent_shape=(1,), recipe=RECIPES["diffusers"]) for s in range(n)]
    t_original = torch.tensor([d.t for d in original])
    # (1 - u) · 1.08 + 0.001 clamped to [0.001, 1]: t = 1 wherever 1 - u >= 0.999 / 1.08, that is u <= 0.075
    assert 0.001 <= t_original.min() < 0.01 and t_original.max() == 1.0
    assert abs(float((t_original == 1.0).float().mean()) - 0.075) < 0.015
    dropped = sum(d.drop_caption for d in original) / n
    assert abs(dropped - 0.05) < 0.012  # 5% of captions, ± about 3 standard deviations (0.0034 each)
    t_uniform = torch.tensor([d.t for d in uniform])
    assert 0 <= t_uniform.min() < 0.01 and 0.99 < t_uniform.max() < 1 and abs(float(t_uniform.mean()) - 0.5) < 0.02
    assert not any(d.drop_caption for d in uniform)


def test_p2_weight_is_one_over_one_plus_snr():
    predicted, noise = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE)
    t = torch.tensor([0.1, 0.5, 0.9])
    plain = sample_losses(predicted, noise, t, recipe=RECIPES["diffusers"])
    weighted = sample_losses(predicted, noise, t, recipe=RECIPES["original"])
    s = 0.008
    f = torch.cos((t + s) / (1 + s) * torch.pi / 2) ** 2 / torch.cos(torch.tensor(s / (1 + s) * torch.pi / 2)) ** 2
    snr = f / (1 - f)
    torch.testing.assert_close(plain, ((predicted - noise) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(weighted, plain / (1 + snr))


def samples(buckets: list[tuple[int, int]]) -> list[Sample]:
    return [Sample(index=i, image=Path(f"{i}.png"), caption="", height=h, width=w) for i, (h, w) in enumerate(buckets)]


def test_each_batch_is_one_bucket_and_an_epoch_covers_every_sample():
    data = samples([(128, 128)] * 5 + [(128, 256)] * 3)
    order = DataOrder(data, batch_size=2, seed=1)
    assert order.steps_per_epoch == 3 + 2  # ceil(5 / 2) + ceil(3 / 2)
    epoch = [order.batch(step) for step in range(order.steps_per_epoch)]
    for batch in epoch:
        assert len(batch) == 2 and len({(data[i].height, data[i].width) for i in batch}) == 1
    assert set().union(*map(set, epoch)) == set(range(8))
    assert [order.batch(step) for step in range(5, 10)] != epoch  # the next epoch is shuffled anew
    assert DataOrder(data, batch_size=2, seed=1).batch(7) == order.batch(7)  # a resumed run sees the same batches
