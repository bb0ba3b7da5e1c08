"""LoraLabTrainLoraNode / LoraLabSaveLoRA inside ComfyUI (in-process, CPU, tiny SD1.5).

Training runs are few and short (the tiny UNet is still 44M parameters): one shared 2-step run
feeds most checks; the loop's own properties (loss falls, resume == straight run, every option)
are covered on a tiny denoiser in tests/unit/test_training_loop.py.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from loralab_testkit.comfy_env import patched_weights as weights
from tolerances import TOL, rel_err

pytestmark = pytest.mark.comfy

SPEC = {  # name: (kind, default, min, max) as the issue lists them
    "batch_size": ("INT", 1, 1, 10000), "grad_accumulation_steps": ("INT", 1, 1, 1024),
    "steps": ("INT", 16, 1, 100000), "learning_rate": ("FLOAT", 0.0005, 0.0000001, 1.0),
    "rank": ("INT", 8, 1, 128), "seed": ("INT", 0, 0, 18446744073709551615),
}
COMBOS = {"optimizer": (["AdamW", "Adam", "SGD", "RMSprop"], "AdamW"),
          "loss_function": (["MSE", "L1", "Huber", "SmoothL1"], "MSE"),
          "training_dtype": (["bf16", "fp32"], "bf16"), "lora_dtype": (["bf16", "fp32"], "bf16")}
ORDER = ["model", "latents", "positive", "batch_size", "grad_accumulation_steps", "steps", "learning_rate", "rank",
         "optimizer", "loss_function", "seed", "training_dtype", "lora_dtype", "algorithm", "gradient_checkpointing",
         "existing_lora"]


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return tiny_sd15


@pytest.fixture(scope="module")
def cond(sd15):
    import nodes as core_nodes

    with torch.inference_mode():
        return core_nodes.CLIPTextEncode().encode(sd15.clip, "a photo of sks")[0]


def latent(n=1, h=4, w=4, seed=0):
    return {"samples": torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(seed))}


def train(pack, sd15, cond, latents=None, positive=None, **kw):
    """Run the node as ComfyUI does: every input a list (INPUT_IS_LIST), under inference_mode."""
    args = dict(model=sd15.model, latents=latents or [latent(2)], positive=positive or [cond], batch_size=2,
                grad_accumulation_steps=1, steps=2, learning_rate=1e-3, rank=4, optimizer="AdamW",
                loss_function="MSE", seed=0, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
                gradient_checkpointing=False, existing_lora="[None]")
    args.update(kw)
    listed = {k: v if k in ("latents", "positive") else [v] for k, v in args.items()}
    with torch.inference_mode():
        out = pack.NODE_CLASS_MAPPINGS["LoraLabTrainLoraNode"]().train(**listed)
    assert out["ui"]["loralab_loss"][0]["points"] == [[i + 1, v] for i, v in enumerate(out["result"][2]["loss"])]
    return out["result"]


@pytest.fixture(scope="module")
def trained(pack, sd15, cond):
    return train(pack, sd15, cond)


def pack_loras():
    import folder_paths
    return folder_paths.get_folder_paths("loras")[0]


def save_node(pack, lora, **kw):
    args = dict(subfolder="trained", filename_prefix="t", trigger_words="")
    args.update(kw)
    out = pack.NODE_CLASS_MAPPINGS["LoraLabSaveLoRA"]().save(lora, **args)
    return out["result"][0]


# ---- schema -------------------------------------------------------------------------------------
def test_inputs_are_named_ranged_and_defaulted_as_documented(pack):
    cls = pack.NODE_CLASS_MAPPINGS["LoraLabTrainLoraNode"]
    req = cls.INPUT_TYPES()["required"]
    assert list(req) == ORDER
    for name, (kind, default, lo, hi) in SPEC.items():
        t, opts = req[name]
        assert (t, opts["default"], opts["min"], opts["max"]) == (kind, default, lo, hi), name
    for name, (options, default) in COMBOS.items():
        assert req[name][0] == options and req[name][1]["default"] == default, name
    assert req["algorithm"][0] == ["LoRA", "LoHa", "LoKr", "OFT"]      # core TrainLoraNode's names
    assert req["algorithm"][1]["default"] == "LoRA"
    assert req["gradient_checkpointing"][1]["default"] is True
    assert req["existing_lora"][0][0] == "[None]" and req["existing_lora"][1]["default"] == "[None]"
    assert cls.RETURN_TYPES == ("MODEL", "LORA_MODEL", "LOSS_MAP", "INT", "CLIP")
    assert cls.RETURN_NAMES == ("model_with_lora", "lora", "loss", "steps", "clip_with_lora")
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["LoraLabTrainLoraNode"] == "Train LoRA (LoRA Lab)"


def test_algorithm_takes_core_names_and_the_lowercase_ones_of_saved_workflows(pack):
    """ComfyUI skips its combo check for an input VALIDATE_INPUTS names: ours must refuse the rest."""
    cls = pack.NODE_CLASS_MAPPINGS["LoraLabTrainLoraNode"]
    for value in ("LoRA", "LoHa", "LoKr", "OFT", "lora", "loha", "lokr", "oft"):
        assert cls.VALIDATE_INPUTS(algorithm=[value]) is True, value
    for bad in ("glora", "", 3):
        msg = cls.VALIDATE_INPUTS(algorithm=[bad])
        assert isinstance(msg, str) and "LoRA, LoHa, LoKr, OFT" in msg, (bad, msg)


@pytest.mark.parametrize("node", ["LoraLabTrainLoraNode", "LoraLabSaveLoRA"])
def test_every_input_and_output_has_a_tooltip(pack, node):
    cls = pack.NODE_CLASS_MAPPINGS[node]
    spec = cls.INPUT_TYPES()
    for group in ("required", "optional"):
        for name, (_, opts) in spec.get(group, {}).items():
            assert opts.get("tooltip"), f"{node}.{name}"
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and all(cls.OUTPUT_TOOLTIPS)


# ---- training through the node --------------------------------------------------------------------
def test_trains_and_returns_a_plain_state_dict_with_kohya_names(trained, sd15):
    model, lora, loss, steps, _ = trained
    assert steps == 2 and len(loss["loss"]) == 2
    assert isinstance(lora, dict) and all(isinstance(v, torch.Tensor) for v in lora.values())
    assert all(k.startswith("lora_unet_") for k in lora)
    # kohya's default (networks/lora.py without conv_dim): the attention blocks' Linear and 1x1 layers only
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in lora
    assert lora["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 320, 1, 1)
    assert {k.split(".")[0].split("_attentions_")[0] for k in lora} == {
        "lora_unet_down_blocks_0", "lora_unet_down_blocks_1", "lora_unet_mid_block", "lora_unet_up_blocks_0",
        "lora_unet_up_blocks_1"}
    assert all("_attentions_" in k for k in lora)
    assert model is not sd15.model


def test_conv_dim_adds_kohyas_locon_layers_at_their_own_rank(pack, sd15, cond, caplog):
    """kohya's conv_dim: ResNet blocks and samplers join; their 3x3 convs at conv_dim / conv_alpha, their
    Linear and 1x1 layers at the rank; never conv_in / conv_out / the time embedding. Core loads it all."""
    import comfy.sd
    from loralab.lora.io import read

    _, lora, _, _, _ = train(pack, sd15, cond, latents=[latent(1)], steps=1, batch_size=1, conv_dim=2,
                             conv_alpha=1.0)
    assert lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 320, 3, 3)
    assert lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (320, 2, 1, 1)
    assert lora["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape == (4, 1280)
    assert lora["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"].shape[0] == 2
    assert lora["lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight"].shape[0] == 2
    assert lora["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 4
    assert not any("conv_in" in k or "time_embedding" in k or "conv_out" in k for k in lora)
    name = save_node(pack, lora, filename_prefix="locon")
    meta = read(os.path.join(pack_loras(), name)).metadata
    assert '"conv_dim": "2"' in meta["ss_network_args"] and '"conv_alpha": "1.0"' in meta["ss_network_args"]
    with caplog.at_level(logging.WARNING):
        m, _ = comfy.sd.load_lora_for_models(sd15.model, None, lora, 1.0, 0)
    assert "lora key not loaded" not in caplog.text
    assert len(m.patches) == len({k.split(".")[0] for k in lora})


def test_input_model_is_untouched(pack, sd15, trained):
    before = weights(sd15.model)
    model = trained[0]
    after_patch = weights(model)
    assert any(not torch.equal(before[k], after_patch[k]) for k in before), "model_with_lora must differ"
    assert all(torch.equal(before[k], v) for k, v in weights(sd15.model).items())


def test_same_inputs_give_the_same_lora_bit_for_bit(pack, sd15, cond, trained):
    again = train(pack, sd15, cond)[1]
    assert again.keys() == trained[1].keys() and all(torch.equal(again[k], trained[1][k]) for k in again)


def test_single_latent_list_of_sizes_and_bf16(pack, sd15, cond):
    """Core 0.3.75 crashes on a single LATENT; a list of latents of different sizes is bucketed."""
    _, lora, _, steps, _ = train(pack, sd15, cond, latents=[latent(1)], steps=1, batch_size=1)
    assert steps == 1 and lora
    _, lora, loss, _, _ = train(pack, sd15, cond, latents=[latent(1, 4, 4), latent(2, 4, 6, seed=1)], steps=1,
                             training_dtype="bf16", lora_dtype="bf16", gradient_checkpointing=True)
    assert all(v.dtype == torch.bfloat16 for k, v in lora.items() if not k.endswith(".alpha"))
    assert all(torch.isfinite(torch.tensor(loss["loss"])))


def test_latents_enter_model_space_through_the_latent_format(pack, sd15, cond, monkeypatch):
    from loralab.training import loop

    seen = {}
    real = loop.make_dataset

    def spy(latents, n_conds, process_in=None, *rest):
        seen["process_in"] = process_in
        return real(latents, n_conds, process_in, *rest)

    monkeypatch.setattr(loop, "make_dataset", spy)
    train(pack, sd15, cond, latents=[latent(1, 4, 4), latent(1, 4, 6)], steps=1, batch_size=1)
    x = torch.ones(1, 4, 2, 2)
    assert torch.allclose(seen["process_in"](x), x * 0.18215)      # SD1.5's latent scale


def test_prediction_type_follows_the_models_sampling(pack, sd15):
    import comfy_extras.nodes_model_advanced as adv
    from loralab.nodes import train as train_node

    assert train_node.prediction(sd15.model) == "eps"
    (v_model,) = adv.ModelSamplingDiscrete().patch(sd15.model, "v_prediction", False)
    assert train_node.prediction(v_model) == "v"
    # kohya writes sd_v1_v for a v-prediction SD1 model (model_util.get_model_version_str_for_sd1_sd2)
    assert train_node.model_info(v_model)["base_model_version"] == "sd_v1_v"
    assert train_node.model_info(sd15.model)["architecture"] == "sd15"


@pytest.mark.parametrize("algorithm", ["LoHa", "LoKr", "OFT"])
def test_every_algorithm_trains_and_core_loads_it_completely(pack, sd15, cond, algorithm, caplog):
    import comfy.sd

    _, lora, _, steps, _ = train(pack, sd15, cond, latents=[latent(1)], steps=1, batch_size=1, algorithm=algorithm)
    assert steps == 1
    with caplog.at_level(logging.WARNING):
        m, _ = comfy.sd.load_lora_for_models(sd15.model, None, lora, 1.0, 0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert len(m.patches) == len({k.rsplit(".", 1)[0] if k.endswith(".alpha") else k.split(".")[0] for k in lora})


def test_interrupt_stops_within_one_step_and_returns_the_lora(pack, sd15, cond):
    import comfy.model_management as mm
    import comfy.utils

    updates = []

    def hook(value, total, preview, node_id=None):
        updates.append(value)
        if value == 1:
            mm.interrupt_current_processing(True)       # what POST /interrupt does
        mm.throw_exception_if_processing_interrupted()  # what the server's progress hook does

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        _, lora, loss, steps, _ = train(pack, sd15, cond, latents=[latent(1)], steps=5, batch_size=1)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert steps == 1 and len(loss["loss"]) == 1 and updates == [1]
    assert lora and not mm.processing_interrupted()


def test_count_mismatch_and_empty_latents_are_refused(pack, sd15, cond):
    from loralab.lora.errors import LoraError

    with pytest.raises(LoraError, match="3 latents but 2 conditionings"):
        train(pack, sd15, cond, latents=[latent(3)], positive=[cond, cond])
    with pytest.raises(LoraError, match="no latents"):
        train(pack, sd15, cond, latents=[{"samples": torch.zeros(0, 4, 4, 4)}])


def test_rank_larger_than_a_layer_allows_is_refused(pack, sd15, cond):
    """rank ≤ 128 is the node's range; every SD1.5 layer holds that, so check the core refuses past
    the smallest layer: OFT's block size cannot exceed the output width."""
    from loralab.nodes import train as train_node
    from loralab.training import adapters
    from loralab.lora.errors import LoraError

    targets = train_node.train_targets(sd15.model, conv=True)
    smallest = min(adapters.trainable("lora").max_rank(adapters.layer_op(m)) for m in targets.values())
    with pytest.raises(LoraError, match=f"rank {smallest + 1} is larger"):
        adapters.check_rank(targets, smallest + 1, "lora")


