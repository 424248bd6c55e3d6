"""The cluster scripts, run for real on one machine: two "nodes" that are two torchrun agents."""

import os
import subprocess

import pytest

from conftest import REPO, assert_same_parameters, load_state, train

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
