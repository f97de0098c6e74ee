"""Training stage: read the MSL splits, train and validate ResNet-50, write a checkpoint."""
