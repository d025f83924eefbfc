"""Training engine: the fit loop, the step, checkpoints and run directories."""

# where the analyses of each checkpoint write their files, relative to the run directory: flatness can then be
# measured at the best checkpoint and at the last one (a fixed epoch) of the same run
ANALYSES = {"best": ".", "last": "analyses-last"}
# the keys `--track-sharpness` adds to a tracked epoch's metrics.jsonl record (engine/sharpness.py, fit.py); the
# report's sharpness figure reads them (mmlab_cli/learning.py)
SHARPNESS, STABILITY_LIMIT = "lambda_max", "stability_limit"


def check_checkpoint(checkpoint: str) -> str:
    """`checkpoint` if it names one (best | last), else one line: the one check of every --checkpoint."""
    if checkpoint not in ANALYSES:
        from mmlab_cli.errors import MmlabError

        raise MmlabError(f"--checkpoint {checkpoint}: choose {' or '.join(ANALYSES)}")
    return checkpoint
