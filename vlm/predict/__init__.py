"""`vlm predict`: caption and question a whole collection on Lightning's predict loop, on any number of processes,
resumable, each image exactly once, each word with its log-probability and (``maps``) where it looked.

    from vlm.predict import predict, read_outputs
    summary = predict("runs/default/model", "photos/", "captions/", questions=["what color is it ?"], maps=True)
    records = read_outputs("captions/")

`vlm.predict.inputs` (sources, chunks, the reader stream), `vlm.predict.module` (the model step),
`vlm.predict.summary` (top patches, phrases and boxes), `vlm.predict.outputs` (files, manifest, resumption).
"""

from vlm.predict.outputs import read_outputs
from vlm.predict.run import predict

__all__ = ["predict", "read_outputs"]
