"""The train node's recipe inputs inside ComfyUI (in-process, CPU, tiny SD1.5): a text-encoder LoRA
that core's LoraLoader loads with 0 dropped keys, save-every-N files that load in core and resume
exactly, sample images in the node's ui output, the metadata, min-SNR on the model's own σ, and
bad values. The loop's own properties are unit-tested (tests/unit/test_training_recipe.py)."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from loralab_testkit.datasets import kohya_folder

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return tiny_sd15


@pytest.fixture(scope="module")
def data(pack, sd15, comfy):
    """The dataset node's output for a 4-image kohya folder (7 samples with repeats)."""
    root = os.path.join(comfy.folder_paths.get_input_directory(), "recipe_ds")
    shutil.rmtree(root, ignore_errors=True)
    kohya_folder(root)
    with torch.inference_mode():
        out = pack.NODE_CLASS_MAPPINGS["LoraLabTrainingDataset"]().build(
            "recipe_ds", sd15.vae, sd15.clip, 96, min_bucket_reso=64, max_bucket_reso=128)
    return out["result"][:2]


def train(pack, sd15, data, **kw):
    latents, conds = data
    args = dict(model=sd15.model, batch_size=2, grad_accumulation_steps=1, steps=2, learning_rate=1e-3, rank=4,
                optimizer="AdamW", loss_function="MSE", seed=0, training_dtype="fp32", lora_dtype="fp32",
                algorithm="lora", gradient_checkpointing=False, existing_lora="[None]")
    args.update(kw)
    listed = {k: [v] for k, v in args.items()}
    with torch.inference_mode():
        out = pack.NODE_CLASS_MAPPINGS["LoraLabTrainLoraNode"]().train(latents=latents, positive=conds, **listed)
    return out


def result(out):
    return out["result"] if isinstance(out, dict) else out


def core_load(sd15, lora_name_or_sd, caplog):
    """Core's LoraLoader (a file name) or load_lora_for_models (a state dict); returns (model, clip, log)."""
    import comfy.sd
    import nodes as core_nodes

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        if isinstance(lora_name_or_sd, str):
            m, c = core_nodes.LoraLoader().load_lora(sd15.model, sd15.clip, lora_name_or_sd, 1.0, 1.0)
        else:
            m, c = comfy.sd.load_lora_for_models(sd15.model, sd15.clip, lora_name_or_sd, 1.0, 1.0)
    return m, c, caplog.text


def modules(lora) -> set:
    return {k.split(".")[0] for k in lora}


RECIPE = dict(text_encoder_lr=1e-3, network_alpha=2.0, lr_scheduler="linear", min_snr_gamma=5.0, noise_offset=0.05,
              adaptive_noise_scale=0.01, ema_decay=0.5)


@pytest.fixture(scope="module")
def te_run(pack, sd15, data):
    """One run with a text-encoder LoRA and every recipe option on (the tiny model is still slow on a CPU)."""
    return result(train(pack, sd15, data, clip=sd15.clip, batch_size=1, **RECIPE))


def test_text_encoder_lora_loads_in_core_with_no_dropped_key(sd15, te_run, caplog):
    model_with_lora, lora, _, steps, clip_with_lora = te_run
    te = {m for m in modules(lora) if m.startswith("lora_te_")}
    # CLIP-L: 12 layers × (q, k, v, out_proj, fc1, fc2), kohya's names
    assert len(te) == 72 and "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te
    assert any(lora[m + ".lora_up.weight"].abs().sum() > 0 for m in te), "the text-encoder LoRA learned"
    m, c, text = core_load(sd15, lora, caplog)
    assert "lora key not loaded" not in text and "NOT LOADED" not in text
    assert len(m.patches) + len(c.patcher.patches) == len(modules(lora))
    assert len(c.patcher.patches) == 72
    assert clip_with_lora is not sd15.clip and len(clip_with_lora.patcher.patches) == 72


