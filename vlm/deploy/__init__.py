"""Deployment: export a model to ONNX (`vlm.deploy.export`) and run it on ONNX Runtime (`vlm.deploy.runtime`)."""
