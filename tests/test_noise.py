"""The gradient noise scale (components/noise.py): a known answer, and real runs that agree."""

import json

import numpy as np
import pytest
import torch

from conftest import train
from dptrain.components.noise import (DeviceSquares, GradientTap, HostSquares, estimate,
                                      shares, tap_micro_batches, unbiased_parts)

# A population of N = 8 per-sample gradients z_i = G + s * e_i, e_i the 8 sign vectors of
# {-1, 1}^3 (they average to zero): a linear loss z_i . theta has exactly these gradients.
# |G|^2 and tr(Sigma) = sum |z_i - G|^2 / (N - 1) = 8 * 3 s^2 / 7 in closed form.
G = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
S = 1.5
SIGNS = torch.tensor([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)],
                     dtype=torch.float64)
Z = G + S * SIGNS
GRAD_SQ, TRACE = float(G @ G), 8 * 3 * S**2 / 7


def batches(updates: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Random batches drawn without replacement from the N samples, as an epoch's are."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(len(Z), generator=generator)[:batch] for _ in range(updates)]


def check(record: dict) -> None:
    """Within 4 standard errors of the closed form, and the errors small enough to tell."""
    for key, truth in (("grad_sq", GRAD_SQ), ("trace_cov", TRACE),
                       ("noise_scale", TRACE / GRAD_SQ)):
        assert abs(record[key] - truth) < 4 * record[f"{key}_se"], (key, record[key], truth)
        assert record[f"{key}_se"] < 0.04 * truth, key


def test_micro_batches_give_the_known_answer():
    """seq with 2 micro-batches of 2: the tap reads each micro-batch's gradient through the
    multi-grad hook of a real backward, scaled as dptrain scales it (sum / global batch)."""
    theta = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    model = torch.nn.Module()
    model.theta = theta
    tap = GradientTap(torch.device("cpu"), 2)
    tap_micro_batches(model, tap)
    rows = batches(1200, 4)
    tap.begin_epoch(len(rows))
    for index, batch in enumerate(rows):
        tap.begin_update(index)
        theta.grad = None
        for micro in batch.tensor_split(2):
            (Z[micro] @ theta).sum().div(len(batch)).backward()
        tap.summed([theta.grad])
    check(estimate(tap.end_epoch(len(rows)).tolist(), [4] * len(rows), 2, len(Z)))


def test_rank_shares_give_the_known_answer():
    """ddp with 2 ranks of an uneven batch of 5 (3 + 2): each rank's tap holds its pre-sum
    gradient and 1/2 of the summed one's norm; their matrices summed, as the epoch's all-reduce
    sums them."""
    taps = [GradientTap(torch.device("cpu"), 2, column=r, summed_share=0.5) for r in range(2)]
    rows = batches(1200, 5, seed=1)
    for tap in taps:
        tap.begin_epoch(len(rows))
    for index, batch in enumerate(rows):
        parts = [Z[share].sum(0) / len(batch) for share in batch.tensor_split(2)]
        for tap, part in zip(taps, parts):
            tap.begin_update(index)
            tap.pre_sum(part)
            tap.summed([sum(parts)])
    matrix = sum(tap.end_epoch(len(rows)) for tap in taps)
    check(estimate(matrix.tolist(), [5] * len(rows), 2, len(Z)))


def test_without_the_finite_population_weight_the_answer_is_wrong():
    """The check above can fail: the paper's 1/b weights (an infinite population) move |G|^2
    by tr(Sigma)/8 here, many standard errors."""
    exact = unbiased_parts([4.0, 6.0], [2, 2], 4.5, 4, 8)
    infinite = unbiased_parts([4.0, 6.0], [2, 2], 4.5, 4, 10**12)
    assert exact[1] == pytest.approx(infinite[1])  # tr(Sigma): the same difference of weights
    assert exact[0] - infinite[0] == pytest.approx(exact[1] / 8)


def test_the_host_and_the_device_stores_fill_the_same_matrix():
    """A CPU run keeps its squared norms on the host (HostSquares), a GPU run on the device
    (DeviceSquares, run here on the CPU: no GPU to test it on). Both fill the same cells, the
    last column times the summed share, and neither depends on the order in which a cell's
    pieces arrive (DDP's buckets may come in another order from one update to the next)."""
    generator = torch.Generator().manual_seed(0)
    pieces = [(torch.randn(size, generator=generator), cell, key)
              for cell in range(6) for key, size in enumerate((700, 13002, 3))]
    pieces.append((torch.randn(16, 784, generator=generator), 4, 3))  # a parameter's gradient
    matrices = []
    for store in (HostSquares(), DeviceSquares(torch.device("cpu")), HostSquares()):
        arrival = pieces if len(matrices) < 2 else pieces[::-1]
        for tensor, cell, key in arrival:
            store.add(tensor, cell, key)
        matrices.append(store.matrix(2, 3, summed_share=0.5))
    host, device, reversed_host = matrices
    squares = [0.0] * 6
    for tensor, cell, _ in pieces:
        squares[cell] += tensor.double().square().sum().item()
    expected = torch.tensor(squares, dtype=torch.float64).view(2, 3)
    expected[:, 2] *= 0.5
    torch.testing.assert_close(host, expected.flatten(), rtol=1e-5, atol=0)
    torch.testing.assert_close(device, host, rtol=1e-5, atol=0)
    assert torch.equal(reversed_host, host)


def test_a_host_read_does_not_depend_on_where_the_gradient_lies():
    """ddp reads an epoch's first update per parameter, inside DDP's bucket, whose layout DDP
    changes after a process's first update: a resumed run reads the same numbers at other
    addresses. torch's CPU dot gave 2 different sums at these 32 offsets."""
    values = torch.randn(12544, generator=torch.Generator().manual_seed(0))
    store = HostSquares()
    for offset in range(32):
        memory = torch.zeros(len(values) + 64)
        memory[offset:offset + len(values)] = values
        store.add(memory[offset:offset + len(values)], offset, 0)
    assert len(set(store.matrix(32, 1, summed_share=1.0).tolist())) == 1


def test_what_an_estimate_leaves_out():
    assert shares(5, 2) == [3, 2] and shares(1, 2) == [1, 0]
    # One update per epoch: the estimate, without standard errors.
    one = estimate([4.0, 6.0, 9.0], [4], 2, 8)
    assert set(one) == {"grad_sq", "trace_cov", "noise_scale"}
    # |G|^2 estimated <= 0 (noise swamps the signal): no ratio.
    swamped = estimate([9.0, 9.0, 0.0], [4], 2, 8)
    assert swamped["grad_sq"] <= 0 and "noise_scale" not in swamped
    # A share of no samples is left out; an update without two shares gives nothing.
    assert estimate([1.0, 0.0, 1.0], [1], 2, 8) == {}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """ddp x2 and x4 (real workers), and seq with 2 micro-batches (in this process), 1 epoch."""
    from dptrain.storage import checkpoint
    from dptrain.worker import run

    root = tmp_path_factory.mktemp("noise")
    runs = {n: train("ddp", root / f"ddp-{n}", "--epochs", "1", "--checkpoint-every", "0",
                     nproc=n) for n in (2, 4)}
    config, _ = checkpoint.config_and_resume("seq", {
        "out": str(root / "seq-k2"), "device": "cpu", "epochs": 1, "checkpoint_every": 0,
        "accumulate": 2, "threads": 1})
    return runs | {"seq": run("seq", config), "root": root}


@pytest.mark.slow
def test_ddp_at_2_and_4_ranks_and_seq_micro_batches_agree(ddp_runs):
    """Shares of 512 and of 256 estimate the same |G|^2 and tr(Sigma): their epoch means
    agree within their standard errors, and the last is in summary.json. seq's 2 micro-batches
    are ddp x2's two shares (both split alike): the same estimate, to round-off."""
    records = {n: json.loads((ddp_runs["root"] / name / "metrics.jsonl").read_text())
               for n, name in ((2, "ddp-2"), (4, "ddp-4"), ("seq", "seq-k2"))}
    for key in ("grad_sq", "trace_cov", "noise_scale"):
        assert records["seq"][key] == pytest.approx(records[2][key], rel=1e-4), key
    for key in ("grad_sq", "trace_cov", "noise_scale"):
        a, b = records[2][key], records[4][key]
        error = np.hypot(records[2][f"{key}_se"], records[4][f"{key}_se"])
        assert 0 < a and 0 < b and abs(a - b) < 3 * error, (key, a, b, error)
    # About 250 samples after one epoch of the default model (a measured value; what matters
    # is that it is neither the batch nor a share of it).
    assert 100 < records[2]["noise_scale"] < 600
    assert ddp_runs[2]["noise_scale"] == records[2]["noise_scale"]


@pytest.mark.slow
def test_seq_without_micro_batches_has_no_estimate(trained_run):
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()
    assert all("noise_scale" not in json.loads(line) for line in lines)
    assert "noise_scale" not in json.loads((trained_run / "summary.json").read_text())


def test_the_tap_keeps_no_tensor_per_norm():
    """An epoch's norms go into one store, not a tensor each: thousands of small tensors kept
    for an epoch between a wide model's large transient buffers fragmented the heap (seq
    --accumulate 4 at hidden 1024,1024 peaked 350 MB higher than without the tap)."""
    import gc

    def live_tensors() -> int:
        gc.collect()
        return sum(type(o) is torch.Tensor for o in gc.get_objects())

    tap = GradientTap(torch.device("cpu"), 2)
    grads = [torch.randn(16, 8), torch.randn(16)]
    tap.begin_epoch(2000)
    before = live_tensors()
    for index in range(2000):
        tap.begin_update(index)
        tap.micro_batch(grads)
        tap.micro_batch(grads)
        tap.summed(grads)
    assert live_tensors() - before <= 2  # the store, grown once or more (the old one freed)
    matrix = tap.end_epoch(2000).view(2000, 3)
    expected = float(sum(g.square().sum() for g in grads))
    assert torch.allclose(matrix, torch.full_like(matrix, expected), rtol=1e-5)


@pytest.mark.parametrize("updates, read", [(10, [2, 5, 8, 9]), (9, [2, 5, 8]), (2, [1]),
                                           (1, [0])])
def test_the_last_of_every_k_updates_is_read_alone(updates, read):
    """every = 3: the last update of each group of 3 and the epoch's last, each a row of what
    every = 1 records; the others not read at all (the hooks see `reading` False), and `read`
    picks their batches. The first update is read only in an epoch of one."""
    taps = {k: GradientTap(torch.device("cpu"), 2, every=k) for k in (1, 3)}
    grads = [torch.randn(5, 4), torch.randn(4)]
    for tap in taps.values():
        tap.begin_epoch(updates)
        reading = []
        for index in range(updates):
            tap.begin_update(index)
            reading.append(tap.reading)
            scaled = [g * (index + 1) for g in grads]
            tap.micro_batch(scaled)
            tap.micro_batch(grads)
            tap.summed(scaled)
    assert [i for i, r in enumerate(reading) if r] == read
    every = taps[1].end_epoch(updates).view(updates, 3)
    sampled = taps[3].end_epoch(updates).view(len(read), 3)
    assert torch.equal(sampled, every[read])
    assert taps[3].rows(updates) == len(read) and taps[3].read(list(range(updates))) == read


def test_noise_every_changes_the_record_alone(tmp_path):
    """seq with 2 micro-batches, one epoch (41 updates) read at every update and at 11 of
    them: the same training to the last bit, and estimates that differ, within their errors.
    (Not a larger standard error: in a first epoch it is mostly the drift of training over the
    epoch, which 11 updates see as well as 41.)"""
    from dptrain.storage import checkpoint
    from dptrain.worker import run

    records, summaries = {}, {}
    for every in (1, 4):
        config, _ = checkpoint.config_and_resume("seq", {
            "out": str(tmp_path / f"every-{every}"), "device": "cpu", "epochs": 1,
            "checkpoint_every": 0, "accumulate": 2, "threads": 1, "noise_every": every})
        summaries[every] = run("seq", config)
        records[every] = json.loads((tmp_path / f"every-{every}" / "metrics.jsonl").read_text())
    assert summaries[1]["train_loss"] == summaries[4]["train_loss"]
    assert summaries[1]["test_accuracy"] == summaries[4]["test_accuracy"]
    for key in ("grad_sq", "trace_cov", "noise_scale"):
        a, b = records[1][key], records[4][key]
        error = np.hypot(records[1][f"{key}_se"], records[4][f"{key}_se"])
        assert a != b and abs(a - b) < 3 * error, (key, a, b, error)


def test_no_noise_scale_leaves_it_unread(tmp_path):
    """--no-noise-scale: no tap, so no estimate, where 2 micro-batches would give one."""
    from dptrain.storage import checkpoint
    from dptrain.worker import run

    config, _ = checkpoint.config_and_resume("seq", {
        "out": str(tmp_path / "run"), "device": "cpu", "epochs": 1, "checkpoint_every": 0,
        "accumulate": 2, "threads": 1, "noise_scale": False})
    summary = run("seq", config)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert "noise_scale" not in summary and "grad_sq" not in record


@pytest.mark.slow
def test_plot_draws_the_noise_scale(ddp_runs, trained_run, tmp_path):
    """`dptrain plot` adds a third panel, the noise scale over epochs, when a run has it."""
    from PIL import Image

    from dptrain.study.plots import plot_runs

    runs = [ddp_runs["root"] / "ddp-2", ddp_runs["root"] / "ddp-4"]
    with_noise = Image.open(plot_runs(runs, tmp_path / "noise.png")).size
    without = Image.open(plot_runs([trained_run], tmp_path / "plain.png")).size
    assert with_noise[0] > 1.4 * without[0] and with_noise[1] == without[1]
