"""The training loop on a tiny denoiser (no ComfyUI): it learns, it is deterministic bit for bit,
a resumed run equals an uninterrupted one, every option combination runs, bad input is refused."""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from loralab.lora.io import read
from loralab.training import loop, objective, resume, save
from loralab.training.errors import TrainingError
from support.siblings import sibling

Rig = sibling(__file__, "test_training_model").Rig

ALGOS = ["lora", "loha", "lokr", "oft"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the objective -------------------------------------------------------------------------------
def comfy_denoised(prediction, sigma, out, x, sigma_data=1.0):
    """ComfyUI's calculate_denoised for EPS / V_PREDICTION / CONST, written out (no ComfyUI here)."""
    s = sigma.reshape(-1, 1, 1, 1)
    if prediction == "eps" or prediction == "flow":
        return x - out * s
    d = sigma_data
    return x * d ** 2 / (s ** 2 + d ** 2) - out * s * d / (s ** 2 + d ** 2) ** 0.5


@pytest.mark.parametrize("prediction,sched,sigma_data", [
    ("eps", objective.DiscreteSchedule(), 1.0), ("v", objective.DiscreteSchedule(), 1.0),
    ("v", objective.DiscreteSchedule(), 0.5), ("flow", objective.FlowSchedule(shift=3.0), 1.0)])
def test_target_is_what_the_model_must_predict(prediction, sched, sigma_data):
    """The target is the raw output for which the model's own denoiser returns x0 exactly."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sigma = sched.sigmas[torch.tensor([0, 10, 300, 700, 999])].double()
    x_t = sched.noise_scaling(sigma, noise, x0)
    t = objective.target(prediction, x0, noise, sigma, sigma_data)
    assert torch.allclose(comfy_denoised(prediction, sigma, t, x_t, sigma_data), x0, atol=1e-9)


def test_draw_uses_the_models_schedule_and_is_seeded():
    sched = objective.DiscreteSchedule()
    calls = []

    class Spy:
        sigmas = sched.sigmas

        def noise_scaling(self, sigma, noise, latent, max_denoise=False):
            calls.append(sigma)
            return sched.noise_scaling(sigma, noise, latent)

    obj = objective.Objective(Spy(), "eps")
    x0 = torch.zeros(64, 4, 2, 2)
    a = obj.draw(x0, torch.Generator().manual_seed(1))
    b = obj.draw(x0, torch.Generator().manual_seed(1))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert len(calls) == 2 and set(calls[0].tolist()) <= set(sched.sigmas.tolist())
    assert calls[0].unique().numel() > 30, "σ is drawn over the whole schedule"


def test_unsupported_prediction_is_refused():
    with pytest.raises(TrainingError, match="supported: eps, v, flow"):
        objective.Objective(objective.DiscreteSchedule(), "x0")


# ---- learning, determinism, resume ----------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_loss_falls_on_a_fixed_dataset(prediction):
    rig = Rig(n=2, prediction=prediction)
    before = rig.eval_loss()
    r = rig.train(steps=30, learning_rate=5e-2, batch_size=2)
    after = rig.eval_loss(r.lora)
    # flow's target ε − x0 is mostly unpredictable noise for random latents: less to learn
    assert after < (0.8 if prediction == "eps" else 0.92) * before, (before, after)
    assert r.steps == 30 and len(r.losses) == 30


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_same_inputs_same_lora_bit_for_bit(lora_dtype):
    a = Rig().train(steps=3, lora_dtype=lora_dtype, training_dtype=torch.bfloat16, seed=11)
    b = Rig().train(steps=3, lora_dtype=lora_dtype, training_dtype=torch.bfloat16, seed=11)
    c = Rig().train(steps=3, lora_dtype=lora_dtype, training_dtype=torch.bfloat16, seed=12)
    assert same(a.lora, b.lora) and a.losses == b.losses
    assert not same(a.lora, c.lora), "the seed must change the result"


@pytest.mark.parametrize("algo,optimizer,lora_dtype", [("lora", "AdamW", torch.float32),
                                                       ("lora", "AdamW", torch.bfloat16),
                                                       ("loha", "RMSprop", torch.float32),
                                                       ("oft", "SGD", torch.float32)])
def test_resume_equals_an_uninterrupted_run(tmp_path, algo, optimizer, lora_dtype):
    """3 steps, save, rename the file, resume for 3 more == 6 steps straight, bit for bit."""
    kw = dict(algorithm=algo, optimizer=optimizer, lora_dtype=lora_dtype, grad_accumulation_steps=2, seed=5)
    straight = Rig().train(steps=6, **kw)
    rig = Rig()
    first = rig.train(steps=3, **kw)
    path, _ = save.save(first.lora, str(tmp_path), filename_prefix="part")
    renamed = tmp_path / "whatever.safetensors"       # the step count must come from the metadata
    (tmp_path / path.split("/")[-1]).rename(renamed)
    res = resume.load(read(str(renamed)), rig.targets, algo, None)
    assert res.steps == 3 and (res.optimizer_state or optimizer == "SGD")   # plain SGD keeps no state
    second = rig.train(steps=3, resume=res, **kw)
    assert second.steps == 6
    assert same(second.lora, straight.lora)
    assert second.losses == straight.losses[3:]


@pytest.mark.parametrize("name,algo", [("legacy_loha_r2", "LoHa"), ("legacy_lokr_r1", "LoKr"),
                                       ("legacy_lokr_r4", "LoKr"), ("legacy_oft_r4", "OFT")])
def test_files_saved_before_the_unified_adapters_resume_with_their_optimizer_state(name, algo):
    # Pins resume from files the previous trainer wrote (tests/unit/data/README.md): it named LoHa,
    # LoKr and OFT parameters w1a / w1, w2a / blocks, and the optimizer state in those files is
    # keyed by those names. They must keep their state, not restart the optimizer (or fail).
    from loralab.lora.io import read as read_file
    from loralab.training import adapters as ad, metadata

    f = read_file(os.path.join(os.path.dirname(__file__), "data", name + ".safetensors"))
    rig = Rig()
    res = resume.load(f, rig.targets, algo, None)
    assert res.steps == 2 and not any("fresh" in n for n in res.notes)
    params = loop.param_table(ad.create_adapters(rig.targets, algo, 0, 0.0, 0, torch.float32, res.adapters))
    opt = loop.make_optimizer(params, rig.config(algorithm=algo), res.optimizer_state)
    stored = metadata.decode_tensors(f.metadata["lora_lab.optimizer_state"], "lora_lab.optimizer_state")
    assert len(stored) == 3 * len(params)                 # step, exp_avg, exp_avg_sq for every parameter
    old_role = {new: old for old, new in ad.LEGACY_ROLES[ad.trainable(algo).name].items()}
    for pname, p in params.items():
        target, role = pname.split("/")
        assert torch.equal(opt.state[p]["exp_avg"], stored[f"{target}/{old_role[role]}/exp_avg"]), pname
    r = rig.train(steps=1, resume=res, algorithm=algo)
    assert r.steps == 3 and math.isfinite(r.losses[0])


def test_a_file_with_alpha_0_continues_at_scale_1(tmp_path):
    # Pins a bug of the duplicated math: the loader reads alpha = 0 as scale 1 (kohya and LyCORIS:
    # "alpha 0 means alpha = rank"), but a LoRA resumed from such a file trained at alpha/rank = 0,
    # so it contributed nothing while training. The same factors with alpha 0 and with alpha = rank
    # (scale 1 both) must train identically, and the LoRA must be live.
    rig = Rig()
    trained = dict(rig.train(steps=2).lora)
    runs = []
    for alpha in (0.0, 4.0):                                   # rank 4
        sd = {k: torch.tensor(alpha) if k.endswith(".alpha") else v for k, v in trained.items()}
        path, _ = save.save(sd, str(tmp_path), filename_prefix=f"alpha{alpha:g}")
        res = resume.load(read(path), rig.targets, "lora", None)
        runs.append((Rig().train(steps=2, resume=res), sd))
    (zero, zero_sd), (rank, _) = runs
    assert zero.losses == rank.losses
    assert all(torch.equal(zero.lora[k], rank.lora[k]) for k in zero.lora if not k.endswith(".alpha"))
    assert all(float(zero.lora[k]) == 0.0 for k in zero.lora if k.endswith(".alpha"))   # the file's alpha is kept
    assert rig.eval_loss(zero_sd) != rig.eval_loss(), "a scale of 0 would leave the base model"


def test_resume_without_optimizer_state_still_continues(tmp_path):
    rig = Rig()
    first = rig.train(steps=2)
    path, _ = save.save(first.lora, str(tmp_path), optimizer_state=False)
    res = resume.load(read(path), rig.targets, "lora", None)
    assert res.optimizer_state is None and any("optimizer starts fresh" in n for n in res.notes)
    r = rig.train(steps=1, resume=res)
    assert r.steps == 3


# ---- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo,training_dtype,lora_dtype",
                         list(itertools.product(ALGOS, [torch.bfloat16, torch.float32], [torch.bfloat16, torch.float32])))
def test_every_algorithm_and_dtype_trains_with_checkpointing_and_accumulation(algo, training_dtype, lora_dtype):
    rig = Rig(n=2)
    r = rig.train(steps=2, algorithm=algo, training_dtype=training_dtype, lora_dtype=lora_dtype,
                  gradient_checkpointing=True, grad_accumulation_steps=2)
    assert r.steps == 2 and all(math.isfinite(x) for x in r.losses)
    assert all(t.dtype == (torch.float32 if k.endswith(".alpha") else lora_dtype) for k, t in r.lora.items())
    fresh = Rig(n=2).train(steps=1, algorithm=algo, learning_rate=1e-7, lora_dtype=lora_dtype)
    assert not same(r.lora, fresh.lora), "training must change the factors"
    assert len(rig.calls) == 4, "2 steps × 2 micro-batches"


@pytest.mark.parametrize("optimizer,loss", list(itertools.product(loop.OPTIMIZERS, objective.LOSSES)))
def test_every_optimizer_and_loss_runs(optimizer, loss):
    r = Rig(n=2).train(steps=2, optimizer=optimizer, loss=loss)
    assert r.steps == 2 and all(math.isfinite(x) for x in r.losses)


@pytest.mark.parametrize("algo", ALGOS)
def test_gradient_checkpointing_changes_nothing_but_memory(algo):
    a = Rig().train(steps=2, algorithm=algo, gradient_checkpointing=True)
    b = Rig().train(steps=2, algorithm=algo, gradient_checkpointing=False)
    assert same(a.lora, b.lora)


def test_checkpointing_wraps_blocks_and_restores_them():
    rig = Rig()
    blocks = loop.blocks_to_checkpoint(rig.model, rig.targets)
    assert blocks == list(rig.model.blocks)
    with loop.checkpointed(blocks):
        assert "forward" in rig.model.blocks[0].__dict__
    assert "forward" not in rig.model.blocks[0].__dict__


def test_model_is_left_as_it_was():
    rig = Rig()
    before = {k: v.clone() for k, v in rig.model.state_dict().items()}
    flags = [p.requires_grad for p in rig.model.parameters()]
    rig.train(steps=2)
    assert same(before, rig.model.state_dict())
    assert flags == [p.requires_grad for p in rig.model.parameters()]
    x = torch.randn(1, 4, 8, 8)
    rig.model(x, torch.tensor([3.0]), rig.ctx[:1])         # no hook left behind
    assert all(not m._forward_hooks for m in rig.model.modules())


# ---- datasets -----------------------------------------------------------------------------------
def test_single_latent_batch_and_mixed_sizes():
    single = loop.make_dataset([torch.randn(4, 8, 8)], 1)
    assert single.size == 1 and len(single.buckets) == 1
    batch = loop.make_dataset([torch.randn(3, 4, 8, 8)], 3)
    assert batch.size == 3 and batch.conds == [[0, 1, 2]]
    mixed = loop.make_dataset([torch.randn(2, 4, 8, 8), torch.randn(1, 4, 6, 10), torch.randn(1, 4, 8, 8)], 4)
    assert sorted(b.shape[0] for b in mixed.buckets) == [1, 3]
    assert mixed.conds == [[0, 1, 3], [2]]
    shared = loop.make_dataset([torch.randn(2, 4, 8, 8), torch.randn(1, 4, 6, 6)], 1)
    assert shared.conds == [[0, 0], [0]]


def test_latent_format_applies_to_every_bucket():
    seen = []

    def process_in(x):
        seen.append(x.shape)
        return x * 0.5

    lat = [torch.ones(2, 4, 8, 8), torch.ones(1, 4, 6, 6)]
    d = loop.make_dataset(lat, 3, process_in)
    assert len(seen) == 2 and all(torch.all(b == 0.5) for b in d.buckets)


def test_mixed_sizes_train_in_buckets_one_forward_per_batch():
    rig = Rig(n=2, sizes=((8, 8), (6, 10)))
    rig.train(steps=6, batch_size=4)
    shapes = {s for s, _ in rig.calls}
    assert shapes == {(2, 4, 8, 8), (2, 4, 6, 10)}, "each batch holds one bucket, all of it"


# ---- bad input ----------------------------------------------------------------------------------
def test_latent_and_conditioning_counts_must_agree():
    with pytest.raises(TrainingError, match="3 latents but 2 conditionings"):
        loop.make_dataset([torch.randn(3, 4, 8, 8)], 2)


def test_empty_latents_are_refused():
    with pytest.raises(TrainingError, match="no latents"):
        loop.make_dataset([torch.zeros(0, 4, 8, 8)], 1)
    with pytest.raises(TrainingError, match="no latents"):
        loop.make_dataset([], 1)


def test_rank_larger_than_a_layer_allows():
    with pytest.raises(TrainingError, match="rank 9 is larger"):     # to_k has 8 inputs
        Rig().train(steps=1, rank=9)


@pytest.mark.parametrize("name,value", [("steps", 0), ("rank", 129), ("learning_rate", 2.0), ("batch_size", 0),
                                        ("grad_accumulation_steps", 1025), ("seed", -1)])
def test_out_of_range_inputs(name, value):
    with pytest.raises(TrainingError, match=name):
        Rig().config(**{name: value}).check()


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_state():
    rig = Rig()
    n = {"calls": 0}

    def sometimes_nan(x, sigma, conds):
        n["calls"] += 1
        out = rig.denoise(x, sigma, conds)
        return out * float("nan") if n["calls"] == 3 else out

    with pytest.raises(TrainingError, match="at step 3") as e:
        rig.train(steps=5, denoise=sometimes_nan)
    good = Rig().train(steps=2)
    assert e.value.result.steps == 2
    assert same(e.value.result.lora, good.lora)


def test_interrupt_returns_a_usable_lora_after_that_step():
    stop_at = 2
    r = Rig().train(steps=10, on_step=lambda step, total, loss: step == stop_at)
    assert r.interrupted and r.steps == 2 and len(r.losses) == 2
    assert same(r.lora, Rig().train(steps=2).lora)


def test_progress_sees_every_step_with_its_loss():
    seen = []
    r = Rig().train(steps=3, on_step=lambda step, total, loss: seen.append((step, total, loss)))
    assert seen == [(1, 3, r.losses[0]), (2, 3, r.losses[1]), (3, 3, r.losses[2])]


def test_existing_lora_of_another_algorithm_is_refused(tmp_path):
    rig = Rig()
    path, _ = save.save(rig.train(steps=1, algorithm="loha").lora, str(tmp_path))
    with pytest.raises(TrainingError, match="holds loha .* algorithm chosen is 'lora'"):
        resume.load(read(path), rig.targets, "lora", None)


def test_existing_lora_of_another_architecture_is_refused(tmp_path):
    rig = Rig()
    lora = rig.train(steps=1).lora
    lora.info["modelspec_architecture"] = "stable-diffusion-xl-v1-base"
    path, _ = save.save(lora, str(tmp_path))
    with pytest.raises(TrainingError, match=r"trained for SDXL \(lora_lab.architecture 'stable-diffusion-xl-v1-base'\); "
                                            r"this model is SD1.5 \('stable-diffusion-v1'\)"):
        resume.load(read(path), rig.targets, "lora", "stable-diffusion-v1")


def test_existing_lora_for_other_layers_is_refused(tmp_path):
    """No metadata to go by: the module names tell."""
    from loralab.lora.io import write

    path = str(tmp_path / "other.safetensors")
    write(path, {"lora_unet_somewhere_else.lora_up.weight": torch.zeros(4, 2),
                 "lora_unet_somewhere_else.lora_down.weight": torch.zeros(2, 4)})
    with pytest.raises(TrainingError, match="1 of 1 modules of existing_lora are not layers this model trains"):
        resume.load(read(path), Rig().targets, "lora", "stable-diffusion-v1")


def test_existing_lora_with_wrong_shapes_is_refused(tmp_path):
    from loralab.lora.io import write

    path = str(tmp_path / "wide.safetensors")
    write(path, {"lora_unet_blocks_0_to_k.lora_up.weight": torch.zeros(16, 2),
                 "lora_unet_blocks_0_to_k.lora_down.weight": torch.zeros(2, 768)})
    with pytest.raises(TrainingError, match="lora_unet_blocks_0_to_k.*shape"):
        resume.load(read(path), Rig().targets, "lora", None)
