"""kohya's recipe in the loop (no ComfyUI): LR schedules against diffusers' get_scheduler and the
closed forms, min-SNR-γ against kohya's formula, noise offset, EMA against diffusers' EMAModel,
a text-encoder LoRA with its own learning rate, per-step captions, save-every-N files that resume
exactly, metadata, and bad recipe values."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn

from loralab.lora.io import read
from loralab.training import captions, ema, loop, metadata, objective, recipe, resume, save, schedule
from loralab.training.errors import TrainingError
from support.siblings import sibling
from tolerances import rel_err


model_mod = sibling(__file__, "test_training_model")
Rig = model_mod.Rig


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- learning-rate schedules ------------------------------------------------------------------------
def closed_form(name: str, s: int, w: int, t: int, n: int = 1) -> float:
    """diffusers' schedule lambdas, written out from their definitions."""
    if name == "constant":
        return 1.0
    if s < w:
        return s / max(1, w)
    if name == "constant_with_warmup":
        return 1.0
    p = (s - w) / max(1, t - w)
    if name == "linear":
        return max(0.0, (t - s) / max(1, t - w))
    if name == "cosine":
        return max(0.0, 0.5 * (1 + math.cos(math.pi * 2 * 0.5 * p)))
    return 0.0 if p >= 1 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((n * p) % 1.0))))


@pytest.mark.parametrize("name,warmup,cycles", [("constant", 0, 1), ("constant_with_warmup", 5, 1), ("linear", 0, 1),
                                                ("linear", 7, 1), ("cosine", 0, 1), ("cosine", 10, 1),
                                                ("cosine_with_restarts", 4, 3), ("cosine_with_restarts", 0, 2)])
def test_schedule_matches_diffusers_get_scheduler_and_the_closed_form(name, warmup, cycles):
    """kohya takes its schedulers from diffusers' get_scheduler: step the real one and compare."""
    from diffusers.optimization import get_scheduler

    total = 40
    sched = schedule.Schedule(name, warmup, cycles)
    sched.check()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    kw = {} if name == "constant" else {"num_warmup_steps": warmup}
    if name not in ("constant", "constant_with_warmup"):
        kw["num_training_steps"] = total
    if name == "cosine_with_restarts":
        kw["num_cycles"] = cycles
    ref = get_scheduler(name, opt, **kw)
    for s in range(total):
        lr = opt.param_groups[0]["lr"]
        assert sched.factor(s, total) == pytest.approx(lr, abs=1e-12), (s, name)
        assert sched.factor(s, total) == pytest.approx(closed_form(name, s, warmup, total, cycles), abs=1e-12)
        opt.step()
        ref.step()
    if name != "constant" and warmup:
        assert sched.factor(0, total) == 0.0, "warm-up starts at lr 0, as kohya's"


def test_the_loop_trains_each_step_at_the_scheduled_rate():
    seen = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    loop.OPTIMIZERS["Spy"] = Spy
    try:
        Rig().train(steps=6, optimizer="Spy", learning_rate=0.1, lr_scheduler="cosine", lr_warmup_steps=2)
    finally:
        del loop.OPTIMIZERS["Spy"]
    assert seen == pytest.approx([0.1 * closed_form("cosine", s, 2, 6) for s in range(6)], abs=1e-12)


def test_default_recipe_changes_nothing():
    """Every option at its default gives the LoRA of a run without the recipe, bit for bit."""
    plain = Rig().train(steps=3)
    spelled = Rig().train(steps=3, lr_scheduler="constant", lr_warmup_steps=0, text_encoder_lr=0.0, ema_decay=0.0,
                          save_every_n_steps=0, sample_every_n_steps=0)
    assert same(plain.lora, spelled.lora)
    assert plain.lora.online_weights is None


# ---- min-SNR-γ -------------------------------------------------------------------------------------
def kohya_all_snr() -> torch.Tensor:
    """kohya's prepare_scheduler_for_custom_training on SD's DDPM schedule (diffusers' scheduler)."""
    from diffusers import DDPMScheduler

    s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    ac = s.alphas_cumprod.double()
    return (ac.sqrt() / (1 - ac).sqrt()) ** 2


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_weight_is_kohyas_apply_snr_weight(prediction, gamma):
    all_snr = kohya_all_snr()
    t = torch.tensor([0, 1, 50, 200, 500, 800, 999])
    snr = all_snr[t]
    ref = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1 if prediction == "v" else snr)
    sigma = objective.DiscreteSchedule().sigmas[t]           # the model's own σ
    ours = objective.min_snr_weight(prediction, sigma, gamma)
    assert rel_err(ours, ref) < 1e-5


