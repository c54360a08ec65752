"""Privacy tests. The exactness and clipping tests compute on ``DEVICE``, the GPU when torch sees one, so the
per-sample gradients and norms are checked on the device that trains."""

import torch

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
