"""vlm: image captioning and visual question answering whose answers can be seen.

    from vlm import load
    model = load("runs/default/model")        # exported model directory or Lightning .ckpt
    model.caption(images)                      # paths or PIL images, batched
    model.ask(images, questions)
    model.attend(image, question=None).save("overlays/")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlm.api import Attended, Captioner, load

__all__ = ["Attended", "Captioner", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The API, imported on first use: `vlm.config`, `vlm --help` and the like do not import torch."""
    if name in __all__:
        from vlm import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
