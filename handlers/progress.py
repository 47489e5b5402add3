"""What a person watching the terminal sees: a tqdm bar per epoch, or nothing when output is a file.

The bar advances when LossBuffer flushes, so drawing it never forces a device synchronisation. Attach
LossBuffer first: the bar reads `state.running_loss` and `state.lr`, which the flush sets.
"""
from __future__ import annotations

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar


def attach_progress_bar(trainer: Engine, every: int) -> ProgressBar:
    bar = ProgressBar(persist=False, bar_format=None)
    bar.attach(trainer, event_name=Events.ITERATION_COMPLETED(every=every),
               state_attributes=["running_loss", "lr"])
    return bar
