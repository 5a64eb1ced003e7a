from __future__ import annotations

from distft.regularizers import REGULARIZERS
from distft.regularizers.anchored import AnchoredPenalty, penalized_names


@REGULARIZERS.register("l2sp")
class L2SP(AnchoredPenalty):
    """L2-SP (Li et al., 2018): strength/2 * ||theta - theta_0||^2 over the trainable
    tensors (heads aside), theta_0 their values when the run starts: the pretrained
    weights, or in a sequential stage the weights the previous stage handed on. Under
    LoRA the trainable tensors are the adapters, so the pull is toward the adapter the
    stage started from (for a first stage, B = 0: the pretrained model)."""

    def setup(self, run):
        params = dict(run.model.named_parameters())
        self.anchors = {n: params[n].detach().clone().cpu() for n in penalized_names(run.model)}
        self._placed = False
