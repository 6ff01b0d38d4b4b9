"""Dynamic upsampling operators as drop-in PyTorch modules (pure PyTorch, chunked over output rows).

``op(features, guide=None)``: low-res decoder ``features`` ``[B, C, h, w]`` (and, for the guided operators, the
high-res encoder ``guide`` ``[B, Cg, s*h, s*w]``) -> ``[B, C, s*h, s*w]``.

- `CARAFE`: kernels predicted from the features alone (Wang et al., ICCV 2019).
- `SAPA`: kernels from the similarity of encoder queries and decoder keys (Lu et al., NeurIPS 2022).
- `FADE`: kernels from encoder and decoder together, gated mix with the encoder (Lu et al., ECCV 2022 / IJCV).
- `DySample`: point sampling at predicted offsets, no kernels and no guide (Liu et al., ICCV 2023).
"""

from featlift.ops.carafe import CARAFE
from featlift.ops.dysample import DySample
from featlift.ops.fade import FADE
from featlift.ops.sapa import SAPA

__all__ = ["CARAFE", "FADE", "SAPA", "DySample"]
