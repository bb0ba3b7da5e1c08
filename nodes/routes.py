"""HTTP routes for LoRA Lab's frontend, registered on ComfyUI's PromptServer (also under /api/...).

    GET /loralab/loras                 {"loras": [{"name", "tag"}]}: every file loaders list, with the
                                       name to write in <lora:…> (see lora/names.py)
    GET /loralab/info?name=NAME        the info panel's JSON (lora/info.py: header only, never tensors)
    GET /loralab/preview?name=NAME     the LoRA's preview sidecar image
    GET /loralab/resolve?tag=T[&tag=…] {T: listed name or null}: what <lora:T:…> refers to
    POST /loralab/resolve {"text": prompt} {"tags": [{start, end, text, name, error}]}: every
                                       <lora:…> tag of a prompt, read and resolved as the prompt node
                                       does (lora/tags.py, lora/names.py); error null when it would load
    GET /loralab/blocks                block-weight layouts and presets per architecture (lora/blocks.py)

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

from ..lora import blocks, info, names, tags
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


def alias_table() -> dict[str, str]:
    """{listed name: alias} from the files' ``ss_output_name`` (headers read once per file version)."""
    return names.aliases({n: p for n in listed() if (p := folder_paths.get_full_path(FOLDER, n))})


def resolve_response(wanted: list[str]) -> dict:
    all_names = listed()
    return {t: names.resolve(t, all_names, alias_table) for t in wanted}


def prompt_tags_response(body) -> dict:
    """Every <lora:…> tag of ``body["text"]`` with its span, the file it loads and what is wrong with it:
    the prompt node's own reading (a malformed tag, an unknown or ambiguous name, a bad lbw=)."""
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str):
        raise RouteError(400, 'expected a JSON body {"text": "<the prompt>"}')
    all_names = listed()
    out = []
    for s in tags.scan(text):
        entry = {"start": s.start, "end": s.end, "text": s.text, "name": None, "error": None}
        if s.error is not None:
            entry["error"] = str(s.error)
        else:
            found = names.find(s.tag.name, all_names, alias_table)
            entry["name"] = found.name
            entry["error"] = found.error()
            if found.name is not None and s.tag.lbw:
                entry["error"] = blocks.problem(s.tag.lbw)
        out.append(entry)
    return {"tags": out}


def blocks_response() -> dict:
    return {"layouts": blocks.catalogue()}


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

    @routes.post("/loralab/resolve")
    async def resolve_prompt(request):
        try:
            body = await request.json()
        except ValueError:
            body = None
        return await answer(prompt_tags_response, body)

    @routes.get("/loralab/blocks")
    async def block_layouts(request):
        return await answer(blocks_response)

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


__all__ = ["RouteError", "alias_table", "blocks_response", "info_response", "loras_response", "lora_path",
           "preview_response", "prompt_tags_response", "register", "register_on_prompt_server", "resolve_response"]
