"""Training engine: the fit loop, the step, checkpoints and run directories."""

# where the analyses of each checkpoint write their files, relative to the run directory: flatness can then be
# measured at the best checkpoint and at the last one (a fixed epoch) of the same run
ANALYSES = {"best": ".", "last": "analyses-last"}
