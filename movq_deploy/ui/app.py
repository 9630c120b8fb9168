"""Serving the page: on its own server over a local Generator (`movq-deploy ui`), or mounted on a FastAPI app."""
from __future__ import annotations

import os
from typing import Optional

import gradio as gr

from movq_deploy.ui.page import THEME, build_page
from movq_deploy.ui.service import LocalService, PageService


def local_page(engine_dir: "str | os.PathLike[str]", backend: str = "auto", precision: str = "auto",
               batch_size: Optional[int] = None) -> gr.Blocks:
    """The page over a Generator of engine_dir, in this process."""
    from movq_deploy.generator import Generator

    return build_page(LocalService(Generator(engine_dir, backend=backend, precision=precision, batch_size=batch_size)))


def launch(blocks: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           api_key: Optional[str] = None) -> str:
    """Serves the page at http://host:port/ and returns its address; block=False returns once it is up. With an
    api_key, gradio's login page asks for it (any user name, the key as the password)."""
    from movq_deploy.serving.auth import password_check

    blocks.queue(default_concurrency_limit=1)  # one model call at a time: the backend's threads are the parallelism
    blocks.launch(server_name=host, server_port=port, theme=THEME, ssr_mode=False, show_error=False,
                  prevent_thread_lock=not block, quiet=not block,
                  auth=None if api_key is None else password_check(api_key))
    return blocks.local_url


def mount(app, service: PageService, path: str = "/ui", concurrency: Optional[int] = None):
    """Mounts the page over `service` on a FastAPI app at `path` (e.g. the Ray Serve ingress); returns the app.

    concurrency: page requests served at once (None: no limit of the page's own; the service bounds its queue).
    """
    blocks = build_page(service)
    blocks.queue(default_concurrency_limit=concurrency)
    return gr.mount_gradio_app(app, blocks, path=path, theme=THEME, ssr_mode=False, show_error=False)
