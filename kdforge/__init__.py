"""kdforge: compress big vision models for small devices.

Teacher training -> knowledge distillation -> INT8 -> ONNX/TensorRT export -> verified deployment,
driven by one TOML recipe. The library is importable without the CLI; `kdforge.cli` is a thin shell.
"""

__version__ = "0.1.0"
