"""movq-deploy: a MoVQ image generator from PyTorch training to ONNX Runtime and TensorRT inference.

Importing the runtime needs numpy and pillow only; torch lives in `movq_deploy.models` (training and export).
"""
from movq_deploy.generator import Generator

__all__ = ["Generator"]
__version__ = "0.1.0"
