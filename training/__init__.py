"""LoRA Lab training: trainable bypass adapters, the model's own objective, a deterministic loop,
resume from any file by its metadata, and saving with kohya / modelspec metadata. No ComfyUI import.

Typical standalone use::

    from training import adapters, loop, objective
    targets = adapters.find_targets(unet, name_of)              # {file module name: layer}
    data = loop.make_dataset([latents], n_conds=1, process_in=lambda x: x * 0.18215)
    obj = objective.Objective(objective.DiscreteSchedule(), "eps", "MSE")
    result = loop.train(targets=targets, denoise=fn, objective=obj, dataset=data,
                        config=loop.TrainConfig(steps=100), root=unet)
    result.lora          # {kohya key: tensor}, plus .info for the metadata
"""
