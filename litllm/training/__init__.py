"""Training mechanics shared by the task scripts (which hold their own objective and training step):

    args.py     the --train.* settings and the names of the shared options
    fabric.py   Fabric: precision, devices, strategies (DDP, FSDP), the metrics logger
    loop.py     optimizer and schedule, data order, loss normalization across micro-batches and devices,
                validation, the step log
    losses.py   cross-entropy and log-probabilities at target positions, chunked over the vocabulary
    state.py    the output directory, resumable checkpoints, resuming
"""
