"""Two torchrun agents as two "nodes" on one machine, the way a cluster script starts them."""

import subprocess
import sys

import pytest

from conftest import assert_same_parameters, load_state, train

FLAGS = ["--epochs", "1", "--batch-size", "2048"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_nodes_match_seq(tmp_path, free_port, mode):
    out = tmp_path / "two-nodes"
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port}",
             f"--rdzv-id=test-{mode}", "-m", "dptrain.worker", "--mode", mode, "--out", str(out),
             *FLAGS],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)]
    outputs = [agent.communicate(timeout=180)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(outputs)

    seq = train("seq", tmp_path / "seq", *FLAGS)
    summary = (out / "summary.json").read_text()
    assert '"world_size": 2' in summary
    assert_same_parameters(load_state(tmp_path / "seq"), load_state(out))
    assert f'"test_accuracy": {seq["test_accuracy"]}' in summary
