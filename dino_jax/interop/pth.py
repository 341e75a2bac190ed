"""Read and write PyTorch ``torch.save`` files (official DINO checkpoints) with numpy only:
no torch import, and no code from the file is ever run."""

from dino_jax.interop.pth_limits import PthError, UnsafeCheckpointError
from dino_jax.interop.pth_read import PthFile, load_pth, open_pth
from dino_jax.interop.pth_unpickle import ALLOWED_GLOBALS, Namespace, TensorInfo
from dino_jax.interop.pth_write import save_pth

__all__ = [
    "ALLOWED_GLOBALS",
    "Namespace",
    "PthError",
    "PthFile",
    "TensorInfo",
    "UnsafeCheckpointError",
    "load_pth",
    "open_pth",
    "save_pth",
]
