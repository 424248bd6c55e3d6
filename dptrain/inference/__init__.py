"""Using a trained model: evaluation on the test split, predictions for image files."""
