"""Lean, torch-free runtime: preprocessing spec, model metadata and inference backends.

This is the bottom layer of marsvision: it imports numpy, Pillow, click and (lazily)
onnxruntime / tensorrt, never torch, torchvision or onnx.
"""
