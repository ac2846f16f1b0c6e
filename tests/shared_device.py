"""Several DDP processes on one device, for tests/test_cuda.py: a machine's one GPU holds two ranks. Gloo, since NCCL
refuses two ranks on one GPU; gloo reduces and gathers CUDA tensors too."""

import torch
from lightning.pytorch.strategies import DDPStrategy


class SharedDeviceDDP(DDPStrategy):
    """DDP of `processes` ranks that all run on `device` (`cuda:0`, or `cpu` to check the test without a GPU)."""

    def __init__(self, device: str = "cuda:0", processes: int = 2) -> None:
        super().__init__(parallel_devices=[torch.device(device)] * processes, process_group_backend="gloo")
