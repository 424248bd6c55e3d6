"""The cost model of a training step: seconds per update from the model's size, the batch and
the ranks (docs/STUDY.md section 2). `dptrain plan` fits it on the user's machine;
benchmarks/cost_model.py fits it to a width x nproc sweep and draws it.

Seconds per update of a run with P parameters, global batch B and n ranks on a node of C cores:

    t = a                        fixed per-step cost (Python, dispatch, the optimizer's loop)
      + c * B * P / min(n, C)    compute: every sample touches every parameter, split over ranks
                                 (ranks beyond the cores take turns, so they divide by C)
      + l * [ddp]                the sum's fixed cost: DDP's bookkeeping and the ranks' waits
      + s * 4P * 2(n - 1) / n    the all-reduce: the bytes a rank moves in a ring or in a
                                 reduce-scatter + all-gather (none for one rank)

fitted by non-negative least squares on the relative error. numpy only (no torch).

Known blind spots (what the model has no term for; measured in STUDY.md section 2):
- Turn-taking: ranks beyond the cores share them; every rank then also pays `a` and `l` on a
  shared core, and auto switches the sum to gloo. The model only divides the compute by C, so
  it overestimates any n > C (ddp x4 on 2 cores: 0.17x to 1.41x measured against seq). Fit and
  trust it for n <= C only.
- Memory-bound products: `c` is one rate for every width. At 20 M parameters the operands of a
  layer (64 MB) stream from memory and the step is 8-11% slower than the model says.
- Only seq and ddp are modelled; fsdp's gathers and reduce-scatters (gloo, per unit) are not.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

TERMS = ("fixed s/step", "compute s per sample-parameter", "ddp fixed s/step",
         "all-reduce s/byte")


def features(params: float, batch: float, nproc: int, cores: int, ddp: bool) -> list[float]:
    """The model's four terms for one configuration, before their coefficients."""
    return [1.0, batch * params / min(nproc, cores), float(ddp),
            4 * params * 2 * (nproc - 1) / nproc]


@dataclass(frozen=True)
class CostModel:
    """The four fitted coefficients (seconds, seconds per sample-parameter, seconds, seconds
    per byte) and the cores of the machine they were fitted on."""

    fixed: float
    compute: float
    ddp_fixed: float
    per_byte: float
    cores: int

    @classmethod
    def from_coefficients(cls, coef, cores: int) -> CostModel:
        return cls(*map(float, coef), cores=int(cores))

    @property
    def coefficients(self) -> np.ndarray:
        return np.array([self.fixed, self.compute, self.ddp_fixed, self.per_byte])

    def seconds_per_update(self, params: float, batch: float, nproc: int,
                           ddp: bool | None = None) -> float:
        """Predicted seconds of one update; ddp defaults to nproc > 1."""
        ddp = nproc > 1 if ddp is None else ddp
        return float(np.dot(self.coefficients,
                            features(params, batch, nproc, self.cores, ddp)))

    def crossover(self, batch: float) -> float | None:
        """Parameters from which ddp on 2 ranks takes less time per update than seq; None if
        never."""
        gain_per_param = self.compute * batch / 2 - 4 * self.per_byte
        return self.ddp_fixed / gain_per_param if gain_per_param > 0 else None

    def as_dict(self) -> dict:
        """Plain JSON: the coefficients by term, the cores, and two derived rates."""
        return {"coefficients": dict(zip(TERMS, map(float, self.coefficients))),
                "cores": self.cores,
                "effective_gflops": 6e-9 / self.compute if self.compute else None,
                "all_reduce_gb_per_s": 1e-9 / self.per_byte if self.per_byte else None}

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        return cls.from_coefficients([data["coefficients"][t] for t in TERMS], data["cores"])


# Fitted on the 2-core VM (x86-64 AMD EPYC, torch 2.14.1, one thread per process) to the seq
# and ddp x2 runs of STUDY.md section 2 (docs/results/study-f/cost_model.json): 0.724 ms fixed,
# 52.7 ps per sample-parameter (114 GFLOP/s of forward and backward products on one core),
# 0.358 ms for ddp, 1.12 GB/s through the sum. Within 7% of every run up to 1.9 M parameters.
VM_2CORE = CostModel(fixed=7.237555692188804e-4, compute=5.2729642893942097e-11,
                     ddp_fixed=3.575020546282923e-4, per_byte=8.926596933258988e-10, cores=2)


def fit(points: list[dict], cores: int) -> CostModel:
    """Non-negative least squares on the relative error, to points with keys params, batch,
    nproc, mode (seq or ddp) and step_seconds: the best over every subset of the terms whose
    unconstrained solution is non-negative (4 terms: 15 subsets)."""
    x = np.array([features(p["params"], p["batch"], p["nproc"], cores, p["mode"] == "ddp")
                  for p in points])
    t = np.array([p["step_seconds"] for p in points])
    x, y = x / t[:, None], np.ones_like(t)  # rows scaled by 1/t: relative residuals
    best, best_error = np.zeros(x.shape[1]), float("inf")
    for k in range(1, x.shape[1] + 1):
        for subset in itertools.combinations(range(x.shape[1]), k):
            coef, *_ = np.linalg.lstsq(x[:, subset], y, rcond=None)
            if (coef < 0).any():
                continue
            error = float(np.sum((x[:, subset] @ coef - y) ** 2))
            if error < best_error:
                best_error, best = error, np.zeros(x.shape[1])
                best[list(subset)] = coef
    return CostModel.from_coefficients(best, cores)


def sweep_measurements(meta: dict) -> list[dict]:
    """Per-update seconds of every finished seq and ddp run of a sweep (sweep.json), with its
    parameter count (from its cell's seq run)."""
    rows = [r for r in meta["runs"] if r["status"] == "ok" and r.get("epoch_seconds")]
    params = {r["cell"]: r["param_bytes"] / 4 for r in rows if r["mode"] == "seq"}
    return [{"mode": r["mode"], "nproc": r["nproc"], "cell": r["cell"],
             "params": params[r["cell"]], "batch": r["global_batch"],
             "step_seconds": r["epoch_seconds"] / r["updates_per_epoch"]}
            for r in rows if r["mode"] in ("seq", "ddp") and r["cell"] in params]

