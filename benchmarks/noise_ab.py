"""The gradient noise tap's cost: two copies of the same training, one with the tap and one
without, in the same processes, taking turns epoch by epoch; repeated in fresh processes.

    DPTRAIN_DATA_DIR=../shared/data/mnist python benchmarks/noise_ab.py \
        [--mode ddp] [--nproc 2] [--epochs 250] [--launches 8] [--noise-every 4] \
        [--hidden 16,16] [--batch-size 1024] [--accumulate 1] [--same] [--json F]

benchmarks/ab.py compares whole runs, and on the 2-core VM whole runs of ddp x 2 differ by 5 to
10% from one another (two modes, by where the ranks' memory and processes land): 40 rounds still
leave its median a percent or two uncertain, as much as the tap costs. Here both arms share
the processes, the cores, the data and the telemetry, and alternate every epoch (off-on, then
on-off), so that the ratio of two neighbouring epochs sees the tap and little else. But a launch
has its own layout too, which moves its median ratio by about +-1.5%: so the processes are
launched `--launches` times, building the arm with the tap first in every other launch, and the
verdict is the median over launches of each launch's median ratio, with their range.

Each arm is what train.py builds for a run with or without --no-noise-scale (worker.py's malloc
settings included), and an epoch is timed as train.py times epoch_seconds: train_epoch, then the
strategy's end of epoch (the tap's end-of-epoch matrix, its all-reduce and the host's estimate
included); after it, untimed, the arm's validation pass, as in a run. The ranks are this script's own processes, a minimal torchrun: gloo over TCP on this
host. `--same` is an A/A check: both arms without the tap, whose ratio should be 1.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK_ENV = "NOISE_AB_RANK"  # set in the ranks: which launch, and where rank 0 writes its times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="ddp", choices=("seq", "ddp", "fsdp"))
    parser.add_argument("--nproc", type=int, default=2, help="ranks (seq: 1)")
    parser.add_argument("--epochs", type=int, default=250, help="per arm and launch")
    parser.add_argument("--launches", type=int, default=8)
    parser.add_argument("--hidden", default="16,16")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--noise-every", type=int, default=4, help="the tap's --noise-every")
    parser.add_argument("--same", action="store_true",
                        help="an A/A check: both arms without the tap (the ratio should be 1)")
    parser.add_argument("--json", default="", help="also write every epoch's seconds here")
    args = parser.parse_args()
    if RANK_ENV in os.environ:
        launch_index, out = os.environ[RANK_ENV].split(":", 1)
        rank_main(args, tap_first=int(launch_index) % 2 == 1, out=Path(out))
    else:
        launches(args)


def launches(args) -> None:
    """Launch the ranks `--launches` times; print each launch's verdict and the overall one."""
    nproc = 1 if args.mode == "seq" else args.nproc
    results = []
    with tempfile.TemporaryDirectory(prefix="noise-ab-") as scratch:
        for index in range(args.launches):
            out = Path(scratch) / f"launch-{index}.json"
            launch(nproc, f"{index}:{out}")
            results.append(json.loads(out.read_text()))
            print(f"launch {index + 1}/{args.launches} ({results[-1]['built_first']} built "
                  f"first): {verdict(results[-1])}", file=sys.stderr, flush=True)
    report(args, nproc, results)


