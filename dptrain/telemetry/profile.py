"""--profile START:COUNT: torch.profiler over a window of updates, one Chrome trace per rank.

The window opens before update START of the run (0-based, counted over all epochs) and closes
after COUNT updates, or at the end of the run. Inside it the telemetry's phases and places are
record_function spans (batch, forward_backward, sum, gather, optimizer, evaluation, ...), and the
profiler records torch's own ops, the collectives among them. Each rank writes
RUN/profile/rank<R>.pt.trace.json: Chrome's trace format, which Perfetto (ui.perfetto.dev) and
chrome://tracing open, and TensorBoard's PyTorch profiler plugin (torch-tb-profiler) finds by its
suffix. Every rank writes its own file, as every rank of an fsdp checkpoint writes its shards.
"""

from __future__ import annotations

from pathlib import Path

PROFILE_DIR = "profile"


def parse_window(text: str) -> tuple[int, int]:
    """'START:COUNT' -> (start, count); the config has validated it."""
    start, count = text.split(":")
    return int(start), int(count)


def trace_path(out: Path, rank: int) -> Path:
    return Path(out) / PROFILE_DIR / f"rank{rank}.pt.trace.json"


class ProfileWindow:
    def __init__(self, window: str, out: Path, strategy, telemetry):
        self.start, count = parse_window(window)
        self.stop = self.start + count
        self.path = trace_path(out, strategy.env.rank)
        self.cuda = strategy.device.type == "cuda"
        self.telemetry = telemetry
        self._profiler = None

    def update(self, step: int) -> None:
        """Update `step` of the run is about to start."""
        if step == self.start:
            self._open()
        elif step == self.stop:
            self.close()

    def _open(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._profiler = profile(activities=activities)
        self._profiler.start()
        self.telemetry.traced(True)

    def close(self) -> None:
        """Close the window (if open) and write this rank's trace."""
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        self.telemetry.traced(False)
        profiler.stop()
        from dptrain.storage.runlog import storage_errors

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with storage_errors(self.path):
            profiler.export_chrome_trace(str(self.path))
