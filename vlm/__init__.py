"""vlm: image captioning and visual question answering whose answers can be seen.

    from vlm import load
    model = load("runs/default/model")        # exported model directory or Lightning .ckpt
    model.caption(images)                      # paths or PIL images, batched
    model.ask(images, questions)
    model.attend(image, question=None).save("overlays/")
"""

from vlm.api import Attended, Captioner, load

__all__ = ["Attended", "Captioner", "load"]
__version__ = "0.1.0"