def test_min_snr_for_flow_downweights_only_low_noise_steps():
    sigma = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.1, 0.01])
    w = objective.min_snr_weight("flow", sigma, 5.0)
    snr = ((1 - sigma.double()) / sigma.double()) ** 2
    assert torch.allclose(w.double(), torch.where(snr > 5, 5 / snr, torch.ones_like(snr)), atol=1e-7)
    assert w[0] == 1.0 and w[-1] < 0.01


def test_batch_loss_weights_each_sample():
    obj = objective.Objective(objective.DiscreteSchedule(), "eps", min_snr_gamma=5.0)
    pred, tgt = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = objective.DiscreteSchedule().sigmas[torch.tensor([10, 500, 990])]
    per = ((pred - tgt) ** 2).flatten(1).mean(1)
    expect = (per * objective.min_snr_weight("eps", sigma, 5.0)).mean()
    assert torch.allclose(obj.batch_loss(pred, tgt, sigma), expect)
    plain = objective.Objective(objective.DiscreteSchedule(), "eps")
    assert torch.equal(plain.batch_loss(pred, tgt, sigma), nn.functional.mse_loss(pred, tgt))


# ---- noise offset -------------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [0.0, 0.5])
def test_noise_offset_is_kohyas_apply_noise_offset(adaptive):
    sched = objective.DiscreteSchedule()
    x0 = torch.randn(3, 4, 5, 5) + 0.7
    plain = objective.Objective(sched, "eps")
    offset = objective.Objective(sched, "eps", noise_offset=0.1, adaptive_noise_scale=adaptive)
    x_a, s_a, eps_a = plain.draw(x0, torch.Generator().manual_seed(3))
    x_b, s_b, eps_b = offset.draw(x0, torch.Generator().manual_seed(3))
    assert torch.equal(s_a, s_b)
    g = torch.Generator().manual_seed(3)      # replay: σ indices, ε, then the offset draw
    torch.randint(0, sched.sigmas.numel(), (3,), generator=g)
    torch.randn(x0.shape, generator=g)
    n = torch.randn((3, 4, 1, 1), generator=g)
    o = 0.1 if not adaptive else torch.clamp(0.1 + adaptive * x0.mean(dim=(2, 3), keepdim=True).abs(), min=0)
    assert torch.allclose(eps_b, eps_a + o * n, atol=1e-6)                  # the target (ε) carries the offset
    assert torch.allclose(x_b, x0 + eps_b * s_b.reshape(-1, 1, 1, 1), atol=1e-5)


# ---- EMA ------------------------------------------------------------------------------------------------
def test_ema_update_matches_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    p = nn.Parameter(torch.randn(6, 3))
    ref = EMAModel([p], decay=0.9)
    ours = ema.EMA({"p": p}, 0.9)
    g = torch.Generator().manual_seed(0)
    for t in range(1, 40):
        with torch.no_grad():
            p.add_(torch.randn(p.shape, generator=g))
        ref.step([p])
        ours.update({"p": p}, t)
        assert torch.allclose(ours.shadow["p"], ref.shadow_params[0], atol=1e-6), t
    assert ema.decay_at(0.9, 1) == 0.0 and ema.decay_at(0.9, 1000) == 0.9


def test_ema_run_returns_the_average_and_carries_the_live_factors():
    r = Rig().train(steps=4, ema_decay=0.5)
    live = Rig().train(steps=4)
    assert r.lora.online_weights is not None and same(dict(r.lora.online_weights), dict(live.lora))
    assert not same(dict(r.lora), dict(live.lora)), "the returned LoRA is the EMA, not the live factors"
    assert r.lora.info["ema_decay"] == 0.5


