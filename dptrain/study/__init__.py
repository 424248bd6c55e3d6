"""What studies runs: sweeps and their figures."""
