"""Convert a ComfyUI workflow saved from the UI (``nodes`` + ``links``) into the API format
``POST /prompt`` takes (``{node id: {"class_type", "inputs"}}``), using the server's ``/object_info``.

How a UI node's ``widgets_values`` map onto inputs: the values follow the node's widget inputs
(INT, FLOAT, STRING, BOOLEAN, COMBO...) in the order ``/object_info`` lists them (``input_order``,
required then optional). Two kinds of widget carry an extra value the server never sees: a seed
(``control_after_generate``) is followed by its "fixed"/"increment"/"decrement"/"randomize"
choice, and an upload combo (``image_upload`` etc.) by its upload button. A widget input that is
wired to a link takes the link and its stored value is skipped. Frontend-only nodes are resolved:
Reroute passes its input through, PrimitiveNode supplies its value, Note/MarkdownNote are dropped;
muted nodes are left out; bypassed nodes pass their first input of a matching type through.

    python scripts/workflow_api.py "example_workflows/Load a LoRA and sample.json" --url http://127.0.0.1:8188
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request

CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "upload")
SOCKET_ONLY = ("*",)
MODE_MUTED, MODE_BYPASS = 2, 4
DROPPED = ("Note", "MarkdownNote")


class WorkflowError(ValueError):
    """The workflow cannot be converted (unknown node type, missing value, unsupported feature)."""


def _is_widget(spec) -> bool:
    kind = spec[0]
    if isinstance(kind, list):
        return True  # a combo given as its list of choices
    return kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, required) in the order the frontend creates the node's widgets."""
    out = []
    for section, required in (("required", True), ("optional", False)):
        specs = info.get("input", {}).get(section, {}) or {}
        order = (info.get("input_order") or {}).get(section) or list(specs)
        out += [(name, specs[name], required) for name in order if name in specs]
    return out


def _has_control(name: str, spec) -> bool:
    return bool(_opts(spec).get("control_after_generate")) or (spec[0] == "INT" and name in ("seed", "noise_seed"))


class _Graph:
    def __init__(self, workflow: dict):
        if "nodes" not in workflow or "links" not in workflow:
            raise WorkflowError("not a UI workflow (no 'nodes'/'links'); API-format prompts need no conversion")
        if (workflow.get("definitions") or {}).get("subgraphs"):
            raise WorkflowError("workflows with subgraphs are not supported by this converter")
        self.nodes = {int(n["id"]): n for n in workflow["nodes"]}
        self.links = {}
        for link in workflow["links"]:
            if isinstance(link, dict):  # schema 1.0 stores links as objects
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                        link["target_slot"], link.get("type")]
            self.links[int(link[0])] = link

    def source(self, link_id: int, seen=()) -> list | None:
        """[origin node id (str), slot] for a link, looking through Reroute / bypassed nodes;
        a PrimitiveNode's value is returned as ("value", v). None: the link leads nowhere."""
        link = self.links.get(int(link_id))
        if link is None:
            return None
        origin, slot, ltype = int(link[1]), int(link[2]), link[5]
        node = self.nodes.get(origin)
        if node is None or origin in seen:
            return None
        seen = (*seen, origin)
        kind = node.get("type")
        if kind == "Reroute" or node.get("mode") == MODE_BYPASS:
            for inp in node.get("inputs") or []:
                if inp.get("link") is not None and (kind == "Reroute" or inp.get("type") in (ltype, "*")):
                    return self.source(inp["link"], seen)
            return None
        if kind == "PrimitiveNode":
            values = node.get("widgets_values") or []
            if not values:
                raise WorkflowError(f"PrimitiveNode {origin} has no value")
            return ("value", values[0])
        if node.get("mode") == MODE_MUTED:
            return None
        return [str(origin), slot]


def convert(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt for a UI-format ``workflow``. Raises WorkflowError naming the node."""
    g = _Graph(workflow)
    prompt = {}
    for nid, node in sorted(g.nodes.items()):
        kind = node.get("type")
        if kind in DROPPED or kind in ("Reroute", "PrimitiveNode") or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"node {nid}: the server has no node type {kind!r} (is its pack installed?)")
        linked = {}
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None:
                src = g.source(inp["link"])
                if src is not None:
                    linked[inp["name"]] = src
        values = node.get("widgets_values")
        by_name = values if isinstance(values, dict) else None
        seq = list(values) if isinstance(values, list) else []
        inputs = {}
        i = 0
        for name, spec, required in _ordered_inputs(info):
            widget = _is_widget(spec)
            if widget and by_name is None:
                has_value = i < len(seq)
                value = seq[i] if has_value else None
                i += 1 if has_value else 0
                if _has_control(name, spec) and i < len(seq) and (seq[i] in CONTROL_VALUES or isinstance(seq[i], bool)):
                    i += 1
                if any(_opts(spec).get(k) for k in UPLOAD_OPTIONS) and i < len(seq) and not _is_value_of(seq[i], spec):
                    i += 1
            else:
                has_value = by_name is not None and name in by_name
                value = by_name.get(name) if has_value else None
            if name in linked:
                src = linked[name]
                inputs[name] = src[1] if isinstance(src, tuple) else src
            elif widget and has_value:
                inputs[name] = value
            elif required:
                why = "has no value in widgets_values" if widget else "is not connected"
                raise WorkflowError(f"node {nid} ({kind}): required input {name!r} {why}")
        prompt[str(nid)] = {"class_type": kind, "inputs": inputs,
                            "_meta": {"title": node.get("title") or info.get("display_name") or kind}}
    return prompt


def _is_value_of(v, spec) -> bool:
    return isinstance(spec[0], list) and v in spec[0]


def object_info(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=timeout) as r:
        return json.load(r)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help="a workflow .json saved from the ComfyUI UI")
    ap.add_argument("--url", default="http://127.0.0.1:8188", help="the running ComfyUI server")
    args = ap.parse_args(argv)
    with open(args.workflow) as fh:
        wf = json.load(fh)
    json.dump(convert(wf, object_info(args.url)), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
