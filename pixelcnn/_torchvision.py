"""Import torchvision, also where its compiled ops do not match the installed torch.

PyPI has no CPU build of torchvision: next to a CPU torch its wheel fails at import with
``RuntimeError: operator torchvision::nms does not exist`` because its compiled ops cannot load.
We only use its pure-Python parts (datasets, ``make_grid``), so in exactly that case we define the
two op schemas its import-time registrations expect and import again. Where torchvision imports
cleanly (matching CUDA builds on a GPU cluster) nothing is touched.
"""

from __future__ import annotations

import sys

import torch

_schemas: list[torch.library.Library] = []  # keep the Library alive, or its definitions vanish


def import_torchvision():
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _schemas.append(lib)
        import torchvision
    return torchvision
