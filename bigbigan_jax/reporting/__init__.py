"""What a run writes besides checkpoints: TensorBoard scalars, image grids, curves."""
