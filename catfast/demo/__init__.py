"""The embedded demo: a procedural world (world.py), a tiny text-to-image model pretrained on it and
shipped in assets/ (pretrain.py, shipped.py), an attribute encoder for scoring (encoder.py), and
`catfast demo`, plain LoRA against CAT (run.py)."""
