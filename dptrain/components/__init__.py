"""What the training loop is made of: the model, the data, the step and the optimizers."""
