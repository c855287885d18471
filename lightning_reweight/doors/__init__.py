"""The doors into training: each finds the weighting callbacks and the run's facts, then hands the step to the
one engine (``lightning_reweight.engine``). The Trainer's door is ``reduce_loss`` on a LightningModule that a
``Trainer`` runs; Lightning Fabric and plain loops go through a ``Reweighter``."""

from lightning_reweight.doors.loop import LoopContext, Reweighter

__all__ = ["LoopContext", "Reweighter"]
