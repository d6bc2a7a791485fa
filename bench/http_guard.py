"""What the REST connection guard costs per request: the same tiny aiohttp app served plainly
(``web.TCPSite``) and through :func:`rocoin.runtime.api.http_guard.serve_app`, sequential keep-alive
POSTs of a 784-value JSON body from one client in the same process, three rounds.

Run: ``.venv/bin/python bench/http_guard.py [--requests 3000]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
from aiohttp import web

from rocoin.runtime.api.http_guard import serve_app
from rocoin.runtime.api.http_limits import HttpLimits

WARM_UP = 200


async def handler(request: web.Request) -> web.Response:
    return web.json_response({"bytes": len(await request.read())})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/x", handler)
    return app


async def per_request_us(url: str, requests: int) -> float:
    body = json.dumps({"data": list(range(784))}).encode()
    async with aiohttp.ClientSession() as session:
        for i in range(WARM_UP + requests):
            if i == WARM_UP:
                started = time.perf_counter()
            async with session.post(url, data=body) as response:
                await response.read()
    return (time.perf_counter() - started) / requests * 1e6


async def main(requests: int, rounds: int) -> None:
    print(f"{'round':>5} {'plain us/request':>17} {'guarded us/request':>19} {'ratio':>6}")
    for round_ in range(1, rounds + 1):
        runner = web.AppRunner(make_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        plain = await per_request_us(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/x", requests)
        await runner.cleanup()
        guarded_server = await serve_app(make_app(), "127.0.0.1", 0, limits=HttpLimits())
        guarded = await per_request_us(f"http://{guarded_server.address}/x", requests)
        await guarded_server.close()
        print(f"{round_:>5} {plain:>17.0f} {guarded:>19.0f} {guarded / plain:>6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.rounds))
