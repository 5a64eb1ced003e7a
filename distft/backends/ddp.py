import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distft.backends.base import Backend, peel
from distft.errors import ConfigError


_KEPT_UNTIL_EXIT: list = []


class DDPBackend(Backend):
    """torch DistributedDataParallel: every rank holds the whole model and a slice of each
    global batch; gradients are averaged in backward. NCCL on GPU, gloo on CPU.
    Started by a launcher: torchrun --nproc_per_node N -m distft.train backend=ddp ..."""

    name = "ddp"
    features = frozenset({"chunked_loss", "compile", "dp", "low_precision_frozen"})

    def __init__(self, cfg, trainer_cfg=None, precision=None):
        super().__init__(cfg, trainer_cfg, precision)
        if not os.environ.get("WORLD_SIZE") or not os.environ.get("RANK"):
            raise ConfigError(
                "backend=ddp needs a launcher that sets RANK/WORLD_SIZE, e.g. "
                "`torchrun --nproc_per_node 2 -m distft.train backend=ddp ...`"
            )
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    def setup(self):
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if self.device.type == "cuda" else "gloo",
                timeout=timedelta(minutes=self.cfg.timeout_minutes),
            )

    def wrap(self, model, make_optimizer):
        if self.private_exchange:
            # Opacus' DP-DDP only broadcasts rank 0's weights; its DistributedDPOptimizer
            # sums the clipped per-example gradients (noise on rank 0) in its step.
            from opacus.distributed import DifferentiallyPrivateDistributedDataParallel

            self._model = DifferentiallyPrivateDistributedDataParallel(model)
            return self._model, make_optimizer(model)
        ids = [self.local_rank] if self.device.type == "cuda" else None
        self._model = DistributedDataParallel(model, device_ids=ids)
        return self._model, make_optimizer(model)

    def backward(self, loss, sync=True):
        if self.private_exchange:
            loss.backward()  # per-example gradients stay on this process until the DP step
            return
        # The loss is already divided by the target count of the whole global step, so the
        # ranks' gradients must be summed; DDP averages them, hence the factor world_size.
        if sync:
            self._scaled(loss * self.world_size).backward()
        else:
            with self._model.no_sync():
                self._scaled(loss * self.world_size).backward()

    def unwrap(self, model):
        return peel(model.module if isinstance(model, DistributedDataParallel) else model)

    def all_reduce_sum(self, values):
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def all_reduce_max(self, values):
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def _all_reduce(self, values, op):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj):
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        dist.barrier()

    def teardown(self, keep=()):
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        # DDP's Reducer (like FSDP's mesh and a DeepSpeed engine) still holds the gloo
        # process group. Freeing it later runs ProcessGroupGloo's destructor on this thread
        # with the GIL held; that destructor joins gloo's worker thread, which may itself be
        # waiting for the GIL to free a finished collective's tensor: a deadlock, seen here
        # about once in 30 two-process runs. So these objects live until the process ends
        # (train.py ends launcher-started processes with os._exit, without finalizers).
        _KEPT_UNTIL_EXIT.extend(keep)
