"""One rank of a run: the entry point torchrun starts, and what `dptrain seq` runs in-process.

From a cluster shell script:  torchrun [rendezvous flags] -m dptrain.worker --mode ddp [flags]
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from dptrain.config import MODES, Config, Plan, cpu_cores, resolve, resolve_threads, to_toml
from dptrain.errors import USER_ERROR_EXIT, UserError
from dptrain.flags import config_from_flags, training_flags, with_flags
from dptrain.runlog import RunLog, check_out_dir, command_start_time, default_out_dir, err

# Set by the CLI: it reports a worker's user error itself, from torchelastic's error file.
LAUNCHED_ENV = "DPTRAIN_LAUNCHED"


def run(mode: str, config: Config, *, force: bool = False) -> dict:
    """Train as this process's rank; returns the summary (complete on rank 0)."""
    import torch

    from dptrain.data import load_mnist, split_indices
    from dptrain.strategy import DistEnv, make_strategy
    from dptrain.train import train

    env = DistEnv.from_environ()
    threads = resolve_threads(config.system, env.local_world_size)
    torch.set_num_threads(threads)
    mnist = load_mnist(config.data.data_dir)
    split = split_indices(len(mnist.labels), config.data.split_seed)
    plan = resolve(config, mode=mode, world_size=env.world_size, n_train=len(split.train))
    out = Path(config.run.out) if config.run.out else default_out_dir(mode)

    strategy = make_strategy(mode, env, config.system)
    ok = False
    try:
        _check_out_dir_together(strategy, out, force)
        log = RunLog(out, active=env.is_main)
        setting = {"mode": mode, "world_size": env.world_size, "backend": strategy.backend,
                   "device": str(strategy.device), "threads": threads}
        oversubscribed = (strategy.device.type == "cpu"
                          and threads * env.local_world_size > cpu_cores())
        _announce(log, config, plan, setting, out, warning=(
            f"{env.local_world_size} process(es) on this node x {threads} thread(s) exceed its "
            f"{cpu_cores()} CPU cores; expect slowdowns") if oversubscribed else "")
        try:
            results = train(config, plan, strategy, mnist, split, log)
        finally:
            log.close()
        state_dict = results.pop("state_dict")
        summary = {**setting, **_plan_fields(plan), "epochs": config.train.epochs, **results,
                   "wall_seconds": time.time() - command_start_time(),
                   "torch": torch.__version__, "host": socket.gethostname(),
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        log.finish(summary, state_dict)
        ok = True
        return summary
    finally:
        strategy.close(ok=ok)


def _announce(log: RunLog, config: Config, plan: Plan, setting: dict, out: Path, *,
              warning: str) -> None:
    """Write config.toml and print the plan, with the resolved lr (rank 0)."""
    if warning and log.active:  # rank 0 only, like all output
        log.console.print(f"[yellow]warning:[/] {warning}")
    log.start(to_toml(config, {**setting, **_plan_fields(plan)}),
              {**setting, "global_batch": plan.global_batch,
               "updates_per_epoch": plan.updates_per_epoch, "lr": f"{plan.lr:.6g}",
               "lr_scaling": config.optim.lr_scaling, "epochs": config.train.epochs,
               "out": str(out)})


def _plan_fields(plan: Plan) -> dict:
    return {"global_batch": plan.global_batch, "per_rank_batch": plan.per_rank_batch,
            "updates_per_epoch": plan.updates_per_epoch,
            "samples_per_epoch": plan.samples_per_epoch, "base_lr": plan.base_lr,
            "lr": plan.lr, "warmup_steps": plan.warmup_steps}


def _check_out_dir_together(strategy, out: Path, force: bool) -> None:
    """Rank 0 checks the run folder; every rank learns the outcome, so none is left waiting."""
    problem = None
    if strategy.env.is_main:
        try:
            check_out_dir(out, force)
        except UserError as e:
            problem = e
    if not strategy.all_agree(problem is None):
        raise problem or UserError("rank 0 refused the run folder")


def report_user_error(message: str) -> None:
    """Hand a user error to the launcher (torchelastic's error file) or print it on rank 0."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with open(error_file, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    if not os.environ.get(LAUNCHED_ENV) and os.environ.get("RANK", "0") == "0":
        err(message)


def mode_flag(
    mode: Annotated[str, typer.Option(help=f"{'|'.join(MODES)}")] = "ddp",
) -> None:
    """Declares the worker's --mode; never called."""


def _worker(mode: str, force: bool, **flags) -> None:
    try:
        run(mode, config_from_flags({**flags, "force": force}), force=force)
    except UserError as e:
        report_user_error(str(e))
        sys.exit(USER_ERROR_EXIT)
    # The run is complete and its files are closed. Skip interpreter finalization: a gloo rank
    # was once seen to abort there ("terminate called without an active exception", SIGABRT)
    # after a finished FSDP run, which turned a good run into a failed job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    # Plain tracebacks: a bug in a worker must read like any Python error, rank-prefixed by torchrun.
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(with_flags(_worker, mode_flag, training_flags))
    app()


if __name__ == "__main__":
    main()