# ---- save every N steps, resume -------------------------------------------------------------------------
@pytest.mark.parametrize("ema_decay", [0.0, 0.8])
def test_save_every_n_files_resume_exactly(tmp_path, ema_decay):
    """6 steps with a cosine schedule, saving every 2: each file loads; continuing the step-2 file for
    4 steps gives the straight run's LoRA bit for bit (schedule, optimizer state and EMA restored)."""
    kw = dict(lr_scheduler="cosine", lr_warmup_steps=1, ema_decay=ema_decay, optimizer="AdamW", seed=4)
    saved = []

    def on_save(result):
        saved.append(save.save(result.lora, str(tmp_path), filename_prefix=f"ck_step{result.steps:06d}")[0])

    rig = Rig()
    straight = rig.train(steps=6, save_every_n_steps=2, on_save=on_save, **kw)
    assert [p.rsplit("_step", 1)[1][:6] for p in saved] == ["000002", "000004", "000006"]
    assert same(dict(read(saved[-1]).tensors), {k: v.cpu() for k, v in straight.lora.items()})
    f = read(saved[0])
    assert f.metadata["ss_steps"] == "2" and f.metadata["ss_max_train_steps"] == "6"
    res = resume.load(f, rig.targets, "lora", None)
    assert res.steps == 2 and res.optimizer_state and (res.ema is not None) == bool(ema_decay)
    cont = rig.train(steps=4, resume=res, **kw)
    assert cont.steps == 6 and same(dict(cont.lora), dict(straight.lora))
    assert cont.losses == straight.losses[2:]


def test_save_callback_never_overwrites(tmp_path):
    lora = Rig().train(steps=1).lora
    a = save.save(lora, str(tmp_path), filename_prefix="x_step000001")[0]
    b = save.save(lora, str(tmp_path), filename_prefix="x_step000001")[0]
    assert a != b and sorted(p.name for p in tmp_path.iterdir()) == ["x_step000001_00001.safetensors",
                                                                     "x_step000001_00002.safetensors"]


def test_sample_callback_runs_every_n_steps_with_the_ema_in_place():
    rig = Rig()
    calls = []

    def on_sample(step):
        assert not torch.is_grad_enabled()
        calls.append(step)

    rig.train(steps=5, sample_every_n_steps=2, on_sample=on_sample)
    assert calls == [2, 4]


# ---- text encoder and captions -----------------------------------------------------------------------
class TinyTextEncoder(nn.Module):
    """Characters -> embeddings -> an MLP block (Linear layers named as CLIP's are)."""

    def __init__(self, ctx: int = model_mod.CTX):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.embed = nn.Parameter(torch.randn(64, ctx, generator=g), requires_grad=False)
        self.layers = nn.ModuleList([nn.ModuleDict({"fc1": nn.Linear(ctx, 16), "fc2": nn.Linear(16, ctx)})])
        self.requires_grad_(False)

    def forward(self, text: str) -> torch.Tensor:
        ids = torch.tensor([ord(c) % 64 for c in (text + "     ")[:5]])
        h = self.embed[ids]
        for layer in self.layers:
            h = h + layer["fc2"](torch.relu(layer["fc1"](h)))
        return h


class TextRig(Rig):
    """Rig whose conditioning comes from captions through a tiny text encoder."""

    def __init__(self, texts, options=captions.CaptionOptions(), **kw):
        super().__init__(n=len(texts), **kw)
        self.te = TinyTextEncoder()
        self.te_targets = {"lora_te_" + n.replace(".", "_"): m for n, m in self.te.named_modules()
                           if isinstance(m, nn.Linear)}
        self.captions = [(t, options) for t in texts]
        self.seen = []

    def dataset(self, process_in=None):
        return self._loop.make_dataset(self.latents, self.n_conds, process_in, self.captions)

    def denoise(self, x, sigma, conds):
        if conds and isinstance(conds[0], recipe.StepCaption):
            assert all(self.captions[c.index][0].split(", ")[0] == c.text.split(", ")[0] or not c.text for c in conds)
            conds = [c.text for c in conds]
            self.seen.append(list(conds))
            ctx = torch.stack([self.te(t) for t in conds])
        else:
            ctx = self.ctx[conds]
        self.calls.append((tuple(x.shape), list(conds)))
        return self.model(self.sched.calculate_input(sigma, x), self.sched.timestep(sigma), ctx)

    def train(self, **kw):
        return super().train(te_targets=self.te_targets, te_root=self.te, can_encode_text=True, **kw)


