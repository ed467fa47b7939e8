"""The cifar-mae library: data, augmentation, training loop, checkpoints and logs for the scripts beside it."""
