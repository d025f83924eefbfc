"""Training engine: the fit loop, the step, checkpoints and run directories."""

# where the analyses of each checkpoint write their files, relative to the run directory: flatness can then be
# measured at the best checkpoint and at the last one (a fixed epoch) of the same run
ANALYSES = {"best": ".", "last": "analyses-last"}


def check_checkpoint(checkpoint: str) -> str:
    """`checkpoint` if it names one (best | last), else one line: the one check of every --checkpoint."""
    if checkpoint not in ANALYSES:
        from mmlab_cli.errors import MmlabError

        raise MmlabError(f"--checkpoint {checkpoint}: choose {' or '.join(ANALYSES)}")
    return checkpoint