def test_text_encoder_lora_trains_with_its_own_learning_rate():
    rig = TextRig(["sks dog", "a photo of sks"])
    r = rig.train(steps=3, text_encoder_lr=1e-2, learning_rate=1e-3)
    te_keys = [k for k in r.lora if k.startswith("lora_te_")]
    assert te_keys and any(k.startswith("lora_unet_") for k in r.lora)
    assert any(r.lora[k].abs().sum() > 0 for k in te_keys if k.endswith("lora_up.weight")), "the TE LoRA learned"
    assert r.lora.info["train_text_encoder"] and r.lora.info["text_encoder_lr"] == 1e-2
    assert rig.seen and all(t in ("sks dog", "a photo of sks") for batch in rig.seen for t in batch)
    assert all(not p.requires_grad for p in rig.te.parameters()), "the text encoder is frozen again"
    m = metadata.build(r.lora.info, output_name="x")
    assert m["ss_network_train_unet_only"] == "False" and m["ss_text_encoder_lr"] == "0.01"

    frozen = TextRig(["sks dog", "a photo of sks"]).train(steps=3, text_encoder_lr=0.0)
    assert not any(k.startswith("lora_te_") for k in frozen.lora), "text_encoder_lr 0: no text-encoder LoRA"


def test_optimizer_groups_get_the_two_learning_rates():
    rig = TextRig(["a", "b"])
    lrs = []

    class Spy(torch.optim.AdamW):
        def step(self, closure=None):
            lrs.append([g["lr"] for g in self.param_groups])
            return super().step(closure)

    loop.OPTIMIZERS["Spy"] = Spy
    try:
        rig.train(steps=4, optimizer="Spy", learning_rate=1e-3, text_encoder_lr=5e-5, lr_scheduler="linear")
    finally:
        del loop.OPTIMIZERS["Spy"]
    for s, (unet, te) in enumerate(lrs):
        f = closed_form("linear", s, 0, 4)
        assert unet == pytest.approx(1e-3 * f) and te == pytest.approx(5e-5 * f)


def test_caption_variants_per_step_are_seeded():
    opts = captions.CaptionOptions(shuffle=True, keep_tokens=1)
    texts = ["sks, red, hat, tall, smiling", "sks, blue, coat, short, grim"]
    a, b, c = TextRig(texts, opts), TextRig(texts, opts), TextRig(texts, opts)
    a.train(steps=4)
    b.train(steps=4)
    c.train(steps=4, seed=9)
    assert a.seen == b.seen and a.seen != c.seen
    assert all(t.startswith("sks, ") for batch in a.seen for t in batch), "keep_tokens keeps the trigger first"
    assert len({t for batch in a.seen for t in batch}) > 2, "the order changes between steps"


def test_varying_captions_without_a_text_encoder_are_used_as_written():
    rig = TextRig(["a, b, c", "d, e"], captions.CaptionOptions(shuffle=True))
    r = Rig.train(rig, steps=1, can_encode_text=False)
    assert any("trained with the captions as written" in n for n in r.notes)
    assert all(isinstance(c, int) for _, conds in rig.calls for c in conds)


def test_text_encoder_training_needs_captions():
    rig = TextRig(["a", "b"])
    rig.captions = None
    with pytest.raises(TrainingError, match="needs the captions"):
        rig.train(steps=1, text_encoder_lr=1e-4)


# ---- caption processing (kohya's process_caption) ---------------------------------------------------------
def test_process_caption_follows_kohya():
    cap = "sks, red hat , tall,smiling"
    plain = captions.CaptionOptions()
    assert captions.process(cap, plain, random.Random(0)) == cap, "no option: the caption as written"
    drop = captions.CaptionOptions(dropout_rate=1.0, shuffle=True)
    assert captions.process(cap, drop, random.Random(0)) == ""
    keep = captions.CaptionOptions(shuffle=True, keep_tokens=2)
    outs = {captions.process(cap, keep, random.Random(s)) for s in range(30)}
    assert all(o.startswith("sks, red hat, ") for o in outs) and len(outs) > 1
    assert all(sorted(o.split(", ")) == sorted(["sks", "red hat", "tall", "smiling"]) for o in outs)
    tagdrop = captions.CaptionOptions(tag_dropout_rate=1.0, keep_tokens=1)
    assert captions.process(cap, tagdrop, random.Random(0)) == "sks"
    rng_a, rng_b = random.Random(5), random.Random(5)
    opts = captions.CaptionOptions(shuffle=True, dropout_rate=0.3, tag_dropout_rate=0.2)
    assert [captions.process(cap, opts, rng_a) for _ in range(20)] == [captions.process(cap, opts, rng_b) for _ in range(20)]


