"""The training engine shared by every stage: optimizer and schedule, the optimizer step with
clipping and a non-finite guard, checkpoints, metrics logging, the resumable batch stream."""
