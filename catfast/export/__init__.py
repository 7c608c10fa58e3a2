"""ONNX export and the ONNX Runtime runner (the only package that imports onnx / onnxruntime).

onnx.py            export_onnx: merged or adapter-input graphs, onnx.checker, ORT parity, manifest.json
adapter_inputs.py  the module transform that turns each LoRA layer's A/B into forward (graph) inputs
runner.py          OnnxPipeline / run_onnx: tokenizer + text encoder + DDIM UNet loop + VAE decoder in ORT
bench.py           bench_onnx: UNet latency in ORT vs PyTorch with the same merged weights
"""
