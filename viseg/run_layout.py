"""Names in a run folder that several modules read. Import-free on purpose: `--help`, the summary and the
predict loader use them without pulling in Lightning."""

FINISHED_MARKER = "finished.json"  # written by train() last, after the validation summary

# checkpoints/ of a run folder. last.ckpt is replaced after every epoch by two renames (last -> previous, new ->
# last), so a kill between them leaves previous.ckpt alone: whatever resumes must look for both.
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
PREVIOUS_CHECKPOINT = "previous.ckpt"
BEST_CHECKPOINT = "best.ckpt"  # best moving-average pseudo-Dice so far
RESUMABLE_CHECKPOINTS = (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT)  # newest first

# Which weights of a run predict, best= and the ensembles use. nnU-Net predicts with checkpoint_final.pth;
# "best" (the best moving-average pseudo-Dice) rests on a few hundred validation patches, so it is an option.
WEIGHTS = ("final", "best", "last")
WEIGHTS_HELP = ("final (the end of training, nnU-Net's checkpoint_final), best (best moving-average pseudo-Dice) "
                "or last (the latest epoch, also of an unfinished run)")


def weights_file(weights: str) -> str:
    """The checkpoint file (under checkpoints/) that holds a choice of WEIGHTS."""
    return "best.ckpt" if weights == "best" else "last.ckpt"


def describe_weights(weights: str) -> str:
    """For the log: which weights a prediction uses, and which file they come from."""
    source = {"final": "the end of training", "best": "best moving-average pseudo-Dice",
              "last": "latest epoch, finished or not"}[weights]
    return f"{weights} weights ({source}: checkpoints/{weights_file(weights)})"
