"""Where a run is inside its epoch, in batches, also when it resumes with another batch size or
process count."""


def epoch_batch_size(flags):
    """Images per batch of the stream an epoch passes over, from a run's flags (a plain dict)."""
    if flags.get("epoch_over", "px") == "labeled":
        return flags.get("labeled_batch_size") or flags["batch_size"]
    return flags["batch_size"]


def batches_done_in_epoch(state, batch_size, world_size):
    """A saved position inside its epoch, in per-process batches of this run.

    The position is saved in batches of the run that wrote it: with another process count or batch
    size it is converted through the images seen. Every process count reads the same seeded order of
    the epoch (see data.ShuffledBatches), so the first images seen are the same images; a partial
    batch is trained again rather than skipped.
    """
    images_seen = state["batch_in_epoch"] * epoch_batch_size(state["args"]) * state["world_size"]
    return images_seen // (batch_size * world_size)