def test_without_text_encoder_lr_the_clip_only_encodes(pack, sd15, data):
    _, lora, _, _, clip_out = result(train(pack, sd15, data, clip=sd15.clip, steps=1, batch_size=1))
    assert not any(k.startswith("lora_te") for k in lora) and clip_out is sd15.clip


def test_save_every_n_files_load_in_core_and_resume_exactly(pack, sd15, data, comfy, caplog):
    prefix = "recipe_ck/run"
    kw = dict(lr_scheduler="cosine", lr_warmup_steps=1, ema_decay=0.5, batch_size=1)
    out = train(pack, sd15, data, steps=2, save_every_n_steps=1, checkpoint_prefix=prefix, **kw)
    straight = result(out)
    assert out["ui"]["text"] == ["saved recipe_ck/run_step000001_00001.safetensors, "
                                 "recipe_ck/run_step000002_00001.safetensors"]
    folder = os.path.join(comfy.loras_dir, "recipe_ck")
    assert sorted(os.listdir(folder)) == ["run_step000001_00001.safetensors", "run_step000002_00001.safetensors"]
    from loralab.lora.io import read
    last = read(os.path.join(folder, "run_step000002_00001.safetensors")).tensors
    assert last.keys() == straight[1].keys() and all(torch.equal(last[k], straight[1][k]) for k in last)
    for name in ("recipe_ck/run_step000001_00001.safetensors", "recipe_ck/run_step000002_00001.safetensors"):
        m, _, text = core_load(sd15, name, caplog)
        assert "lora key not loaded" not in text and len(m.patches) == len(modules(straight[1]))
    train(pack, sd15, data, steps=1, save_every_n_steps=1, checkpoint_prefix=prefix, **kw)
    assert sorted(os.listdir(folder))[:2] == ["run_step000001_00001.safetensors", "run_step000001_00002.safetensors"]
    # continue the step-1 file for 1 more step: the straight 2-step run, bit for bit (schedule, optimizer
    # state and EMA restored from the file)
    cont = result(train(pack, sd15, data, steps=1, existing_lora="recipe_ck/run_step000001_00001.safetensors", **kw))
    assert cont[3] == 2
    assert cont[1].keys() == straight[1].keys() and all(torch.equal(cont[1][k], straight[1][k]) for k in cont[1])
    assert cont[2]["loss"] == straight[2]["loss"][1:]


def test_a_failing_checkpoint_save_leaves_no_partial_file(pack, sd15, data, comfy, monkeypatch):
    from loralab.lora.errors import LoraError
    import safetensors.torch
    from support.faults import disk_full_save_file

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_save_file)
    with pytest.raises(LoraError, match="No space left"):
        train(pack, sd15, data, steps=1, batch_size=1, save_every_n_steps=1, checkpoint_prefix="recipe_full/x")
    folder = os.path.join(comfy.loras_dir, "recipe_full")
    assert not os.path.isdir(folder) or os.listdir(folder) == []


def test_sample_images_appear_in_the_node_output(pack, sd15, data, comfy):
    out = train(pack, sd15, data, steps=2, batch_size=1, clip=sd15.clip, vae=sd15.vae, sample_every_n_steps=1,
                checkpoint_prefix="recipe_samples/lora",
                sample_prompt="sks, white square --n blurry --s 2 --w 64 --h 64 --d 3 --l 5\n# a comment\n"
                              "a grey picture --s 1 --ss k_euler_a")
    images = out["ui"]["images"]
    assert len(images) == 4 and all(i["type"] == "output" for i in images)
    assert [i["filename"].split("_step")[1][:6] for i in images] == ["000001", "000001", "000002", "000002"]
    for i in images:
        path = os.path.join(comfy.output_dir, i["subfolder"], i["filename"])
        assert os.path.getsize(path) > 0 and i["subfolder"] == "recipe_samples/samples"
    from PIL import Image
    assert Image.open(os.path.join(comfy.output_dir, images[0]["subfolder"], images[0]["filename"])).size == (64, 64)


