"""`vlm serve`: a local web app and JSON API over a trained model."""

from vlm.serve.app import create_app

__all__ = ["create_app"]
