"""`distill serve`'s page at `/`: a person picks a served model, chats with it over several
turns and, with --teacher, sees the prompted teacher answer the same turns beside it.

The page (promptdistill/page/: HTML, script, styles; no build step, nothing fetched from
elsewhere) talks to the server through the same OpenAI API as any client, with the same
bearer token: it loads without one, and asks for it when /v1 answers 401. The teacher is
served with the messages as given, so the page sends the run's system prompt itself; it
reads that prompt from GET /page/system_prompts, which needs the token like /v1 does.
"""

from __future__ import annotations

from importlib import resources
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .serve_openai import ApiError

# The only files served, with their types: a request can never name another path.
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
              "page.css": "text/css; charset=utf-8"}


def page_file(name: str) -> bytes:
    return resources.files("promptdistill").joinpath("page", name).read_bytes()


def add_page(app: FastAPI, system_prompts: dict[str, str], authorize: Callable[[Request], None]) -> None:
    """Serve the page at `/` and its files at /page/<file>. `system_prompts`: the system prompt
    the page sends to each served model that is answered WITH one (the teacher), by name."""

    def serve_file(name: str) -> Response:
        # no-cache: a server restarted on a newer install serves its own page, not a cached one
        return Response(page_file(name), media_type=PAGE_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def index():
        return serve_file("index.html")

    @app.get("/page/system_prompts")
    async def prompts(request: Request):
        authorize(request)
        return system_prompts

    @app.get("/page/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in PAGE_FILES:
            raise ApiError(404, f"no such file: /page/{name}; the page is at /")
        return serve_file(name)
