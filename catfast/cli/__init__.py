"""The `catfast` command. Each subcommand parses options and calls one library function; errors
catfast raises on purpose (CatfastError) print as one line and exit 1, without a traceback.

Nothing heavy is imported at module level or in `main`: torch, diffusers, transformers, peft and onnx
are imported inside the subcommand that uses them (each such import says ``# lazy``), so `catfast --help`,
`catfast adapter info` and `catfast env` start in a fraction of the time a model-loading command needs
(tests/test_install.py and tests/test_cli_fresh.py check it). The commands live in this package's modules,
one per command group; ``base`` holds the group and what they share.
"""

from __future__ import annotations

from catfast.cli import adapter, bank, bench, demo, export, kps, models, personalize, train  # noqa: F401 (each registers its commands)
from catfast.cli.base import DEMO_THREADS, DEMO_TIME, main
from catfast.cli.models import models_init
from catfast.cli.train import merge_overrides, train_command
from catfast.serve.cli import serve

main.add_command(serve)

__all__ = ["DEMO_THREADS", "DEMO_TIME", "main", "merge_overrides", "models_init", "train_command"]
