"""The ceiling: a bare aiohttp server answering a small JSON document, nothing else.

``python -m bench.ceiling PORT`` serves ``GET /`` the way the web process serves its API
(same aiohttp, one process, one event loop, no access log), without any middleware, database,
cache or validation, so its throughput is the most one web process could ever answer.
"""

from __future__ import annotations

import sys

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    """A small JSON answer."""
    return web.json_response({"status": "ok"})


def main() -> None:
    """Serve on 127.0.0.1:PORT until terminated."""
    app = web.Application()
    app.router.add_get("/", hello)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
