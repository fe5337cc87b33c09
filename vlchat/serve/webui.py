"""The web UI: a static page (plain HTML, CSS and JavaScript; no build step, nothing fetched from
the internet) served by the same process as the API. The page talks to the server through the
same `/v1/conversations` routes any client can use, so the UI and the API share one serving layer.

Why not Gradio (which MiniGPT-4's demo uses): it pulls a large dependency tree and fonts from the
internet, and a page of our own can stream over the API, stop a generation by closing the
request, and be tested element by element in a real browser.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from vlchat.chat.personas import PERSONAS

STATIC = Path(str(resources.files("vlchat.serve") / "static"))
EXAMPLES = Path(str(resources.files("vlchat") / "examples"))


def add_webui(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/examples", StaticFiles(directory=EXAMPLES), name="examples")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/ui/config", include_in_schema=False)
    def ui_config() -> dict:
        service = app.state.service
        examples = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".png", ".jpg", ".jpeg"))
        return {
            "model": service.model_id,
            "personas": PERSONAS,
            "examples": [{"name": name, "url": f"/examples/{name}"} for name in examples],
            # server-side tools (serve/agent_serving.py): the Tools switch starts on for the default model
            "agent_tools": list(service.config.agent_tools),
            "tools_on": service.model_id == "vlchat-default" and bool(service.config.agent_tools),
        }
