"""airoboros: self-instruct datasets, LoRA experts, and an expert router.

The shared library: settings, message contracts, ports and their adapters, the LLM
client, the CLI and the in-process composition. Services live in ``airoboros.<svc>``.
"""

__version__ = "3.0.0.dev0"
