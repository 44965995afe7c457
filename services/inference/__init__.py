"""airoboros.inference: one base model and many LoRA experts behind the OpenAI API.

``python -m airoboros.inference`` serves it; ``create_app`` (airoboros.inference.app) is
the composition root; ``LocalEngine`` (engine.py) is the continuous-batching scheduler and
``TGIBackend`` (tgi.py) fronts a text-generation-inference server instead.
"""
