"""The gradient noise scale, measured during training, at no extra sync.

McCandlish, Kaplan, Amodei et al. 2018 ("An Empirical Model of Large-Batch Training", appendix
A): the mean gradient of a batch of b samples has E|G_b|^2 = |G|^2 + tr(Sigma) / b, so squared
norms at two batch sizes give unbiased estimates of |G|^2 (the true gradient's squared norm) and
tr(Sigma) (the per-sample gradient variance, summed over parameters), and the simple noise scale
B_simple = tr(Sigma) / |G|^2 is the batch beyond which a bigger batch stops saving updates.

Data-parallel training has both sizes for free: a rank's gradient before the sum over ranks
(the small batch: its share) and the summed gradient (the whole global batch). In seq, an update
of K >= 2 micro-batches gives them too (the micro-batches, and their sum).

Scaling (train.py): each rank's loss is *summed* over its samples and divided by the *global*
batch B, and gradients are summed over ranks. A rank's pre-sum gradient is therefore its share
of the mean, (b/B) * G_b, not its own mean G_b: its squared norm is rescaled by (B/b)^2.

Batches are drawn without replacement from the N train samples, so the variance of a batch mean
is tr(Sigma) * (1/b - 1/N) (Sigma with the 1/(N-1) normalisation): the estimates below use that
weight, exact for any b <= N (the full batch, b = N, has no noise), where the paper's 1/b
assumes an infinite population.

Per update read (one in K, `--noise-every`): the squared norms of the pre-sum gradient (a DDP
bucket's flat buffer, an FSDP unit's reduce-scatter input, a micro-batch's gradients) and of
the summed gradients this rank holds (one kernel each; a list of tensors: a foreach kernel and
the norm of those norms). On a GPU they stay on the device (DeviceSquares); on the CPU, where
reading a number is no sync, each is a host float at once (HostSquares), which costs less
there. Once per epoch they are added, in a fixed order, into an (updates read x parts+1) matrix
that joins the epoch's one all-reduce of the losses. The host then computes the estimates per
update and averages them over the epoch (`estimate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def shares(n: int, parts: int) -> list[int]:
    """The sizes of `parts` contiguous shares of n items, larger first (data.shard_bounds and
    torch.tensor_split split alike)."""
    base, extra = divmod(n, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def epoch_batches(samples_per_epoch: int, global_batch: int) -> list[int]:
    """The global batch of each update of an epoch (train.global_batches): full ones, then the
    tail, if any."""
    full, tail = divmod(samples_per_epoch, global_batch)
    return [global_batch] * full + ([tail] if tail else [])


class GradientTap:
    """Squared gradient norms of an epoch's updates read: on a GPU kept on the device until the
    epoch's end (DeviceSquares), on the CPU as host floats (HostSquares).

    Columns 0..parts-1: the pre-sum gradients, one per small batch (a rank's share under
    ddp/fsdp: `column` is this rank's; a micro-batch in seq: the next column per backward).
    The last column: this rank's part of the summed gradient's squared norm, times
    `summed_share` (1/world size where every rank holds the whole sum, 1 where each holds a
    shard), so that the sum over ranks is the whole norm. On a GPU nothing is read by the host
    here.

    `every` K (run.noise_every): read one update of each K, the last of each group of K in an
    epoch (updates K-1, 2K-1, ..., and the epoch's last), a row of the matrix each, the others
    not at all: their hooks ask `reading` first. The last of a group, not the first: an
    epoch's first update is dearer to read under ddp (BucketTap), and is read only where K = 1
    or the epoch has one update.
    """

    def __init__(self, device: torch.device, parts: int, *, column: int | None = None,
                 summed_share: float = 1.0, every: int = 1):
        self.device, self.parts, self.column = device, parts, column
        self.summed_share, self.every = summed_share, every
        self._index, self._row, self._next, self._updates = 0, 0, 0, 0
        self.reading = True  # whether this update is read (begin_update)
        # The epoch's squared norms: on the host for CPU runs, where reading one costs no
        # sync and host code is cheaper cold; on the device otherwise, read once per epoch.
        self._squares = HostSquares() if device.type == "cpu" else DeviceSquares(device)

    @property
    def columns(self) -> int:
        return self.parts + 1

    def begin_epoch(self, updates: int) -> None:
        """An epoch of `updates` updates begins."""
        self._updates = updates
        self._squares.clear()

    def rows(self, updates: int) -> int:
        """The matrix's rows for an epoch of `updates`: the updates read."""
        return -(-updates // self.every)

    def read(self, items: Sequence) -> list:
        """Those of an epoch's per-update `items` (say, its global batches) that are read."""
        n, k = len(items), self.every
        return [items[min(start + k, n) - 1] for start in range(0, n, k)]

    def begin_update(self, index: int) -> None:
        self._index, self._next = index, 0
        self._row, place = divmod(index, self.every)
        self.reading = place == self.every - 1 or index == self._updates - 1

    def pre_sum(self, tensor: torch.Tensor, key: int = 0) -> None:
        """A flat piece of this rank's gradient before the sum over ranks (a DDP bucket's
        buffer, an FSDP unit's reduce-scatter input); the pieces of one update add up in the
        order of their keys, then of their arrival."""
        if self.reading:
            self._write(tensor, self.column, key)

    def micro_batch(self, tensors: Sequence[torch.Tensor]) -> None:
        """The whole gradient of one micro-batch (seq), before it is added to the others'."""
        if self.reading:
            self._norm_of_all(tensors, self._next)
            self._next += 1

    def summed(self, grads: Sequence[torch.Tensor]) -> None:
        """The gradients this rank holds after the update's sum (its shards under fsdp)."""
        if self.reading:
            self._norm_of_all(grads, self.parts)

    def _norm_of_all(self, tensors: Sequence[torch.Tensor], column: int, key: int = 0) -> None:
        """One norm of a list of tensors (per tensor, then of those, in the list's order)."""
        if tensors:
            self._write(torch.stack(torch._foreach_norm(list(tensors))), column, key)

    def _write(self, tensor: torch.Tensor, column: int, key: int) -> None:
        """The squared norm of `tensor`, for this update's cell `column`."""
        self._squares.add(tensor, self._row * self.columns + column, key)

    def end_epoch(self, updates: int) -> torch.Tensor:
        """The (rows(updates) x columns) matrix of squared norms, flattened (float64, on the
        device): to be summed over ranks with the epoch's other totals."""
        return self._squares.matrix(self.rows(updates), self.columns, self.summed_share)


class DeviceSquares:
    """An epoch's squared norms on an accelerator, left there until the epoch's all-reduce: no
    read syncs with the host. Each norm is written in place (out=) into one preallocated
    tensor; `cell` is its flat (update, column) place in the matrix, `key` its order within
    that cell (a bucket's or a unit's).

    One tensor, not a tensor per norm: thousands of small tensors kept for an epoch between a
    wide model's large transient buffers fragmented the heap (+350 MB peak RSS for seq
    --accumulate 4 at hidden 1024,1024)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._store = torch.empty(256, dtype=torch.float32, device=device)
        self.clear()

    def clear(self) -> None:
        self._cells: list[int] = []
        self._keys: list[int] = []

    def add(self, tensor: torch.Tensor, cell: int, key: int) -> None:
        n = len(self._cells)
        if tensor.dtype == torch.float64 and self._store.dtype != torch.float64:
            self._store = self._store.double()  # float64 gradients keep their precision
        if n == len(self._store):  # the first epoch learns the size; later ones reuse it
            self._store = torch.cat([self._store, torch.empty_like(self._store)])
        self._cells.append(cell)
        self._keys.append(key)
        slot = self._store[n]
        if tensor.dtype == slot.dtype:
            torch.linalg.vector_norm(tensor, out=slot)
        else:
            slot.copy_(torch.linalg.vector_norm(tensor))

    def matrix(self, rows: int, columns: int, summed_share: float) -> torch.Tensor:
        """The squares added into their cells (float64, flat), the last column times
        `summed_share`."""
        out = torch.zeros(rows * columns, dtype=torch.float64, device=self.device)
        n = len(self._cells)
        if n:
            # A fixed order of addition (by key, not by arrival): DDP's buckets and FSDP's
            # units may come in another order from one update to the next.
            order = np.lexsort((self._keys, self._cells))
            index = torch.from_numpy(order).to(self.device)
            squares = self._store[:n][index].to(torch.float64).square()
            cells = torch.from_numpy(np.asarray(self._cells)[order]).to(self.device)
            out.index_add_(0, cells, squares)
            out.view(rows, columns)[:, -1] *= summed_share
        return out


class HostSquares:
    """DeviceSquares' counterpart on the CPU, where a read is no sync: each norm is a Python
    float at once (its tensor freed at once), squared in float64 as DeviceSquares squares it,
    and the matrix is built in plain Python.

    Host code, because a CPU run's tap comes cold, between forward and backward passes, where
    an operation costs its code path more than its bytes: the epoch's matrix takes about 37 us
    in Python against ~120 us in torch's ops, and a norm into a new tensor about half the time
    of one written in place (benchmarks/tap_cold.py). Not a dot product, which is cheaper: the
    norm's reduction adds up alike wherever a tensor starts in memory, and torch's CPU dot (a
    BLAS call) does not (the same floats at 32 offsets: 2 different dots, 1 norm), which
    changed a parameter's digits between DDP's two bucket layouts and broke exact resume;
    numpy's dot splits more than 10,000 floats over OpenBLAS's threads."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._squares: list[tuple[int, int, float]] = []  # (cell, key, square), as added

    def add(self, tensor: torch.Tensor, cell: int, key: int) -> None:
        if tensor.dtype in (torch.float32, torch.float64):
            norm = torch.linalg.vector_norm(tensor).item()
        else:  # half precision would add up in half precision
            norm = torch.linalg.vector_norm(tensor, dtype=torch.float32).item()
        self._squares.append((cell, key, norm * norm))

    def matrix(self, rows: int, columns: int, summed_share: float) -> torch.Tensor:
        out = [0.0] * (rows * columns)
        # By cell, then key, then arrival (a stable sort): DeviceSquares' order.
        for cell, _, square in sorted(self._squares, key=lambda added: added[:2]):
            out[cell] += square
        for last in range(columns - 1, len(out), columns):
            out[last] *= summed_share
        return torch.tensor(out, dtype=torch.float64)


class BucketTap(GradientTap):
    """ddp's tap: the comm hook hands it each bucket before the sum (`tapped_comm_hook`), and
    the summed gradient is read from the same memory after it.

    With gradient_as_bucket_view the parameters' .grad are views of the bucket's flat buffer,
    and DDP leaves the sum there, so one norm per bucket serves both reads: one kernel each,
    where per-parameter norms (a foreach kernel over bucket.gradients() and over the .grad list)
    cost 14% of a ddp x 2 epoch of the default model on the 2-core VM (benchmarks/ab.py).

    But a buffer holds its parameters in DDP's layout, which DDP changes once, after a
    process's first update (to the order the gradients came in), and the float32 norm of the
    same numbers in another order rounds differently. A process starts (fresh, resumed or
    restarted) at the first update of an epoch, so that update is read per parameter, keyed by
    the parameter's place in the model: the same digits in every layout, and a resumed run
    records what the uninterrupted one did (tests/test_reliability.py compares them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._position: dict[torch.Tensor, int] = {}
        self._held: list[tuple[int, torch.Tensor]] = []  # (key, memory) read before the sum

    @property
    def first_update(self) -> bool:
        """The first update of an epoch: read per parameter, before the sum."""
        return self._index == 0

    def watch(self, model: torch.nn.Module) -> None:
        """The model's parameters, in its order (the first update's per-parameter keys)."""
        self._position = {param: i for i, param in enumerate(model.parameters())}

    def begin_update(self, index: int) -> None:
        super().begin_update(index)
        self._held = []

    def bucket(self, bucket) -> None:
        """A DDP GradBucket of this rank's gradients, before the sum."""
        if self.first_update:  # perhaps DDP's layout before its rebuild: per parameter
            pieces = [(self._position[p], g)
                      for p, g in zip(bucket.parameters(), bucket.gradients())]
        else:
            pieces = [(bucket.index(), bucket.buffer())]
        self._held.extend(pieces)
        for key, tensor in pieces:
            self._write(tensor, self.column, key)

    def bucket_after_sum(self, index: int, before: list[torch.Tensor],
                         buffer: torch.Tensor) -> None:
        """Bucket `index` read after its sum (not in the first update): `before`, a copy of
        this rank's gradients as they went into the sum (in pieces, in order), and `buffer`,
        which now holds the sum."""
        if len(before) == 1:
            self._write(before[0], self.column, index)
        else:
            self._norm_of_all(before, self.column, index)
        self._held.append((index, buffer))

    def summed(self, grads: Sequence[torch.Tensor]) -> None:
        """The update's summed gradient, as the buckets hold it now (`grads` views them)."""
        if not self.reading:
            return
        for key, tensor in self._held:
            self._write(tensor, self.parts, key)
        self._held = []  # no old buffer kept alive past DDP's rebuild


def unbiased_parts(small_sq: Sequence[float], small_sizes: Sequence[int], big_sq: float,
                   big_size: int, population: int) -> tuple[float, float]:
    """One update's unbiased (|G|^2, tr(Sigma)) from the squared norms of its small batches'
    mean gradients (a size of 0 marks a part to leave out) and of its big batch's. Needs two or
    more parts of one or more samples."""
    used = [(sq, size) for sq, size in zip(small_sq, small_sizes) if size > 0]
    small_mean = sum(sq for sq, _ in used) / len(used)
    # E[small_mean] = |G|^2 + tr(Sigma) * w_small; E[big_sq] = |G|^2 + tr(Sigma) * w_big.
    w_small = sum(1 / size - 1 / population for _, size in used) / len(used)
    w_big = 1 / big_size - 1 / population
    trace = (small_mean - big_sq) / (w_small - w_big)
    grad_sq = (w_small * big_sq - w_big * small_mean) / (w_small - w_big)
    return grad_sq, trace


def estimate(matrix: Sequence[float], batches: Sequence[int], parts: int,
             population: int) -> dict[str, float]:
    """The epoch's noise-scale record from the all-reduced tap matrix (updates x parts+1).

    `batches`: the global batch of each update of the epoch, split into `parts` small batches
    (the ranks' shares, or one rank's micro-batches in seq; both split alike: `shares`).
    Smoothing: the paper averages the two unbiased estimates separately (an exponential moving
    average) and takes the ratio of the averages, since the ratio of single noisy estimates is
    biased; here the average is uniform over the epoch's updates (the host reads once per
    epoch), so each record describes its epoch alone. Keys: grad_sq (|G|^2), trace_cov
    (tr Sigma), noise_scale (their ratio, in samples; left out where grad_sq <= 0, i.e. noise
    swamps the signal), and the standard errors of the epoch means (*_se: the spread over the
    epoch's updates, which includes training's drift; none with one update per epoch).
    Empty where no update has two parts of one sample or more.

    Plain Python, not numpy: it runs at the end of every epoch, inside epoch_seconds, where
    numpy's calls come cold, at several times their warm cost. For the default ddp x 2 epoch
    (11 updates read) numpy's version took about 300 us cold, this one about 50 us
    (benchmarks/noise_ab.py's profile); it costs ~1.6 us per update read, against the read's
    own ~25 us.
    """
    columns, sizes = parts + 1, {}
    grads, traces = [], []
    for row, batch in enumerate(batches):
        if min(batch, parts) < 2:  # fewer than two shares of one sample or more
            continue
        if batch not in sizes:
            sizes[batch] = shares(int(batch), parts)
        norms = matrix[row * columns:(row + 1) * columns]
        # A rank's pre-sum gradient is its share (b/B) of the mean: its own mean is (B/b) times it.
        own = [sq * (batch / size) ** 2 if size else 0.0
               for sq, size in zip(norms[:parts], sizes[batch])]
        grad_sq, trace = unbiased_parts(own, sizes[batch], norms[parts], batch, population)
        grads.append(grad_sq)
        traces.append(trace)
    n = len(grads)
    if not n:
        return {}
    g, t = sum(grads) / n, sum(traces) / n
    record = {"grad_sq": g, "trace_cov": t}
    if g > 0:
        record["noise_scale"] = t / g
    if n >= 2:
        # The covariance of the two epoch means: the spread over the updates (n - 1), / n.
        def cov(xs, mx, ys, my):
            return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / ((n - 1) * n)

        var_g, var_t, cov_gt = cov(grads, g, grads, g), cov(traces, t, traces, t), \
            cov(grads, g, traces, t)
        record["grad_sq_se"] = math.sqrt(var_g)
        record["trace_cov_se"] = math.sqrt(var_t)
        if g > 0:  # the delta method for a ratio of means
            var = var_t / g**2 - 2 * t * cov_gt / g**3 + t**2 * var_g / g**4
            record["noise_scale_se"] = math.sqrt(max(var, 0.0))
    return {k: v for k, v in record.items() if math.isfinite(v)}


# Where each mode reads its small batches (the strategies install these; nothing here is
# called by the loop):

def tapped_comm_hook(hook, tap: BucketTap, model: torch.nn.Module, summer=None):
    """DDP comm hook `hook`, wrapped: it first hands the bucket, this rank's gradients before
    the sum, to the tap. DDP hands a hook a bucket of this rank's gradients and nothing else
    does; one norm over the flat buffer, which the sum reads anyway.

    `summer`: the shared-memory sum (shm_sum.SharedMemorySum) that `hook` runs, done when it
    returns. It keeps a copy of this rank's gradients in its input slots, so the tap reads that
    after the sum instead: while the peers wait for this rank in the sum, it does nothing else
    (measured on ddp x 2 of the default model: +2.5% per epoch read after the sum, +5% before,
    benchmarks/ab.py-style alternating runs; docs/PERFORMANCE.md)."""
    tap.watch(model)

    def observed(state, bucket):  # `bucket`, not annotated: DDP checks both (gradsum.py)
        if not tap.reading:
            return hook(state, bucket)
        buffer = bucket.buffer()
        if summer is None or tap.first_update or not summer.keeps_inputs(buffer.numel()):
            tap.bucket(bucket)
            return hook(state, bucket)
        done = hook(state, bucket)
        tap.bucket_after_sum(bucket.index(), summer.own_inputs(buffer.numel()), buffer)
        return done

    return observed


def tapped_reduce_scatter(tap: GradientTap):
    """FSDP2's reduce-scatter with a read of its input first: this rank's whole (padded,
    flattened) gradient of a unit before the sum, which FSDP2 holds nowhere else.
    `set_custom_reduce_scatter` is FSDP2's public seam for it; the default comm it takes the
    place of comes from a private module, so it is imported here only."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    class TappedReduceScatter(DefaultReduceScatter):  # the default, with its checks' type
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            tap.pre_sum(input_tensor)
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return TappedReduceScatter()


def tap_micro_batches(model: torch.nn.Module, tap: GradientTap):
    """Read each micro-batch's gradients (seq) as one backward computes them, before they are
    added into .grad: one hook for all parameters (torch's multi-grad hook), one norm each."""
    params = [p for p in model.parameters() if p.requires_grad]

    def observed(grads):
        tap.micro_batch([g for g in grads if g is not None])

    return torch.autograd.graph.register_multi_grad_hook(params, observed)
