"""ONNX export and the ONNX Runtime runner (the only package that imports onnx / onnxruntime).

onnx.py            export_onnx: merge or attach the adapters, export each component, prove it, write the manifest
graphs.py          the graph modules, example inputs, dynamic axes, the trace, external data
validate.py        ORT against PyTorch with the same weights, per case and shape (TOLERANCE)
manifest.py        manifest.json: build_manifest, read_manifest
adapter_inputs.py  the module transform that turns each LoRA layer's A/B into forward (graph) inputs
runner.py          OnnxPipeline / run_onnx: tokenizer + text encoder + DDIM UNet loop + VAE decoder in ORT
providers.py       the execution providers that start here, sessions, RunnerError
adapter_files.py   adapter names and each adapter's LoRA feed files
dit.py             export_dit_onnx: FLUX.1 / SD3 transformer (merged or LoRA inputs), text encoders, VAE decoder
dit_runner.py      DitOnnxPipeline: tokenizers + text encoders + flow-matching Euler loop (numpy) + VAE decoder
(``catfast bench onnx`` lives in catfast/bench/onnx.py.)
"""
