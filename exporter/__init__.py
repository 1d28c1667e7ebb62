"""WaRA exporter: adapter artifact + base model -> merged weights, folded LoRA, ONNX, TensorRT.

The export commands arrive with issue 3; the math they use (delta weight, fold) already lives in
`wara_train.delta`, so the exporter only packages it.
"""