def test_saved_metadata_records_the_recipe_and_the_dataset(pack, sd15, te_run, comfy):
    from loralab.lora.io import read

    lora = te_run[1]
    name = pack.NODE_CLASS_MAPPINGS["LoraLabSaveLoRA"]().save(lora, "recipe_meta", "m", "sks")["result"][0]
    meta = read(os.path.join(comfy.loras_dir, *name.split("/"))).metadata
    expect = {"ss_network_alpha": "2.0", "ss_lr_scheduler": "linear", "ss_min_snr_gamma": "5.0",
              "ss_noise_offset": "0.05", "ss_adaptive_noise_scale": "0.01", "ss_text_encoder_lr": "0.001",
              "ss_network_train_unet_only": "False", "lora_lab.ema_decay": "0.5", "lora_lab.weights": "ema",
              "ss_num_train_images": "7", "ss_enable_bucket": "True", "ss_resolution": "(96, 96)",
              "ss_min_bucket_reso": "64", "ss_max_bucket_reso": "128", "ss_shuffle_caption": "False"}
    assert {k: meta.get(k) for k in expect} == expect
    freq = json.loads(meta["ss_tag_frequency"])
    assert freq["2_sks square"]["sks"] == 3 and freq["lora_lab"] == {"sks": 7}
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks square": {"n_repeats": 2, "img_count": 3},
                                                   "recipe_ds": {"n_repeats": 1, "img_count": 1}}
    assert "lora_lab.online_weights" in meta, "the live factors travel for resume"


def test_min_snr_uses_the_models_own_sigmas(sd15):
    """kohya computes SNR from the DDPM schedule's alphas_cumprod; ComfyUI's model_sampling holds σ:
    1/σ² is the same SNR."""
    from diffusers import DDPMScheduler
    from loralab.training import objective
    from tolerances import rel_err

    sigmas = sd15.model.get_model_object("model_sampling").sigmas.float().cpu()
    ac = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.double()
    snr = ac / (1 - ac)
    t = torch.tensor([0, 10, 300, 999])
    ref = torch.minimum(snr[t], torch.full((4,), 5.0, dtype=torch.float64)) / snr[t]
    assert rel_err(objective.min_snr_weight("eps", sigmas[t], 5.0), ref) < 1e-5


@pytest.mark.parametrize("kw,msg", [
    (dict(lr_warmup_steps=-1, lr_scheduler="linear"), "lr_warmup_steps = -1"),
    (dict(min_snr_gamma=-1.0), "min_snr_gamma"),
    (dict(ema_decay=1.5), "ema_decay"),
    (dict(save_every_n_steps=1, checkpoint_prefix="../../outside"), "checkpoint_prefix"),
    (dict(sample_every_n_steps=1, sample_prompt="x"), "needs the clip and vae"),
    (dict(text_encoder_lr=1e-4, clip=None), None),
])
def test_bad_recipe_values_through_the_node(pack, sd15, data, kw, msg, comfy):
    from loralab.lora.errors import LoraError

    if msg is None:      # text_encoder_lr without a clip: nothing to train, the run is a UNet-only run
        lora = result(train(pack, sd15, data, steps=1, batch_size=1, **kw))[1]
        assert not any(k.startswith("lora_te") for k in lora)
        return
    before = sorted(os.listdir(comfy.loras_dir))
    with pytest.raises(LoraError, match=msg):
        train(pack, sd15, data, steps=1, **kw)
    assert sorted(os.listdir(comfy.loras_dir)) == before


def test_bad_sample_prompt_is_refused_before_training(pack, sd15, data):
    from loralab.lora.errors import LoraError

    with pytest.raises(LoraError, match=r"line 1: --s 'many' is not valid"):
        train(pack, sd15, data, steps=1, clip=sd15.clip, vae=sd15.vae, sample_every_n_steps=1,
              sample_prompt="sks --s many")
    with pytest.raises(LoraError, match=r"--ss 'warp' is not valid \(expected one of euler"):
        train(pack, sd15, data, steps=1, clip=sd15.clip, vae=sd15.vae, sample_every_n_steps=1,
              sample_prompt="sks --ss warp")
