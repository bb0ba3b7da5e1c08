"""A tiny denoiser for training tests (no ComfyUI): a conv stem, two residual blocks with a time
embedding and cross-attention on a text context, a conv head. Linear and 3x3/1x1 convs with and
without bias, so every adapter path (Linear, Conv, OFT's bias handling) is exercised."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CTX = 8        # context width
CH = 16        # channels


class Block(nn.Module):
    def __init__(self, ch: int, ctx: int):
        super().__init__()
        self.norm = nn.GroupNorm(4, ch)
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.emb = nn.Linear(ch, ch)
        self.to_q = nn.Linear(ch, ch, bias=False)
        self.to_k = nn.Linear(ctx, ch, bias=False)
        self.to_v = nn.Linear(ctx, ch, bias=False)
        self.to_out = nn.Linear(ch, ch)
        self.skip = nn.Conv2d(ch, ch, 1)

    def forward(self, x, emb, context):
        h = self.conv(F.silu(self.norm(x))) + self.emb(emb)[:, :, None, None]
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)                       # (B, HW, C)
        q, k, v = self.to_q(tokens), self.to_k(context), self.to_v(context)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v
        h = h + self.to_out(att).transpose(1, 2).reshape(b, c, hh, ww)
        return self.skip(x) + h


class TinyDenoiser(nn.Module):
    def __init__(self, ch: int = CH, ctx: int = CTX):
        super().__init__()
        self.conv_in = nn.Conv2d(4, ch, 3, padding=1)
        self.time = nn.Linear(1, ch)
        self.blocks = nn.ModuleList([Block(ch, ctx), Block(ch, ctx)])
        self.conv_out = nn.Conv2d(ch, 4, 3, padding=1)

    def forward(self, x, t, context):
        emb = F.silu(self.time(t[:, None] / 1000.0))
        h = self.conv_in(x)
        for b in self.blocks:
            h = b(h, emb, context)
        return self.conv_out(h)


def kohya_name(path: str) -> str | None:
    """Train every layer inside the blocks (as kohya trains the UNet's blocks, not stem/head)."""
    return "lora_unet_" + path.replace(".", "_") if path.startswith("blocks.") else None


def make(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyDenoiser().eval()
    model.requires_grad_(False)
    return model


def test_tiny_denoiser_runs():
    m = make()
    out = m(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 500.0]), torch.randn(2, 5, CTX))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


class Rig:
    """Model + dataset + objective for a loop test. Latents: ``n`` samples per size in ``sizes``."""

    def __init__(self, n: int = 4, sizes=((8, 8),), prediction: str = "eps", seed: int = 0, n_conds=None):
        from loralab.training import adapters, loop, objective

        self.model = make(seed)
        self.targets = adapters.find_targets(self.model, kohya_name)
        self.sched = objective.FlowSchedule(shift=3.0) if prediction == "flow" else objective.DiscreteSchedule()
        g = torch.Generator().manual_seed(1234 + seed)
        self.latents = [torch.randn(n, 4, h, w, generator=g) for h, w in sizes]
        total = n * len(sizes)
        self.n_conds = total if n_conds is None else n_conds
        self.ctx = torch.randn(self.n_conds, 5, CTX, generator=g)
        self.prediction = prediction
        self.calls = []
        self._loop = loop

    def dataset(self, process_in=None):
        return self._loop.make_dataset(self.latents, self.n_conds, process_in)

    def objective(self, loss="MSE"):
        from loralab.training.objective import Objective
        return Objective(self.sched, self.prediction, loss)

    def denoise(self, x, sigma, conds):
        self.calls.append((tuple(x.shape), list(conds)))
        return self.model(self.sched.calculate_input(sigma, x), self.sched.timestep(sigma), self.ctx[conds])

    def config(self, **kw):
        base = dict(steps=4, learning_rate=1e-2, rank=4, batch_size=2, training_dtype=torch.float32,
                    lora_dtype=torch.float32, gradient_checkpointing=False)
        base.update(kw)
        return self._loop.TrainConfig(**base)

    LOOP_ARGS = ("te_targets", "te_root", "on_save", "on_sample", "can_encode_text", "world")

    def train(self, resume=None, on_step=None, loss="MSE", denoise=None, **kw):
        extra = {k: kw.pop(k) for k in self.LOOP_ARGS if k in kw}
        return self._loop.train(targets=self.targets, denoise=denoise or self.denoise, objective=self.objective(loss),
                                dataset=self.dataset(), config=self.config(**kw), resume=resume,
                                root=self.model, on_step=on_step, **extra)

    def eval_loss(self, lora=None, algorithm="lora", draws: int = 6) -> float:
        """Mean MSE over fixed (noise, σ) draws for every sample, with ``lora``'s factors applied."""
        from loralab.lora import parse
        from loralab.training import adapters

        hooks = None
        if lora is not None:
            parsed = {prefix: a for prefix, (a,) in parse(dict(lora)).modules.items()}
            built = adapters.create_adapters(self.targets, algorithm, 0, 0, 0, torch.float32, parsed)
            hooks = adapters.Installed(self.targets, built)
        try:
            data, obj, total = self.dataset(), self.objective(), 0.0
            with torch.no_grad():
                for b, bucket in enumerate(data.buckets):
                    for d in range(draws):
                        g = torch.Generator().manual_seed(999 + d)
                        x_t, s, target = obj.draw(bucket, g)
                        total += float(obj.loss(self.denoise(x_t, s, data.conds[b]), target))
            return total / (draws * len(data.buckets))
        finally:
            if hooks:
                hooks.remove()
