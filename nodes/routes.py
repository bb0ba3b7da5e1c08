"""HTTP routes for LoRA Lab's frontend, registered on ComfyUI's PromptServer (also under /api/...).

    GET /loralab/loras                 {"loras": [{"name", "tag"}]}: every file loaders list, with the
                                       name to write in <lora:…> (see lora/names.py)
    GET /loralab/info?name=NAME        the info panel's JSON (lora/info.py: header only, never tensors)
    GET /loralab/preview?name=NAME     the LoRA's preview sidecar image
    GET /loralab/resolve?tag=T[&tag=…] {T: listed name or null}: what <lora:T:…> refers to

NAME is a ``lora_name`` as loaders list it. Names that leave the loras folders (absolute, ``..``)
get 400, missing files 404, unreadable headers 422; every error is ``{"error": message}``.
The handlers are plain functions of the request's query (``*_response``), so they are tested
in-process as well as through a real server.
"""
from __future__ import annotations

import asyncio
import logging
import os
import urllib.parse

import folder_paths

from ..lora import info, names
from ..lora.errors import LoraError
from ..lora.io import relative_parts, resolve_in

log = logging.getLogger("LoRA Lab")
FOLDER = "loras"


class RouteError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def listed() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def lora_path(name: str | None) -> str:
    """The file a ``lora_name`` means, inside the loras folders; RouteError otherwise."""
    if not name:
        raise RouteError(400, "missing ?name= (a lora_name as the loaders list it)")
    try:
        relative_parts(name, "name")
    except LoraError as e:
        raise RouteError(400, str(e)) from None
    if not name.lower().endswith(tuple(folder_paths.supported_pt_extensions)):
        raise RouteError(400, f"{name!r} is not a model file ({', '.join(sorted(folder_paths.supported_pt_extensions))})")
    try:
        return resolve_in(folder_paths.get_folder_paths(FOLDER), name)
    except LoraError as e:
        raise RouteError(404, str(e)) from None


def preview_url(name: str, path: str) -> str:
    return "/loralab/preview?" + urllib.parse.urlencode({"name": name, "v": os.stat(path).st_mtime_ns})


def info_response(name: str | None) -> dict:
    path = lora_path(name)
    try:
        body = info.summarize(path)
    except LoraError as e:
        raise RouteError(422, str(e)) from None
    preview = info.preview_of(path)
    body.update(name=name, preview=preview_url(name, preview[0]) if preview else None)
    return body


def preview_response(name: str | None) -> tuple[str, str]:
    found = info.preview_of(lora_path(name))
    if found is None:
        raise RouteError(404, f"{name!r} has no preview image (NAME{', NAME'.join(info.PREVIEW_SUFFIXES)})")
    return found


def loras_response() -> dict:
    all_names = listed()
    tags = names.tag_names(all_names)
    return {"loras": [{"name": n, "tag": tags[n]} for n in all_names]}


def resolve_response(tags: list[str]) -> dict:
    all_names = listed()
    return {t: names.resolve(t, all_names) for t in tags}


def register(server) -> None:
    from aiohttp import web

    routes = server.routes

    async def answer(fn, *args):
        try:
            return web.json_response(await asyncio.to_thread(fn, *args))
        except RouteError as e:
            return web.json_response({"error": str(e)}, status=e.status)

    @routes.get("/loralab/loras")
    async def loras(request):
        return await answer(loras_response)

    @routes.get("/loralab/info")
    async def lora_info(request):
        return await answer(info_response, request.query.get("name"))

    @routes.get("/loralab/resolve")
    async def resolve(request):
        return await answer(resolve_response, request.query.getall("tag", []))

    @routes.get("/loralab/preview")
    async def preview(request):
        try:
            path, mime = await asyncio.to_thread(preview_response, request.query.get("name"))
        except RouteError as e:
            return web.json_response({"error": str(e)}, status=e.status)
        return web.FileResponse(path, headers={"Content-Type": mime, "Cache-Control": "no-cache"})


def register_on_prompt_server() -> bool:
    """Register on the running PromptServer (once); False when there is none (ComfyUI imported
    without its server, as in-process tests do)."""
    try:
        from server import PromptServer
        server = PromptServer.instance
    except (ImportError, AttributeError):
        return False
    if not getattr(server, "_loralab_routes", False):
        register(server)
        server._loralab_routes = True
    return True


__all__ = ["RouteError", "info_response", "loras_response", "lora_path", "preview_response", "register",
           "register_on_prompt_server", "resolve_response"]