# ---- metadata --------------------------------------------------------------------------------------------
def test_metadata_records_the_recipe_in_kohyas_fields():
    r = Rig().train(steps=3, alpha=4.0, lr_scheduler="cosine_with_restarts", lr_warmup_steps=1,
                    lr_scheduler_num_cycles=2, ema_decay=0.9)
    info = dict(r.lora.info, min_snr_gamma=5.0, noise_offset=0.05, adaptive_noise_scale=0.01)
    m = metadata.build(info, output_name="x")
    assert m["ss_network_alpha"] == "4.0" and m["ss_lr_scheduler"] == "cosine_with_restarts"
    assert m["ss_lr_warmup_steps"] == "1" and m["lora_lab.lr_scheduler_num_cycles"] == "2"
    assert m["ss_min_snr_gamma"] == "5.0" and m["ss_noise_offset"] == "0.05" and m["ss_adaptive_noise_scale"] == "0.01"
    assert m["lora_lab.ema_decay"] == "0.9" and m["lora_lab.weights"] == "ema" and "EMA" in m["ss_training_comment"]
    plain = metadata.build(Rig().train(steps=1).lora.info, output_name="y")
    assert plain["ss_min_snr_gamma"] == "None" and plain["ss_lr_scheduler"] == "constant"   # kohya writes str(None)
    assert "lora_lab.ema_decay" not in plain and plain["ss_network_train_unet_only"] == "True"


def test_network_alpha_sets_the_scale_and_zero_means_rank():
    r = Rig().train(steps=1, alpha=2.0, rank=4)
    assert all(float(v) == 2.0 for k, v in r.lora.items() if k.endswith(".alpha"))
    z = Rig().train(steps=1, alpha=0.0, rank=4)
    assert all(float(v) == 4.0 for k, v in z.lora.items() if k.endswith(".alpha"))


# ---- bad recipe values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(lr_warmup_steps=-1, lr_scheduler="linear"), "lr_warmup_steps = -1"),
    (dict(lr_warmup_steps=3), "constant' takes no warm-up"),
    (dict(lr_scheduler="exponential"), "lr_scheduler 'exponential' is not known"),
    (dict(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=0), "num_cycles = 0"),
    (dict(text_encoder_lr=-1e-4), "text_encoder_lr"),
    (dict(ema_decay=1.0), "ema_decay = 1.0"),
    (dict(ema_decay=-0.5), "ema_decay"),
    (dict(save_every_n_steps=-2), "save_every_n_steps = -2"),
    (dict(alpha=-1.0), "network_alpha = -1.0"),
])
def test_bad_recipe_values_are_refused(kw, msg):
    with pytest.raises(TrainingError, match=msg):
        Rig().config(**kw).check()


@pytest.mark.parametrize("kw,msg", [(dict(min_snr_gamma=-5.0), "min_snr_gamma"),
                                    (dict(noise_offset=-0.1), "noise_offset"),
                                    (dict(adaptive_noise_scale=0.1), "needs a noise_offset"),
                                    (dict(min_snr_gamma=float("nan")), "min_snr_gamma")])
def test_bad_objective_values_are_refused(kw, msg):
    with pytest.raises(TrainingError, match=msg):
        objective.Objective(objective.DiscreteSchedule(), "eps", **kw)


@pytest.mark.parametrize("kw,msg", [(dict(keep_tokens=-1), "keep_tokens"), (dict(dropout_rate=1.5), "dropout_rate"),
                                    (dict(tag_dropout_rate=-0.1), "tag_dropout_rate")])
def test_bad_caption_options_are_refused(kw, msg):
    with pytest.raises(TrainingError, match=msg):
        captions.CaptionOptions(**kw).check()


def test_tag_frequency_in_metadata_comes_from_the_dataset():
    info = dict(Rig().train(steps=1).lora.info, dataset={"tag_frequency": {"10_sks": {"sks": 3}},
                                                          "dataset_dirs": {"10_sks": {"n_repeats": 10, "img_count": 3}},
                                                          "buckets": {"enabled": True, "resolution": [512, 512],
                                                                      "min_size": 256, "max_size": 1024,
                                                                      "no_upscale": False},
                                                          "captions": {"shuffle": True, "keep_tokens": 1}})
    m = metadata.build(info, output_name="x", trigger_words="sks")
    assert json.loads(m["ss_tag_frequency"]) == {"10_sks": {"sks": 3}, "lora_lab": {"sks": info["num_samples"]}}
    assert json.loads(m["ss_dataset_dirs"]) == {"10_sks": {"n_repeats": 10, "img_count": 3}}
    assert m["ss_shuffle_caption"] == "True" and m["ss_keep_tokens"] == "1" and m["ss_resolution"] == "(512, 512)"
