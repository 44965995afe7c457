"""Culling: near-duplicates and poor rows out of a finished dataset, with an LLM judge.

- ``engine``: rows, the clusters (the plan), the judge, the decisions; no I/O of its own.
- ``ledger``: durable progress, beside an output file or in the object and SQL stores.
- ``files``: culling JSONL files (``airoboros cull-instructions``).
- ``worker``: the topics API's cull step (``POST /v1/jobs/{id}/cull``), a job of its own.
"""
