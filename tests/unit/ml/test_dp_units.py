"""Privacy units of several rows (silotune.ml.dp_sgd `units`): Poisson sampling over
units, and one unit's contribution to a step bounded by the clip norm C."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from silotune.ml.dp_sgd import DPConfig, run_dp_sgd, unit_rows

CLIP = 1.0


def test_unit_rows_lists_each_units_rows_in_order_of_first_appearance():
    rows = unit_rows(["p2", "p1", "p2", "p3", "p2"])
    assert rows.tolist() == [[0, 2, 4], [1, -1, -1], [3, -1, -1]]


def _step(x: torch.Tensor, units: torch.Tensor | None, physical: int = 64) -> torch.Tensor:
    """One DP-SGD step without noise, every unit sampled (q = 1), plain SGD with lr 1:
    returns the step's clipped gradient sum (the update times the expected batch)."""
    model = nn.Linear(x.shape[1], 1, bias=False)
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    data = TensorDataset(x, torch.ones(len(x)))
    drawn = len(x) if units is None else len(units)
    loader = DataLoader(data, batch_size=drawn)

    def loss_fn(batch):
        return ((model(batch[0]).squeeze(1) - batch[1]) ** 2).mean()

    run_dp_sgd(model, opt, loader, 1, loss_fn, DPConfig(0.0, CLIP, noise_seed=0),
               physical, units=units)
    return -model.weight.detach()[0] * drawn  # w = -lr * (gradient sum) / expected batch


@pytest.mark.parametrize("physical", [64, 3])  # whole batch, or micro-batches of units
def test_one_unit_moves_a_step_by_at_most_the_clip_however_many_rows_it_has(physical):
    gen = torch.Generator().manual_seed(0)
    sizes = [20, *torch.randint(1, 21, (11,), generator=gen).tolist()]  # 1-20 rows each
    patient = [p for p, n in enumerate(sizes) for _ in range(n)]
    x = torch.randn(len(patient), 4, generator=gen)
    x[:20] = 50.0  # patient 0: 20 rows with large gradients
    units = unit_rows(patient)
    without = x.clone()
    without[:20] = 0.0  # the same patient contributing nothing (zero gradient)
    shift = _step(x, units, physical) - _step(without, units, physical)
    assert float(shift.norm()) == pytest.approx(CLIP, rel=1e-4)  # bounded by C, reached
    # per row, the same patient moves the step by the sum of 20 clipped rows
    row_shift = _step(x, None) - _step(without, None)
    assert float(row_shift.norm()) == pytest.approx(20 * CLIP, rel=1e-4)


def test_a_units_gradient_is_the_mean_of_its_rows_before_clipping():
    x = torch.tensor([[0.1, 0.0], [0.3, 0.0], [0.0, 0.2]])  # small: nothing is clipped
    units = unit_rows([0, 0, 1])
    got = _step(x, units)
    row_grads = [2 * (0.0 - 1.0) * r for r in x]  # d/dw (w.x - 1)^2 at w = 0
    expected = (row_grads[0] + row_grads[1]) / 2 + row_grads[2]
    torch.testing.assert_close(got, expected)
