"""Export stage: checkpoint -> ONNX FP32/FP16/INT8 (explicit Q/DQ) and TensorRT engines."""
