"""An OpenAI-compatible chat server for any stage's checkpoint, and the web chat page.

    POST /v1/chat/completions   messages, stream, temperature, top_p, max_tokens, stop, logprobs, top_logprobs,
                                logit_bias, seed
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", "active_generations": n, "tokens_generated": total}
    GET  /                      the web chat (server/web/index.html)

One model, one generation at a time (a lock: a CPU has no room for two). Replies stop at
<|im_end|>, at `max_tokens` or at a `stop` string. `logprobs` are the model's own distribution
(before temperature and top-p), as OpenAI reports them. A streaming client that disconnects
cancels its generation at the next token. Bad requests are a 4xx with the field that is wrong
(pydantic's validation), never a 500.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from trainer.lib.generation import Sampling, StreamedToken, prompt_ids, stream_tokens

WEB_PAGE = Path(__file__).parent / "web" / "index.html"


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    logit_bias: dict[int, float] | None = None
    seed: int | None = None


class Reply:
    """The tokens of one reply as they come, cut at the first stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.text, self.finish, self.count = stops, "", "length", 0  # count: tokens generated

    def add(self, piece: str) -> str:
        """The part of `piece` to emit ("" past a stop string); sets finish = "stop" at one."""
        before = len(self.text)
        self.text += piece
        for s in self.stops:
            if s and (i := self.text.find(s)) >= 0:
                self.text, self.finish = self.text[:i], "stop"
        return self.text[before:]


def limit(req: ChatRequest) -> int:
    return req.max_completion_tokens or req.max_tokens or 256


def token_logprob(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def create_app(model, tokenizer, model_name: str) -> FastAPI:
    app = FastAPI(title="minimind-course chat server")
    lock = threading.Lock()
    active = {"n": 0, "tokens": 0}
    eos_text = tokenizer.decode([tokenizer.eos_token_id])

    def tokens(req: ChatRequest, cancel: threading.Event) -> Iterator[StreamedToken]:
        if req.seed is not None:
            import torch

            torch.manual_seed(req.seed)
        sampling = Sampling(temperature=req.temperature, top_p=req.top_p)
        messages = [m.model_dump() for m in req.messages]
        with lock:
            active["n"] += 1
            try:
                for t in stream_tokens(model, tokenizer, messages, limit(req), sampling, cancel=cancel,
                                       top_logprobs=max(req.top_logprobs, 1) if req.logprobs else 0,
                                       logit_bias=req.logit_bias):
                    active["tokens"] += 1
                    yield t
            finally:
                active["n"] -= 1

    def logprob_entry(req: ChatRequest, t: StreamedToken) -> dict:
        entry = token_logprob(tokenizer, t.token_id, t.logprob)
        entry["top_logprobs"] = [token_logprob(tokenizer, i, lp) for i, lp in t.top[: req.top_logprobs]]
        return entry

    def answer(req: ChatRequest, stops: list[str], cancel: threading.Event,
               emit: Callable[[str, list | None], None]) -> Reply:
        """Generate one reply, handing each token's new text (and its logprobs entry, when asked) to
        `emit`; the Reply says why it ended: "stop" (a stop string or <|im_end|>) or "length"."""
        reply = Reply(stops)
        for t in tokens(req, cancel):
            reply.count += 1
            emit(reply.add(t.text), [logprob_entry(req, t)] if req.logprobs else None)
            if reply.finish == "stop":
                return reply
        reply.finish = "length" if reply.count >= limit(req) else "stop"  # else <|im_end|> ended it
        return reply

    def check(req: ChatRequest) -> list[str]:
        if req.top_logprobs and not req.logprobs:
            raise HTTPException(400, "top_logprobs needs logprobs: true")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise HTTPException(400, "stop: at most 4 sequences")
        bad = [t for t in (req.logit_bias or {}) if not 0 <= t < len(tokenizer)]
        if bad:
            raise HTTPException(400, f"logit_bias: token ids {bad} are outside the vocabulary (0-{len(tokenizer) - 1})")
        return [s for s in stops if s != eos_text]  # <|im_end|> always stops

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.detail, "type": "invalid_request_error"}}, status_code=exc.status_code)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "active_generations": active["n"], "tokens_generated": active["tokens"]}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "you"}]}

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(WEB_PAGE)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        stops = check(req)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        prompt_tokens = len(prompt_ids(tokenizer, [m.model_dump() for m in req.messages]))
        if not req.stream:
            content: list[dict] = []
            reply = await asyncio.to_thread(answer, req, stops, threading.Event(),
                                            lambda piece, lp: content.extend(lp or []))
            choice = {"index": 0, "message": {"role": "assistant", "content": reply.text},
                      "finish_reason": reply.finish, "logprobs": {"content": content} if req.logprobs else None}
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [choice], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": reply.count,
                                                   "total_tokens": prompt_tokens + reply.count}}

        cancel = threading.Event()

        def chunk(delta: dict, finish: str | None = None, logprobs: list | None = None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                 "logprobs": {"content": logprobs} if logprobs is not None else None}]}
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def emit(piece: str, lp: list | None) -> None:
                if piece or lp:
                    loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece, lp))

            def produce() -> None:
                try:
                    reply = answer(req, stops, cancel, emit)
                    loop.call_soon_threadsafe(queue.put_nowait, ("end", reply.finish, None))
                except Exception as e:  # reported to the client in the stream
                    loop.call_soon_threadsafe(queue.put_nowait, ("error", str(e), None))

            worker = loop.run_in_executor(None, produce)
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value, lp = await queue.get()
                    if kind == "piece":
                        yield chunk({"content": value}, logprobs=lp)
                    elif kind == "end":
                        yield chunk({}, finish=value)
                        yield "data: [DONE]\n\n"
                        break
                    else:
                        yield f"data: {json.dumps({'error': {'message': value}})}\n\n"
                        break
            finally:
                cancel.set()  # a client that left (or a finished reply) frees the model at the next token
                await worker

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
