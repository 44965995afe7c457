"""The original's LMoE entry points (``python -m airoboros.lmoe.api``), kept working."""
