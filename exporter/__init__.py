"""WaRA exporter: adapter artifact + base -> merged weights, folded LoRA, ONNX, TensorRT.

Any base the spec registry resolves (`wara_train.basespec`): `common` finds an adapter's base
and builds it, `merge` writes merged weights (a complete transformers model directory where the
base is one), `lora` a peft LoRA with the transformers model's own module names, `onnx_export`
the ONNX forms, `slots` the slot feeds of the multi-adapter graph, `verify` checks every form
against the PyTorch unmerged model. The math (delta weight, fold, merge) lives in `wara_train`.
"""
