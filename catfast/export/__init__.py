"""ONNX export and the ONNX Runtime runner (the only package that imports onnx / onnxruntime).

onnx.py            export_onnx: merge or attach the adapters, export each component, prove it, write the manifest
graphs.py          the graph modules, example inputs, dynamic axes, the trace, external data
validate.py        ORT against PyTorch with the same weights, per case and shape (TOLERANCE)
manifest.py        manifest.json: build_manifest, read_manifest
adapter_inputs.py  the module transform that turns each LoRA layer's A/B into forward (graph) inputs
runner.py          OnnxPipeline / run_onnx: tokenizer + text encoder + DDIM UNet loop + VAE decoder in ORT
(``catfast bench onnx`` lives in catfast/bench/onnx.py.)
"""