def launch(nproc: int, tag: str) -> None:
    """One set of ranks (env:// rendezvous on a free local port), waited for."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[1])
    procs = []
    for rank in range(nproc):
        env = {**os.environ, RANK_ENV: tag, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
        procs.append(subprocess.Popen([sys.executable, *sys.argv], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"noise_ab.py: a rank failed (exit statuses {codes})")


class Arm:
    """One training as train.py sets it up, with the noise tap on or off."""

    def __init__(self, tap_on: bool, args, config, plan, env, mnist):
        import torch

        from dptrain.components.model import MLP
        from dptrain.components.step import NonFiniteGuard, make_optimizer, make_step
        from dptrain.distributed.strategy import make_strategy
        from dptrain.telemetry import Telemetry
        from dptrain.telemetry.phases import HostClock, Layout
        from dptrain.components.model import LOSS_SUMS
        from dptrain.train import Samples, evaluate

        self.strategy = make_strategy(args.mode, env, config.system, config.ddp,
                                      noise_scale=tap_on)
        self.telemetry = Telemetry(updates=plan.updates_per_epoch,
                                   clock=HostClock(Layout(plan.updates_per_epoch).size))
        torch.manual_seed(config.train.seed)
        self.model = self.strategy.wrap(MLP(config.model.hidden, config.model.activation,
                                            config.train.loss), telemetry=self.telemetry)
        guard = NonFiniteGuard(self.strategy.device)
        build = functools.partial(make_optimizer, config.optim, lr=plan.lr_at(0),
                                  skip_if=guard.flag)
        optimizer = self.strategy.make_optimizer(build, self.model)
        tap = self.strategy.gradient_tap(self.model, micro_batches=config.train.accumulate,
                                         every=config.run.noise_every)
        assert (tap is not None) == tap_on, "this setting has no noise scale to measure"
        self.samples = Samples(mnist, self.strategy.device)
        self.evaluate = functools.partial(evaluate, self.model, self.samples,
                                          strategy=self.strategy,
                                          loss_sum=LOSS_SUMS[config.train.loss],
                                          batch=config.train.eval_batch_size)
        self.step = make_step(self.strategy, self.model, optimizer, self.samples, guard,
                              telemetry=self.telemetry, accumulate=config.train.accumulate,
                              tap=tap)

    def epoch(self, epoch: int, plan, split, seed: int) -> float:
        """One epoch's seconds, timed as train.py times epoch_seconds; then, untimed, what
        train.py does between epochs that touches much memory: the validation pass."""
        from dptrain.components.data import epoch_order
        from dptrain.train import train_epoch

        first_step = (epoch - 1) * plan.updates_per_epoch
        self.telemetry.begin_epoch(epoch, first_step)
        start = time.perf_counter()
        order = epoch_order(split.train, seed, epoch)
        train_epoch(self.step, self.samples, order, plan, self.strategy, first_step,
                    self.telemetry)
        self.strategy.end_epoch(self.model)
        seconds = time.perf_counter() - start
        self.telemetry.end_epoch(self.strategy.all_gather)
        self.evaluate(split.val)
        return seconds


def rank_main(args, *, tap_first: bool, out: Path) -> None:
    import torch

    from dptrain.components.data import load_mnist, split_indices
    from dptrain.config import build_config, resolve
    from dptrain.distributed.strategy import DistEnv
    from dptrain.worker import keep_freed_memory

    env = DistEnv.from_environ()
    keep_freed_memory()  # as a worker does
    config = build_config(flags={"hidden": [int(h) for h in args.hidden.split(",")],
                                 "batch_size": args.batch_size, "accumulate": args.accumulate,
                                 "noise_every": args.noise_every, "device": "cpu"})
    mnist = load_mnist(config.data.data_dir)
    split = split_indices(len(mnist.labels), config.data.split_seed)
    plan = resolve(config, mode=args.mode, world_size=env.world_size, n_train=len(split.train))
    torch.set_num_threads(1)  # as benchmarks/ab.py's runs (--threads 1)
    names = ("on", "off") if tap_first else ("off", "on")
    arms = {name: Arm(name == "on" and not args.same, args, config, plan, env, mnist)
            for name in names}
    seconds = {"off": [], "on": []}
    for epoch in range(1, args.epochs + 1):
        for name in (("off", "on") if epoch % 2 else ("on", "off")):
            seconds[name].append(arms[name].epoch(epoch, plan, split, config.train.seed))
    strategy = arms["off"].strategy
    del arms  # DDP's reducers go before the process group they use (else gloo may abort)
    gc.collect()
    strategy.close()
    if env.is_main:
        out.write_text(json.dumps({"built_first": names[0], "seconds": seconds,
                                   "updates_per_epoch": plan.updates_per_epoch}))


def launch_ratios(result: dict) -> list[float]:
    """The paired on/off ratios of a launch's epochs 2.. (the first pays first touches)."""
    return [on / off for off, on in zip(result["seconds"]["off"][1:],
                                         result["seconds"]["on"][1:])]


def verdict(result: dict) -> str:
    off = statistics.median(result["seconds"]["off"][1:])
    on = statistics.median(result["seconds"]["on"][1:])
    return (f"epoch off {off * 1e3:.2f} ms, on {on * 1e3:.2f} ms, median paired ratio "
            f"{statistics.median(launch_ratios(result)):.4f}")


def report(args, nproc: int, results: list[dict]) -> None:
    medians = [statistics.median(launch_ratios(r)) for r in results]
    off = statistics.median(statistics.median(r["seconds"]["off"][1:]) for r in results)
    updates = results[0]["updates_per_epoch"]
    overall = statistics.median(medians)
    print(f"{args.mode} x {nproc}, hidden {args.hidden}, batch {args.batch_size}, accumulate "
          f"{args.accumulate}, noise_every {args.noise_every}"
          f"{' (A/A: both arms without the tap)' if args.same else ''}: {updates} updates per "
          f"epoch, {args.launches} launches of {args.epochs} epochs per arm; load average "
          f"{os.getloadavg()[0]:.2f} at the end")
    print(f"launch medians: {' '.join(f'{m:.4f}' for m in medians)}")
    print(f"on/off {overall:.4f} (launches {min(medians):.4f}-{max(medians):.4f}); epoch off "
          f"{off * 1e3:.2f} ms; {(overall - 1) * off / updates * 1e6:+.1f} us per update")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "launches": results,
                                               "launch_medians": medians, "ratio": overall},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
