"""Server-sent events, merged streams and aborting the requests of a client that went away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from sgl_engine.openai_format import finite

DONE = "data: [DONE]\n\n"


class Deltas:
    """New text per stream from cumulative chunk texts (the last chunk carries no delta)."""

    def __init__(self) -> None:
        self.sent: dict[int, str] = {}

    def __call__(self, index: int, text: str) -> str:
        before = self.sent.get(index, "")
        self.sent[index] = text
        return text[len(before) :] if text.startswith(before) else text


def sse(payload: dict) -> str:
    return f"data: {json.dumps(finite(payload), ensure_ascii=False)}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def abort_on_disconnect(
    request: Request, engine: Any, rids: Iterable[str], work: Awaitable[Any]
) -> Any:
    """Await `work`; if the client disconnects first, abort `rids` (freeing their KV) and then
    still await `work`, which finishes with finish_reason 'abort'."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            for rid in rids:
                abort_quietly(engine, rid)
        return await task
    finally:
        watcher.cancel()


async def merge_streams(
    engine: Any, streams: list[AsyncIterator[dict]], rids: list[str]
) -> AsyncIterator[tuple[int, dict]]:
    """Interleave several request streams as (index, chunk). If the consumer stops early (a
    disconnect cancels it), every unfinished request is aborted."""
    if len(streams) == 1:
        try:
            async for chunk in streams[0]:
                yield 0, chunk
        finally:
            await _close(streams[0])
            abort_quietly(engine, rids[0])
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[dict]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
        except Exception as exc:  # handed to the consumer
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await _close(stream)
        for rid in rids:
            abort_quietly(engine, rid)


def abort_quietly(engine: Any, rid: str) -> None:
    """Abort `rid` if it is still known; a finished request or a stopped engine is fine."""
    try:
        engine.abort(rid)
    except RuntimeError:
        pass


async def _close(stream: AsyncIterator[dict]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except (RuntimeError, asyncio.CancelledError):
            pass
