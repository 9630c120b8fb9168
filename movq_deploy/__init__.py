"""movq-deploy: a MoVQ image generator from PyTorch training to ONNX Runtime and TensorRT inference.

Importing the runtime needs numpy and pillow only; torch lives in `movq_deploy.models` (training and export).
"""
__all__ = ["Generator"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import movq_deploy.models` (torch side) does not load the runtime and vice versa.
    if name == "Generator":
        from movq_deploy.generator import Generator

        return Generator
    raise AttributeError(f"module 'movq_deploy' has no attribute {name!r}")
