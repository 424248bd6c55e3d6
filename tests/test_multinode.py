"""The cluster scripts, run for real on one machine: two "nodes" that are two torchrun agents."""

import os
import subprocess

import pytest

from conftest import REPO, assert_same_parameters, load_state, train, wait_for

FLAGS = ["--epochs", "1", "--batch-size", "2048", "--device", "cpu"]


@pytest.fixture(scope="module")
def seq_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "run"
    return out, train("seq", out, *FLAGS)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_nodes_match_seq(tmp_path, free_port, seq_run, mode):
    out = tmp_path / "two-nodes"
    env = {**os.environ, "NNODES": "2", "NPROC": "1", "RDZV": f"127.0.0.1:{free_port}",
           "JOB_ID": f"test-{mode}"}
    agents = [subprocess.Popen(["bash", str(REPO / "scripts" / "multinode.sh"), "--mode", mode,
                                "--out", str(out), *FLAGS],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _node in range(2)]
    outputs = [agent.communicate(timeout=180)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(outputs)

    seq_out, seq = seq_run
    summary = (out / "summary.json").read_text()
    assert '"world_size": 2' in summary
    assert_same_parameters(load_state(seq_out), load_state(out))
    assert f'"test_accuracy": {seq["test_accuracy"]}' in summary


@pytest.mark.slow
def test_slurm_script_with_stub_scheduler(tmp_path, seq_run):
    """sbatch's script under a fake srun/scontrol: one node, two CPU workers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text('#!/bin/sh\necho "$@" > srun-args\nexec "$@"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "n1",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "42", "NPROC": "2", "PORT": "0",
           "MAX_RESTARTS": "1"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "slurm.sbatch"), *FLAGS], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--max-restarts=1" in (tmp_path / "srun-args").read_text()
    out = tmp_path / "runs" / "ddp-slurm-42"
    assert_same_parameters(load_state(seq_run[0]), load_state(out))


def start_nodes(tmp_path, port, node_flags, *, nnodes=2, restarts=0, job="test"):
    """One scripts/multinode.sh agent per entry of node_flags (one worker each), with their own
    $TMPDIR; each agent's output (both streams) goes to tmp_path/node<i>.log."""
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "NNODES": str(nnodes), "NPROC": "1", "RDZV": f"127.0.0.1:{port}",
           "JOB_ID": job, "MAX_RESTARTS": str(restarts), "TMPDIR": str(scratch)}
    agents = []
    for node, flags in enumerate(node_flags):
        with open(tmp_path / f"node{node}.log", "w") as log:
            agents.append(subprocess.Popen(
                ["bash", str(REPO / "scripts" / "multinode.sh"), "--mode", "ddp", *FLAGS,
                 "--checkpoint-every", "0", *flags], env=env, stdout=log,
                stderr=subprocess.STDOUT))
    return agents


def error_lines(tmp_path, nodes):
    return [line for node in range(nodes)
            for line in (tmp_path / f"node{node}.log").read_text().splitlines()
            if line.startswith("dptrain: error:")]


@pytest.mark.slow
def test_nodes_that_resolve_different_runs_are_refused_naming_keys_and_nodes(tmp_path,
                                                                              free_port):
    """Another --lr and --seed on one node trained silently, both nodes exiting 0; now every
    rank compares what it resolved at start. Also: no torchelastic_* is left in $TMPDIR."""
    out = tmp_path / "run"
    agents = start_nodes(tmp_path, free_port, [["--out", str(out), "--lr", "0.01"],
                                               ["--out", str(out), "--lr", "0.011", "--seed", "3"]])
    codes = [agent.wait(timeout=180) for agent in agents]
    errors = error_lines(tmp_path, 2)
    assert 0 not in codes and len(errors) == 1, (codes, errors)
    assert errors[0].startswith("dptrain: error: the nodes resolved different runs: optim.lr ")
    for words in ("0.01 on node ", "0.011 on node ", "train.seed ", "3 on node ", "rank 0",
                  "rank 1", "; start every node with the same flags, config and data"):
        assert words in errors[0], errors[0]
    assert "plan.lr" not in errors[0]  # it follows from optim.lr
    assert not out.exists()  # refused before anything was written
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow
def test_a_refused_run_folder_is_not_retried_by_a_restart(tmp_path, free_port):
    """Rank 0 found --out in use: every torchrun restart tried again, and one that came after
    the holder had ended trained into the folder. A restart now stops on the user error."""
    from dptrain.storage.runlog import RunLock

    out = tmp_path / "run"
    held = RunLock(out)
    held.acquire()
    try:
        [agent] = start_nodes(tmp_path, free_port, [["--out", str(out)]], nnodes=1, restarts=1)
        log = tmp_path / "node0.log"
        wait_for(lambda: "is in use by another run" in log.read_text() or agent.poll() is not None,
                 what="rank 0 to find the folder in use")
    finally:
        held.release()  # before the restart: a retry would now take the folder and train
    assert agent.wait(timeout=180) != 0, log.read_text()
    errors = error_lines(tmp_path, 1)
    assert len(errors) == 2 and errors[0] == errors[1], errors  # attempt 0's, then the restart's
    assert f"--out {out} is in use by another run (pid {os.getpid()} on " in errors[0]
    assert not (out / "config.toml").exists()
