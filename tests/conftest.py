import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable
# is read when triton is first imported, so it must be set before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
