"""A FastAPI app with the Produl ASGI middleware (served by uvicorn in the tests)."""

import asyncio
import json
import os

from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask

from produl_server.integrations import ContextualProdul
from produl_server.integrations.asgi import ProdulMiddleware

# server_key and api_url come from PRODUL_SERVER_KEY / PRODUL_API_URL; the
# tests tune the rest through DEMO_PRODUL_OPTIONS.
produl = ContextualProdul(**json.loads(os.environ.get("DEMO_PRODUL_OPTIONS", "{}")))


def customer(scope):
    """The visitor: here a header set by an upstream auth proxy."""
    for name, value in scope["headers"]:
        if name == b"x-customer":
            return value.decode()
    return None


app = FastAPI()
app.add_middleware(
    ProdulMiddleware,
    client=produl,
    pageviews=True,
    exclude_paths=[r"/healthz$"],
    visitor_id=customer,
)


@app.get("/items/{number}", response_class=HTMLResponse)
async def item(number: int):
    # path, url and visitor_id are filled in from the request.
    produl.track_event("item_viewed", {"number": number, "pid": os.getpid()})
    return f"<h1>Item {number}</h1>"


@app.get("/sync/{number}", response_class=HTMLResponse)
def sync_item(number: int):
    # A sync endpoint runs in a thread; the context goes with it.
    produl.track_event("item_viewed", {"number": number, "pid": os.getpid(), "sync": True})
    return f"<h1>Item {number}</h1>"


@app.get("/later/{number}")
async def later(number: int):
    # Runs after the response has been sent, still with the request's context.
    task = BackgroundTask(produl.track_event, "background_done", {"number": number})
    return PlainTextResponse("accepted", background=task)


# The streaming test: chunk 2 is sent only once the client says it got chunk 1.
got_first_chunk = asyncio.Event()


@app.get("/stream")
async def stream():
    got_first_chunk.clear()

    async def chunks():
        yield b"chunk 1\n"
        await asyncio.wait_for(got_first_chunk.wait(), 30)
        produl.track_event("streamed")
        yield b"chunk 2\n"

    return StreamingResponse(chunks(), media_type="text/html")


@app.post("/stream/ack")
async def stream_ack():
    got_first_chunk.set()
    return PlainTextResponse("ok")


@app.websocket("/ws")
async def echo(websocket: WebSocket):
    await websocket.accept()
    while True:
        text = await websocket.receive_text()
        if text == "bye":
            await websocket.close()
            return
        await websocket.send_text(f"echo {text}")


@app.get("/healthz", response_class=PlainTextResponse)
async def healthz():
    return "ok"
