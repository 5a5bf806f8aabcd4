"""Training: the train state, the objectives, the step, the loop, checkpoints and faults."""