# ---- save, load everywhere, resume ----------------------------------------------------------------
def test_saved_file_is_listed_and_carries_the_metadata(pack, comfy, trained):
    from loralab.lora.io import read

    name = save_node(pack, trained[1], trigger_words="sks, photo")
    assert name.startswith("trained/t_") and name in comfy.folder_paths.get_filename_list("loras")
    f = read(comfy.folder_paths.get_full_path("loras", name))
    m = f.metadata
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                "ss_steps", "ss_learning_rate", "ss_optimizer", "ss_seed", "ss_training_started_at",
                "ss_training_finished_at", "ss_output_name", "ss_tag_frequency", "modelspec.architecture",
                "modelspec.title", "modelspec.date", "modelspec.trigger_phrase"):
        assert m.get(key), key
    assert m["ss_network_module"] == "networks.lora" and m["ss_base_model_version"] == "sd_v1"
    assert m["modelspec.architecture"] == "stable-diffusion-v1/lora" and m["ss_steps"] == "2"
    assert m["modelspec.trigger_phrase"] == "sks, photo"
    assert f.tensors.keys() == trained[1].keys()
    assert not [x for x in os.listdir(os.path.dirname(f.path)) if x.startswith(".tmp")]


def test_saved_lora_loads_in_core_loader_completely_and_equals_ours(pack, sd15, trained, caplog):
    import nodes as core_nodes

    name = save_node(pack, trained[1])
    with caplog.at_level(logging.WARNING):
        core_model, _ = core_nodes.LoraLoader().load_lora(sd15.model, sd15.clip, name, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text
    modules = {k.split(".")[0] for k in trained[1]}
    assert len(core_model.patches) == len(modules)
    core_w = weights(core_model)
    if "LoraLabLoadLoRA" in pack.NODE_CLASS_MAPPINGS:
        ours = pack.NODE_CLASS_MAPPINGS["LoraLabLoadLoRA"]().load(sd15.model, sd15.clip, name, 1.0, 1.0)
        our_w = weights(ours["result"][0])
        changed = [k for k in core_w if k in our_w and not torch.equal(core_w[k], our_w[k])]
        assert max((rel_err(our_w[k], core_w[k]) for k in changed), default=0.0) <= TOL["core_parity_fp32"]
    trained_w = weights(trained[0])      # model_with_lora is the same model
    assert max(rel_err(trained_w[k], core_w[k]) for k in core_w) <= TOL["core_parity_fp32"]


def test_saved_lora_loads_in_diffusers_with_the_same_deltas(pack, sd15, trained, comfy):
    """diffusers' load_lora_weights path (kohya -> PEFT conversion) on a UNet shaped like the tiny SD1.5:
    every module of the file lands on the layer ComfyUI patched, with the same ΔW."""
    import diffusers
    from comfy.utils import unet_to_diffusers

    name = save_node(pack, trained[1])
    path = comfy.folder_paths.get_full_path("loras", name)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(320, 320), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()                  # fused weight = ΔW exactly, no cancellation against W
    Pipe = diffusers.StableDiffusionPipeline
    state, alphas = Pipe.lora_state_dict(path)
    Pipe.load_lora_into_unet(state, alphas, unet=unet, adapter_name="t")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    fused = unet.state_dict()
    lora = trained[1]
    matched = 0
    for d_key in unet_to_diffusers(sd15.model.model.model_config.unet_config):
        m = "lora_unet_" + d_key[: -len(".weight")].replace(".", "_")
        if not d_key.endswith(".weight") or m + ".lora_up.weight" not in lora:
            continue
        up, down = lora[m + ".lora_up.weight"].flatten(1), lora[m + ".lora_down.weight"].flatten(1)
        ref = (up @ down) * (float(lora[m + ".alpha"]) / down.shape[0])
        assert rel_err(fused[d_key].reshape(ref.shape), ref) <= TOL["reference_fp32"], d_key
        matched += 1
    assert matched == len({k.split(".")[0] for k in lora}), "every module of the file lands on a diffusers layer"


def test_resume_through_the_nodes_counts_steps_from_metadata(pack, sd15, cond, trained, comfy):
    name = save_node(pack, trained[1], filename_prefix="resumable")
    src = comfy.folder_paths.get_full_path("loras", name)
    renamed = os.path.join(os.path.dirname(src), "no_steps_in_this_name.safetensors")
    os.rename(src, renamed)
    comfy.folder_paths.filename_list_cache.clear()
    _, lora, _, steps, _ = train(pack, sd15, cond, steps=1, existing_lora="trained/no_steps_in_this_name.safetensors")
    assert steps == 3


def test_existing_lora_for_another_algorithm_is_refused(pack, sd15, cond, trained):
    from loralab.lora.errors import LoraError

    name = save_node(pack, trained[1], filename_prefix="lora_algo")
    with pytest.raises(LoraError, match="algorithm chosen is 'loha'"):
        train(pack, sd15, cond, steps=1, existing_lora=name, algorithm="loha")


def test_save_into_a_folder_that_is_not_writable_leaves_nothing(pack, comfy, trained, monkeypatch):
    from loralab.lora.errors import LoraError
    import safetensors.torch
    from support.faults import disk_full_save_file

    folder = os.path.join(comfy.loras_dir, "trained")
    os.makedirs(folder, exist_ok=True)
    before = set(os.listdir(folder))

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_save_file)
    with pytest.raises(LoraError, match="No space left"):
        save_node(pack, trained[1])
    assert set(os.listdir(folder)) == before
    monkeypatch.undo()
    if os.geteuid() != 0:   # root writes anywhere: permission bits cannot refuse it
        os.chmod(folder, 0o555)
        try:
            with pytest.raises(LoraError, match="not writable"):
                save_node(pack, trained[1])
        finally:
            os.chmod(folder, 0o755)
    with pytest.raises(LoraError, match="must stay inside the loras folder"):
        save_node(pack, trained[1], subfolder="../outside")


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_lora(pack, sd15, cond, trained, comfy, monkeypatch):
    """Regression for the node glue: the core loop raises TrainingError(result=last good state) on a
    NaN loss (unit-tested in test_training_loop.py); the node must not drop that state but save it
    where loaders find it, and say where."""
    from loralab.nodes import train as train_mod
    from loralab.training.errors import TrainingError
    from loralab.training.loop import TrainResult

    good = trained[1]

    def nan_at_step_3(**kw):
        raise TrainingError("the loss became NaN at step 3", result=TrainResult(good, [0.5, 0.4], 2))

    monkeypatch.setattr(train_mod.loop, "train", nan_at_step_3)
    with pytest.raises(TrainingError) as e:
        train(pack, sd15, cond)
    msg = str(e.value)
    assert "NaN at step 3" in msg and "as of step 2 was saved as 'loralab_recovery/stopped_at_step_2_" in msg
    name = msg.split("saved as '")[1].split("'")[0]
    from loralab.lora import read
    saved = read(os.path.join(comfy.loras_dir, name))
    assert set(saved.tensors) == set(good) and all(torch.equal(saved.tensors[k], good[k].cpu()) for k in good)


def test_trained_lora_model_goes_through_core_lora_model_loader(pack, sd15, trained):
    """Issue 3's LORA_MODEL interchange, our side: core's LoraModelLoader takes our trained LoRA
    (kohya names) and patches the same weights as our LoraLabLoraModelLoader."""
    from comfy_extras.nodes_train import LoraModelLoader

    lora = trained[1]
    core = LoraModelLoader.execute(sd15.model, lora, 1.0)
    core = core.result[0] if hasattr(core, "result") else core[0]
    ours, report = pack.NODE_CLASS_MAPPINGS["LoraLabLoraModelLoader"]().load(sd15.model, lora, 1.0)["result"]
    assert f"{len(lora)} of {len(lora)} keys match" in report
    a, b, base = weights(ours), weights(core), weights(sd15.model)
    changed = [k for k in a if not torch.equal(a[k], base[k])]
    assert changed and all(rel_err(a[k], b[k]) <= TOL["core_parity_fp32"] for k in changed)
