"""Lightning's precision names for drawing and training, and the autocast each asks for."""

from contextlib import AbstractContextManager
from typing import Literal

import torch

Precision = Literal["32-true", "bf16-mixed"]
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast for Lightning's mixed precisions ("bf16-mixed", "16-mixed"); nothing for the others ("32-true")."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(torch.device(device).type, dtype, enabled=dtype is not None)
