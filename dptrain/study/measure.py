"""What `dptrain plan` measures on this machine: seconds per update (seq in this process, ddp in
worker processes it starts and joins), and the short real run that calibrates the noise scale.

Everything started here is stopped here: the timing workers are joined, the calibration run (a
`dptrain ddp` child in its own session) is stopped by SIGTERM at the target or the budget, and
killed if it does not stop. Its files stay in the plan's folder.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from dptrain.config import Config, resolve
from dptrain.errors import USER_ERROR_EXIT, UserError
from dptrain.storage.runlog import METRICS, peak_rss_bytes, read_records

# Seconds of timed updates per measured point (after WARMUP untimed ones): enough for a
# steady mean on a CPU, short enough for a plan of about a minute.
POINT_SECONDS = 0.25
WARMUP = 3
FEWEST, MOST = 4, 200


def with_width(config: Config, hidden: tuple[int, ...]) -> Config:
    return replace(config, model=replace(config.model, hidden=tuple(hidden)))


def time_updates(config: Config, strategy, samples, train_rows, guess_seconds: float) -> float:
    """Mean seconds of one update of `config` on this rank (every rank must call it): the real
    model, optimizer and step of a run (components/step.py), on the run's batches in order,
    about POINT_SECONDS of them after WARMUP untimed ones."""
    import torch

    from dptrain.components.data import epoch_order
    from dptrain.components.model import MLP
    from dptrain.components.step import NonFiniteGuard, make_optimizer, make_step
    from dptrain.train import global_batches, rank_slice

    plan = resolve(config, mode=strategy.mode, world_size=strategy.env.world_size,
                   n_train=len(train_rows))
    torch.manual_seed(config.train.seed)
    model = strategy.wrap(MLP(config.model.hidden, config.model.activation, config.train.loss))
    guard = NonFiniteGuard(strategy.device)
    optimizer = make_optimizer(config.optim, model.parameters(), plan.lr, skip_if=guard.flag)
    step = make_step(strategy, model, optimizer, samples, guard,
                     tap=strategy.gradient_tap(model, micro_batches=1,
                                               every=config.run.noise_every))
    order = samples.rows(epoch_order(train_rows, config.train.seed, 1)[:plan.samples_per_epoch])
    batches = list(global_batches(order, plan.global_batch))
    timed = min(MOST, max(FEWEST, round(POINT_SECONDS / max(guess_seconds, 1e-6))))
    # Every rank times the same number of updates (guess_seconds is the same on every rank).
    step.begin_epoch(WARMUP + timed)

    def run(first: int, count: int) -> None:
        for index in range(first, first + count):
            rows = batches[index % len(batches)]
            step(index, rank_slice(rows, strategy), len(rows), plan.lr)
        step.end_epoch().tolist()  # waits for the device (and, here, ends the tap's epoch)

    run(0, WARMUP)
    strategy.barrier()
    start = time.perf_counter()
    run(WARMUP, timed)
    seconds = (time.perf_counter() - start) / timed
    strategy.barrier()
    return seconds


def time_seq(configs: list[Config], guesses: list[float], mnist, split) -> list[float]:
    """Seconds per update of each config, seq, in this process (threads as each says)."""
    import torch

    from dptrain.distributed.strategy import DistEnv, make_strategy
    from dptrain.train import Samples

    strategy = make_strategy("seq", DistEnv(), configs[0].system)
    samples = Samples(mnist, strategy.device)
    threads = torch.get_num_threads()
    try:
        out = []
        for config, guess in zip(configs, guesses):
            torch.set_num_threads(config.system.threads or 1)
            out.append(time_updates(config, strategy, samples, split.train, guess))
        return out
    finally:
        torch.set_num_threads(threads)


def time_ddp(configs: list[Config], guesses: list[float], nproc: int) -> tuple[list[float], int]:
    """Seconds per update of each config, ddp on `nproc` workers started (forked on a CPU)
    and joined here; with the workers' largest peak resident memory (bytes)."""
    import torch.multiprocessing as mp

    from dptrain.distributed.launch import cuda_run

    context = mp.get_context("spawn" if cuda_run(configs[0]) else "fork")
    results = context.SimpleQueue()
    port = _free_port()
    mp.start_processes(_ddp_worker, args=(nproc, port, configs, guesses, results), nprocs=nproc,
                       join=True, start_method=context.get_start_method())
    rows = [results.get() for _ in range(nproc)]
    seconds = [max(r["seconds"][i] for r in rows) for i in range(len(configs))]  # slowest rank
    return seconds, max(r["peak_rss_bytes"] for r in rows)


def _ddp_worker(rank: int, nproc: int, port: int, configs: list[Config], guesses: list[float],
                results) -> None:
    import torch

    from dptrain.components.data import load_mnist, split_indices
    from dptrain.distributed.strategy import DistEnv, make_strategy
    from dptrain.train import Samples

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                       "LOCAL_WORLD_SIZE": str(nproc)})
    torch.set_num_threads(configs[0].system.threads or 1)
    env = DistEnv.from_environ()
    mnist = load_mnist(configs[0].data.data_dir)
    split = split_indices(len(mnist.labels), configs[0].data.split_seed)
    strategy = make_strategy("ddp", env, configs[0].system,
                             noise_scale=configs[0].run.noise_scale)  # as the run would read it
    try:
        samples = Samples(mnist, strategy.device)
        seconds = [time_updates(c, strategy, samples, split.train, g)
                   for c, g in zip(configs, guesses)]
        results.put({"seconds": seconds, "peak_rss_bytes": peak_rss_bytes()})
    finally:
        strategy.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_until(config_file: Path, out: Path, *, mode: str, nproc: int, epochs: int,
                target: float | None, budget: float, log: Path) -> dict:
    """Train a real run (`dptrain MODE`, no checkpoints, its output into `log`) until its
    validation accuracy reaches `target` (if given), `epochs` pass, or `budget` seconds; stop
    it there. Returns its per-epoch records, how it ended (target, budget or epochs), and its
    seconds."""
    argv = [sys.executable, "-m", "dptrain", mode, "--config", str(config_file),
            *(["--nproc", str(nproc)] if mode != "seq" else []), "--epochs", str(epochs),
            "--out", str(out), "--checkpoint-every", "0", "--force"]
    started = time.monotonic()
    with open(log, "w") as output:
        child = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # its own group, stopped as one
    ended = "epochs"
    try:
        while child.poll() is None:
            records = read_records(out / METRICS)
            if target is not None and records and records[-1]["val_accuracy"] >= target:
                ended = "target"
                break
            if time.monotonic() - started > budget:
                ended = "budget"
                break
            time.sleep(0.1)
    finally:
        _stop(child)
    seconds = time.monotonic() - started
    if ended == "epochs" and child.returncode != 0:
        lines = log.read_text().strip().splitlines()
        if child.returncode == USER_ERROR_EXIT and lines:  # the run's own one line
            raise UserError(f"{' '.join(argv[2:4])} (--out {out}): "
                            f"{lines[-1].removeprefix('dptrain: error: ')}")
        raise RuntimeError(f"{' '.join(argv[2:4])} failed: "
                           f"{lines[-1] if lines else child.returncode} (its log: {log})")
    return {"command": ["dptrain", *argv[3:]], "records": read_records(out / METRICS), "ended": ended,
            "seconds": seconds}


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM to the run's launcher, which stops its workers and exits; then SIGKILL to
    whatever of its session is left (nothing, normally)."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()
