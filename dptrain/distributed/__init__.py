"""How ranks start and agree: the launcher, the strategies (seq, ddp, fsdp) and the gradient sums."""
