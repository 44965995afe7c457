"""The OpenAI files and Batch API on the scripted server (tests/fakes/llm_server.py).

``POST /v1/files`` (multipart, purpose=batch), ``GET /v1/files/{id}``,
``GET /v1/files/{id}/content``, ``POST /v1/batches`` (with metadata), ``GET
/v1/batches/{id}``, ``GET /v1/batches`` (newest first), ``POST /v1/batches/{id}/cancel``.

A batch job moves validating -> in_progress -> finalizing -> completed, one state per poll
(and at least ``Script.batch_state_seconds`` in each). Its lines are answered by the same
ScriptedLLM as online calls, when it completes. ``Script.batch_outcomes`` makes the first
jobs expire (every line in the error file as ``batch_expired``) or fail (no files);
``Script.batch_line_errors`` answers the first lines with a 500 in the error file.
``/stats`` counts ``batches_created``, ``batches_cancelled``, ``batch_lines`` and
``files_uploaded``, and the most batch jobs open at once for one instructor (by the
``airoboros_instructor`` metadata): ``peak_open_per_instructor``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

if TYPE_CHECKING:
    from tests.fakes.llm_server import ScriptedLLM

STATES = ("validating", "in_progress", "finalizing")


def _not_found(what: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": f"No such {what}", "type": "invalid_request_error"}},
        status_code=404,
    )


class BatchAPI:
    def __init__(self, llm: ScriptedLLM) -> None:
        self.llm = llm
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        #: per batch: (polls seen, when it entered its state)
        self._progress: dict[str, tuple[int, float]] = {}
        self._created = 0
        self._lines = 0

    # --- files --------------------------------------------------------------------------
    def _file(self, name: str, data: bytes, purpose: str) -> dict[str, Any]:
        fid = "file-" + uuid.uuid4().hex[:24]
        obj = {
            "id": fid,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
        }
        self.files[fid] = obj
        self.contents[fid] = data
        return obj

    # --- batch jobs ---------------------------------------------------------------------
    async def _advance(self, request: Request, batch: dict[str, Any]) -> None:
        bid = batch["id"]
        if batch["status"] not in STATES:
            return
        polls, since = self._progress[bid]
        if time.monotonic() - since < self.llm.script.batch_state_seconds:
            self._progress[bid] = (polls + 1, since)
            return
        now = int(time.time())
        index = STATES.index(batch["status"])
        outcome = batch["_outcome"]
        if batch["status"] == "in_progress" and outcome in ("expired", "failed"):
            await self._finish_badly(batch, outcome, now)
        elif index + 1 < len(STATES):
            batch["status"] = STATES[index + 1]
            batch[f"{STATES[index + 1]}_at"] = now
        else:
            await self._complete(request, batch, now)
        self._progress[bid] = (polls + 1, time.monotonic())

    async def _finish_badly(self, batch: dict[str, Any], outcome: str, now: int) -> None:
        lines = self._input_lines(batch)
        if outcome == "failed":
            batch.update(status="failed", failed_at=now)
            batch["errors"] = {
                "object": "list",
                "data": [{"code": "scripted_failure", "message": "the batch failed"}],
            }
            batch["request_counts"] = {"total": len(lines), "completed": 0, "failed": 0}
            return
        errors = [
            {
                "id": "batch_req_" + uuid.uuid4().hex[:12],
                "custom_id": line["custom_id"],
                "response": None,
                "error": {"code": "batch_expired", "message": "expired before it was run"},
            }
            for line in lines
        ]
        data = "".join(json.dumps(e) + "\n" for e in errors).encode()
        batch["error_file_id"] = self._file(f"{batch['id']}_errors.jsonl", data, "batch_output")[
            "id"
        ]
        batch.update(status="expired", expired_at=now)
        batch["request_counts"] = {"total": len(lines), "completed": 0, "failed": len(lines)}

    def _input_lines(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        raw = self.contents[batch["input_file_id"]].decode()
        return [json.loads(x) for x in raw.splitlines() if x.strip()]

    async def _complete(self, request: Request, batch: dict[str, Any], now: int) -> None:
        outputs, errors = [], []
        for line in self._input_lines(batch):
            self._lines += 1
            self.llm.stats["batch_lines"] += 1
            body = line["body"]
            rid = "batch_req_" + uuid.uuid4().hex[:12]
            if self._lines <= self.llm.script.batch_line_errors:
                errors.append(
                    {
                        "id": rid,
                        "custom_id": line["custom_id"],
                        "response": {
                            "status_code": 500,
                            "request_id": rid,
                            "body": {
                                "error": {"message": "scripted line error", "type": "server_error"}
                            },
                        },
                        "error": None,
                    }
                )
                continue
            chat = line["url"].endswith("/chat/completions")
            if chat:
                messages = list(body.get("messages", []))
                prompt = "\n".join(str(m.get("content", "")) for m in messages)
                answer = await self.llm._complete(
                    request, body, prompt, chat=True, messages=messages
                )
            else:
                prompt = str(body.get("prompt", ""))
                answer = await self.llm._complete(request, body, prompt, chat=False)
            if isinstance(answer, JSONResponse):
                status = answer.status_code
                errors.append(
                    {
                        "id": rid,
                        "custom_id": line["custom_id"],
                        "response": {
                            "status_code": status,
                            "request_id": rid,
                            "body": json.loads(bytes(answer.body)),
                        },
                        "error": None,
                    }
                )
                continue
            outputs.append(
                {
                    "id": rid,
                    "custom_id": line["custom_id"],
                    "response": {"status_code": 200, "request_id": rid, "body": answer},
                    "error": None,
                }
            )
        if outputs:
            data = "".join(json.dumps(o) + "\n" for o in outputs).encode()
            batch["output_file_id"] = self._file(
                f"{batch['id']}_output.jsonl", data, "batch_output"
            )["id"]
        if errors:
            data = "".join(json.dumps(e) + "\n" for e in errors).encode()
            batch["error_file_id"] = self._file(
                f"{batch['id']}_errors.jsonl", data, "batch_output"
            )["id"]
        batch.update(status="completed", completed_at=now)
        batch["request_counts"] = {
            "total": len(outputs) + len(errors),
            "completed": len(outputs),
            "failed": len(errors),
        }

    @staticmethod
    def public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    # --- routes ---------------------------------------------------------------------------
    def mount(self, app: FastAPI) -> None:
        stats = self.llm.stats

        @app.post("/v1/files")
        async def upload(request: Request) -> Any:
            form = await request.form()
            purpose = str(form.get("purpose", ""))
            file = form.get("file")
            if purpose != "batch" or not isinstance(file, UploadFile):
                return JSONResponse(
                    {
                        "error": {
                            "message": "purpose must be batch",
                            "type": "invalid_request_error",
                        }
                    },
                    status_code=400,
                )
            stats["files_uploaded"] += 1
            return self._file(file.filename or "input.jsonl", await file.read(), purpose)

        @app.get("/v1/files/{file_id}")
        async def file_info(file_id: str) -> Any:
            return self.files.get(file_id) or _not_found("file")

        @app.get("/v1/files/{file_id}/content")
        async def file_content(file_id: str) -> Any:
            if file_id not in self.contents:
                return _not_found("file")
            return Response(self.contents[file_id], media_type="application/octet-stream")

        @app.post("/v1/batches")
        async def create(request: Request) -> Any:
            body = await request.json()
            fid = body.get("input_file_id")
            if fid not in self.contents:
                return _not_found("file")
            outcomes = self.llm.script.batch_outcomes
            outcome = outcomes[self._created] if self._created < len(outcomes) else "ok"
            self._created += 1
            stats["batches_created"] += 1
            now = int(time.time())
            bid = "batch_" + uuid.uuid4().hex[:24]
            batch = {
                "id": bid,
                "object": "batch",
                "endpoint": body.get("endpoint", "/v1/chat/completions"),
                "errors": None,
                "input_file_id": fid,
                "completion_window": body.get("completion_window", "24h"),
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": now,
                "expires_at": now + 86_400,
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "metadata": body.get("metadata") or {},
                "_outcome": outcome,
            }
            self.batches[bid] = batch
            self._progress[bid] = (0, time.monotonic())
            # The most batch jobs open at once for one instructor (metadata), as created.
            who = batch["metadata"].get("airoboros_instructor")
            open_now = sum(
                1
                for b in self.batches.values()
                if b["status"] in STATES and b["metadata"].get("airoboros_instructor") == who
            )
            stats["peak_open_per_instructor"] = max(stats["peak_open_per_instructor"], open_now)
            return self.public(batch)

        @app.get("/v1/batches/{batch_id}")
        async def retrieve(request: Request, batch_id: str) -> Any:
            batch = self.batches.get(batch_id)
            if batch is None:
                return _not_found("batch")
            stats["batch_polls"] += 1
            await self._advance(request, batch)
            return self.public(batch)

        @app.get("/v1/batches")
        async def listing(limit: int = 20, after: str | None = None) -> Any:
            newest = list(reversed(self.batches.values()))
            ids = [b["id"] for b in newest]
            start = ids.index(after) + 1 if after in ids else 0
            page = newest[start : start + limit]
            return {
                "object": "list",
                "data": [self.public(b) for b in page],
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": start + limit < len(newest),
            }

        @app.post("/v1/batches/{batch_id}/cancel")
        async def cancel(batch_id: str) -> Any:
            batch = self.batches.get(batch_id)
            if batch is None:
                return _not_found("batch")
            if batch["status"] in STATES:
                stats["batches_cancelled"] += 1
                batch.update(status="cancelled", cancelled_at=int(time.time()))
            return self.public(batch)
