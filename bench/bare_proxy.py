"""The floor for a Python proxy: aiohttp.web on uvloop forwarding bytes over one pooled client.

No parsing, no validation, no metrics, no logging: the request body goes upstream as it came,
and the answer comes back as it came (streamed through when the upstream streams).

    .venv/bin/python bench/bare_proxy.py --port 18101 --upstream http://127.0.0.1:18100
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from aiohttp import ClientSession, TCPConnector, web

# Hop-by-hop and framing headers that aiohttp sets itself on each side.
_DROP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length"})
_CLIENT = web.AppKey("client", ClientSession)


async def forward(request: web.Request) -> web.StreamResponse:
    client = request.app[_CLIENT]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
    body = await request.read()
    async with client.request(request.method, request.rel_url, data=body, headers=headers) as up:
        out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _DROP}
        if up.content_type != "text/event-stream":
            return web.Response(status=up.status, headers=out_headers, body=await up.read())
        response = web.StreamResponse(status=up.status, headers=out_headers)
        await response.prepare(request)
        async for chunk in up.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def serve(host: str, port: int, upstream: str) -> None:
    app = web.Application()
    client = ClientSession(
        base_url=upstream,
        connector=TCPConnector(limit=0, keepalive_timeout=60),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )
    app[_CLIENT] = client
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare proxy on http://{host}:{port} -> {upstream}", flush=True)
    await stop.wait()
    await runner.cleanup()
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18101)
    parser.add_argument("--upstream", default="http://127.0.0.1:18100")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.upstream))


if __name__ == "__main__":
    main()
