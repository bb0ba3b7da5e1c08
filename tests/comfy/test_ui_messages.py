"""What the nodes send the frontend (in-process): the Train node's live loss messages and its
end-of-run curve, Save LoRA's saved path and list refresh. The browser tests show them drawn."""
from __future__ import annotations

import math


class FakeServer:
    client_id = "client-1"
    last_prompt_id = "prompt-1"

    def __init__(self):
        self.sent = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


def test_loss_stream_batches_fast_steps_and_always_sends_the_last(pack):
    from loralab.nodes.train import LOSS_EVENT, LossStream

    srv = FakeServer()
    stream = LossStream(srv, "12:5", interval=3600.0)   # nothing is due by time: only the first and last go
    for step in range(1, 11):
        stream.add(step, 10, 1.0 / step)
    events = [d for e, d, sid in srv.sent if e == LOSS_EVENT and sid == "client-1"]
    assert [len(d["points"]) for d in events] == [1, 9]
    points = [p for d in events for p in d["points"]]
    assert points == [[s, 1.0 / s] for s in range(1, 11)]
    assert all(d["node"] == "12:5" and d["prompt_id"] == "prompt-1" and d["total"] == 10 for d in events)

    srv.sent.clear()
    every = LossStream(srv, "3", interval=0.0)
    for step in (1, 2, 3):
        every.add(step, 3, float("nan") if step == 2 else 0.5)
    assert [d["points"] for _, d, _ in srv.sent] == [[[1, 0.5]], [[2, None]], [[3, 0.5]]]   # JSON has no NaN


def test_loss_stream_sends_nothing_without_a_client(pack):
    from loralab.nodes.train import LossStream

    srv = FakeServer()
    srv.client_id = None            # a prompt queued through the API without a client id
    stream = LossStream(srv, "3", interval=0.0)
    stream.add(1, 1, 0.5)
    assert srv.sent == []


def test_loss_curve_keeps_every_step_or_bucket_means(pack):
    from loralab.nodes.train import loss_curve

    small = loss_curve([0.5, float("inf"), 0.25], total=4)
    assert small == {"total": 4, "steps": 3, "points": [[1, 0.5], [2, None], [3, 0.25]]}
    losses = [float(i) for i in range(1000)]
    big = loss_curve(losses, total=1000, max_points=10)
    assert len(big["points"]) == 10 and big["steps"] == 1000
    assert big["points"][0] == [100, sum(range(100)) / 100] and big["points"][-1] == [1000, sum(range(900, 1000)) / 100]
    assert math.isclose(sum(v for _, v in big["points"]) / 10, sum(losses) / 1000)


def test_save_node_shows_the_path_and_asks_for_a_list_refresh(pack, comfy):
    import torch

    node = pack.NODE_CLASS_MAPPINGS["LoraLabSaveLoRA"]()
    lora = {"lora_unet_a.lora_up.weight": torch.zeros(4, 2), "lora_unet_a.lora_down.weight": torch.ones(2, 4),
            "lora_unet_a.alpha": torch.tensor(2.0)}
    out = node.save(lora, "ui_messages", "shown", "")
    name = out["result"][0]
    assert name.startswith("ui_messages/shown_") and out["ui"]["loralab_saved"] == [name]
    saved, where = out["ui"]["text"]
    assert saved == f"saved {name}" and where.startswith("file: ") and where.endswith(name.split("/")[-1])
    assert name in comfy.folder_paths.get_filename_list("loras")
