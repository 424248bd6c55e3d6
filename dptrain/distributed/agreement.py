"""Every rank agrees on what the run trains, in one small collective at start.

Nodes started by hand (scripts/multinode.sh, SLURM) each resolve their own flags: a node given
another --lr or --seed trained silently, and another --hidden or batch size ended in a gloo abort
that named nothing. Each rank hashes what it resolved; the ranks compare the hashes (and their
node and host) with one all_gather_object, and a difference is one line naming the keys and
the nodes. The same collective tells every rank whether the attempt before a torchrun restart
stopped on a user error, so that no rank retries what cannot succeed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict
from pathlib import Path

from dptrain.config import Config, Plan
from dptrain.errors import UserError
from dptrain.storage.runlog import read_small

# Left out of the comparison: what may differ from node to node without changing the run.
PER_NODE = {
    "data.data_dir": "each node may read its own copy of MNIST (the data's size is compared)",
    "system.threads": "a node's share of its own cores (the default resolves per node)",
    # The launch section configures each node's torchrun agent (scripts pass torchrun's own
    # flags instead); the rendezvous already makes the agents agree on the world size.
    "launch.*": "each node's agent: its node_rank, nproc, rendezvous address and restarts",
}
# Written into a rank's torchelastic error file with a user error: a restart stops on it.
USER_ERROR_KEY = "dptrain_user_error"


def run_identity(mode: str, config: Config, plan: Plan, resumed_from: int) -> dict:
    """What every rank must agree on: the resolved config (less PER_NODE), the plan at this
    world size (batches, lr, the training samples) and the checkpoint epoch resumed from."""
    values = {f"{section}.{key}": value for section, keys in asdict(config).items()
              for key, value in keys.items()
              if f"{section}.{key}" not in PER_NODE and f"{section}.*" not in PER_NODE}
    values.update({f"plan.{key}": value for key, value in asdict(plan).items()})
    return {**values, "mode": mode, "resumed_from_epoch": resumed_from}


def digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def agree_on_start(strategy, identity: dict) -> None:
    """Raise the same UserError on every rank if the ranks resolved different runs, or if the
    attempt before this restart stopped on a user error. Every rank must call it."""
    if strategy.env.world_size == 1:
        if previous_user_error():
            raise UserError(previous_user_error())
        return
    me = {"digest": digest(identity), "node": os.environ.get("GROUP_RANK", "?"),
          "host": socket.gethostname(), "stopped": previous_user_error()}
    ranks = strategy.gather_object(me)
    stopped = next((r["stopped"] for r in ranks if r["stopped"]), None)
    if stopped:
        raise UserError(stopped)
    if len({r["digest"] for r in ranks}) == 1:
        return
    identities = strategy.gather_object(identity)  # every rank sees the difference: all join
    raise UserError(disagreement(identities, ranks))


def disagreement(identities: list[dict], ranks: list[dict]) -> str:
    """One line: each key that differs, with its values and where each was given."""
    keys = sorted({key for identity in identities for key in identity
                   if any(i.get(key) != identities[0].get(key) for i in identities)})
    # The plan follows from the config: named only when the config agrees (other data, say).
    keys = [key for key in keys if not key.startswith("plan.")] or keys
    shown = [f"{key} {_spread(key, identities, ranks)}" for key in keys[:4]]
    more = f" (and {len(keys) - 4} more keys)" if len(keys) > 4 else ""
    return (f"the nodes resolved different runs: {'; '.join(shown)}{more}; start every node "
            "with the same flags, config and data")


def _spread(key: str, identities: list[dict], ranks: list[dict]) -> str:
    """e.g. '0.01 on node 0 (host a: ranks 0-1), 0.011 on node 1 (host b: rank 2)'."""
    values: dict[str, list[int]] = {}
    for rank, identity in enumerate(identities):
        values.setdefault(json.dumps(identity.get(key), default=str), []).append(rank)
    return ", ".join(f"{value} on {_where(members, ranks)}" for value, members in values.items())


def _where(members: list[int], ranks: list[dict]) -> str:
    nodes: dict[tuple[str, str], list[int]] = {}
    for rank in members:
        nodes.setdefault((ranks[rank]["node"], ranks[rank]["host"]), []).append(rank)
    return " and ".join(f"node {node} ({host}: rank{'s' if len(r) > 1 else ''} "
                        f"{', '.join(map(str, r))})" for (node, host), r in nodes.items())


def previous_user_error() -> str | None:
    """The user error this rank's previous attempt stopped on, after a torchrun restart.

    torchrun gives each attempt's ranks an error file, LOGDIR/<run>/attempt_N/<local
    rank>/error.json, and keeps the earlier attempts' until it exits; a rank that stops on a
    user error writes its message there (report_user_error), marked with USER_ERROR_KEY.
    """
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
    if not restarts or not error_file:
        return None
    path = Path(error_file)
    attempt = path.parent.parent
    if attempt.name != f"attempt_{restarts}":
        return None
    data = read_small(attempt.parent / f"attempt_{restarts - 1}" / path.parent.name / path.name,
                      1 << 20)
    try:
        record = json.loads(data) if data else None
    except ValueError:
        return None
    if isinstance(record, dict) and record.get(USER_ERROR_KEY) and isinstance(
            record.get("message"), str):
        return record["message"]
    return None
