"""airoboros.router: the OpenAI-compatible front door that picks an expert per request
(embedding kNN over routing samples, or the function expert as an agent) and forwards the
request to an inference backend. ``python -m airoboros.router``; docs/router.md."""
