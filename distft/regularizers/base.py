from __future__ import annotations

from typing import Dict, Optional

import torch

from distft.registry import Component


class Regularizer(Component):
    """A penalty R(parameters) added once to each optimizer step's loss.

    The loop backpropagates R / world_size on every rank together with the step's last
    micro-batch, so that after the backend's gradient exchange (which sums the ranks'
    normalised losses) the gradient holds exactly dR/dtheta once, on any process count.
    `penalty` gets the model as the backend wrapped it and the unwrapped module; it runs
    outside autocast (fp32)."""

    def penalty(self, model, module) -> Optional[torch.Tensor]:
        """This step's penalty (a scalar tensor in the autograd graph), or None for none."""
        return None

    def artifacts(self, run) -> Dict[str, str]:
        """Files a later stage needs (name -> path under run.run_dir), written at the end
        of a run (e.g. EWC's Fisher estimate); sequential stages pass them on."""
        return {}

    def stage_data(self, tasks: Dict[str, Dict], k: int) -> None:
        """Sequential fine-tuning: adjust stage k's mixture before it runs. `tasks` maps
        each stage so far (earlier ones first) to its {data, task, train} spec; only stage
        k trains unless changed here (replay trains a buffer of the earlier ones)."""
