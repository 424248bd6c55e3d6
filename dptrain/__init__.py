"""dptrain: sequential, DDP and FSDP training of an MNIST MLP with an exact parity guarantee."""

__version__ = "0.1.0"
