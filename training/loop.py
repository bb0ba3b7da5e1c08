"""The training loop, in small steps: dataset -> adapters -> optimizer -> steps -> result.

Everything model-specific comes in from the caller as plain objects:

    targets     {file module name: layer}          layers to adapt (Linear / Conv)
    denoise     (x_t, σ, cond_indices) -> output   the model's raw network output for a batch
    objective   Objective                          noise, timesteps and target, as the model defines them
    on_step     (step, total, loss) -> bool        progress; return True to stop (interrupt)

Determinism: the batch of each micro-batch comes from a CPU generator seeded from (seed, global
step, micro-batch), each sample's σ and noise from one seeded from (seed, step, micro-batch, its
position in the batch), and each layer's init from (seed, layer name). The same inputs give the
same LoRA bit for bit on the CPU, a run resumed at step N continues exactly as an uninterrupted run
would (same batches, noise and timesteps for step N+1; same optimizer state), and a data-parallel
run (``world``, distributed.py) computes the same samples with the same draws, split over processes.

kohya's recipe (all off by default; see recipe.py): a learning-rate schedule that is a pure
function of the global step, a text-encoder LoRA with its own learning rate (``te_targets``),
per-step caption variants, an EMA of the factors, and callbacks to save (``on_save``) or sample
(``on_sample``) every N steps.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from . import adapters as ad
from . import recipe
from .captions import CaptionOptions
from .errors import TrainingError
from .metadata import dtype_name
from .objective import Objective, loss_fn
from .distributed import SINGLE, World
from .resume import Resume

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# (min, max) of every numeric input, as the node documents them
LIMITS = {"batch_size": (1, 10000), "grad_accumulation_steps": (1, 1024), "steps": (1, 100000),
          "learning_rate": (1e-7, 1.0), "rank": (1, 128), "seed": (0, 0xFFFFFFFFFFFFFFFF)}


@dataclass
class TrainConfig:
    steps: int = 16
    batch_size: int = 1
    grad_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    rank: int = 8
    alpha: float = 1.0
    optimizer: str = "AdamW"
    loss: str = "MSE"
    seed: int = 0
    training_dtype: torch.dtype = torch.bfloat16
    lora_dtype: torch.dtype = torch.bfloat16
    algorithm: str = "LoRA"          # a trainable adapter label or name (adapters.trainable)
    conv_dim: int = 0                # kohya's conv_dim: rank of the kxk convs (LoCon); 0: they train at rank
    conv_alpha: float = 1.0          # kohya's conv_alpha (0 means alpha = conv_dim)
    gradient_checkpointing: bool = True
    # kohya's recipe; the defaults are today's behaviour (recipe.py has the semantics)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    text_encoder_lr: float = 0.0            # 0: no text-encoder LoRA (kohya: "NO LR skipping")
    ema_decay: float = 0.0                  # 0: off
    save_every_n_steps: int = 0             # 0: off
    sample_every_n_steps: int = 0           # 0: off

    def check(self) -> None:
        for name, (lo, hi) in LIMITS.items():
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise TrainingError(f"{name} = {v} is outside {lo}…{hi}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"optimizer {self.optimizer!r} is not known; choose one of {', '.join(OPTIMIZERS)}")
        loss_fn(self.loss)
        ad.trainable(self.algorithm)
        if not (isinstance(self.conv_dim, int) and 0 <= self.conv_dim <= LIMITS["rank"][1]):
            raise TrainingError(f"conv_dim = {self.conv_dim} is outside 0…{LIMITS['rank'][1]} (0: no conv layers)")
        if not (isinstance(self.conv_alpha, (int, float)) and math.isfinite(self.conv_alpha) and self.conv_alpha >= 0):
            raise TrainingError(f"conv_alpha = {self.conv_alpha} must be ≥ 0 (0 means alpha = conv_dim)")
        for name in ("training_dtype", "lora_dtype"):
            if getattr(self, name) not in DTYPES.values():
                raise TrainingError(f"{name} must be bf16 or fp32, not {getattr(self, name)}")
        recipe.check(self)


# ---- dataset ----------------------------------------------------------------------------------
@dataclass
class Dataset:
    """Samples grouped by shape (buckets), in model space, on the CPU in float32."""
    buckets: list[torch.Tensor]        # each (n, C, ...)
    conds: list[list[int]]             # per bucket: the conditioning index of each sample
    # per conditioning index: (caption, its options) when the data carries captions (our dataset node)
    captions: list[tuple[str, CaptionOptions] | None] | None = None

    @property
    def size(self) -> int:
        return sum(b.shape[0] for b in self.buckets)


def make_dataset(latents: Sequence[torch.Tensor], n_conds: int,
                 process_in: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 captions: Sequence[tuple[str, CaptionOptions] | None] | None = None) -> Dataset:
    """Flatten latent batches of any sizes into samples, bucket them by shape, bring each bucket into
    model space with ``process_in`` (the model's latent format), and pair samples with conditionings:
    one per sample in order, or a single one shared by all. ``captions``: one per conditioning."""
    samples: list[torch.Tensor] = []
    for t in latents:
        if t is None or t.numel() == 0:
            continue
        samples.extend(t.unbind(0) if t.dim() >= 4 else [t])
    if not samples:
        raise TrainingError("no latents to train on: the latents input is empty")
    if n_conds < 1:
        raise TrainingError("no conditioning given: connect one per latent, or one for all")
    if n_conds not in (1, len(samples)):
        raise TrainingError(f"{len(samples)} latents but {n_conds} conditionings: give one conditioning per "
                            "latent (in the same order), or a single one for all")
    by_shape: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        by_shape.setdefault(tuple(s.shape), []).append(i)
    buckets, conds = [], []
    for idx in by_shape.values():
        b = torch.stack([samples[i] for i in idx]).float()
        if process_in is not None:
            b = process_in(b).float()
        buckets.append(b.contiguous())
        conds.append([i if n_conds > 1 else 0 for i in idx])
    if captions is not None and len(captions) != n_conds:
        raise TrainingError(f"{len(captions)} captions for {n_conds} conditionings")
    return Dataset(buckets, conds, list(captions) if captions is not None and any(captions) else None)


# ---- results ------------------------------------------------------------------------------------
class TrainedLoRA(dict):
    """A plain state dict {file key: tensor} (what ComfyUI's LORA_MODEL is), plus ``info`` (what the
    metadata is built from), ``optimizer_state`` (tensors, for resume) and, when the tensors are an
    EMA, ``online_weights`` (the live factors, {file key: tensor}, for resume)."""

    def __init__(self, tensors=(), info: dict | None = None, optimizer_state: dict | None = None,
                 online_weights: dict | None = None):
        super().__init__(tensors)
        self.info = info or {}
        self.optimizer_state = optimizer_state
        self.online_weights = online_weights


@dataclass
class TrainResult:
    lora: TrainedLoRA
    losses: list[float]
    steps: int                 # total, counting the steps of the LoRA resumed from
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)


# ---- small steps --------------------------------------------------------------------------------
def param_table(adapters: dict[str, ad.TrainableAdapter]) -> dict[str, nn.Parameter]:
    """'<module>/<role>' -> parameter, in a fixed order (optimizer state is keyed by these names)."""
    return {f"{name}/{role}": p for name, a in adapters.items() for role, p in a.factors.items()}


def make_optimizer(params: dict[str, nn.Parameter], config: TrainConfig,
                   state: dict[str, torch.Tensor] | None = None,
                   groups: Sequence[tuple[Sequence[str], float]] | None = None) -> torch.optim.Optimizer:
    """The optimizer over ``params``; ``groups``: (parameter names, learning rate) per group, in the
    order of ``params`` (default: one group at the learning rate)."""
    if groups is None:
        opt = OPTIMIZERS[config.optimizer](list(params.values()), lr=config.learning_rate)
    else:
        opt = OPTIMIZERS[config.optimizer]([{"params": [params[n] for n in names], "lr": lr} for names, lr in groups],
                                           lr=config.learning_rate)
    if state:
        load_optimizer_state(opt, params, state)
    return opt


def optimizer_state(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Flat {'<param name>/<state key>': tensor}, CPU copies."""
    out = {}
    for name, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"{name}/{k}"] = v.detach().to("cpu", copy=True)
    return out


def load_optimizer_state(opt, params, state) -> None:
    names = list(params)
    per_param: dict[int, dict] = {}
    for key, v in state.items():
        name, _, k = key.rpartition("/")
        if name not in params:
            raise TrainingError(f"optimizer state names a parameter this LoRA does not have: {name!r}")
        per_param.setdefault(names.index(name), {})[k] = v.clone()   # own copy, made outside inference mode
    sd = opt.state_dict()
    sd["state"] = per_param
    opt.load_state_dict(sd)


def snapshot(adapters: dict[str, ad.TrainableAdapter], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, a in adapters.items():
        out.update(a.state_dict_for(name, dtype))
    return out


def blocks_to_checkpoint(root: nn.Module, targets: dict[str, nn.Module]) -> list[nn.Module]:
    """The model's repeated blocks: items of its top-level ModuleLists, plus other top-level children
    that hold trained layers (e.g. a UNet's middle block). Activations are kept only at their edges."""
    trained = {id(m) for m in targets.values()}
    out = []
    for child in root.children():
        if isinstance(child, nn.ModuleList):
            out.extend(child)
        elif id(child) not in trained and any(id(m) in trained for m in child.modules()):
            out.append(child)
    return out


def _own(value):
    return value.clone() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _owning(fn, *args, **kwargs):
    """``fn`` on its own copy of the tensors it is given: a block that adds residuals in place (Flux's
    ``img += ...``) would otherwise change the inputs checkpointing keeps to recompute it from."""
    return fn(*(_own(a) for a in args), **{k: _own(v) for k, v in kwargs.items()})


@contextlib.contextmanager
def checkpointed(blocks: Iterable[nn.Module]):
    """Recompute each block's activations in the backward pass instead of storing them."""
    saved = []
    for b in blocks:
        saved.append((b, b.__dict__.get("forward")))
        inner = b.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_owning, _inner, *args, use_reentrant=False, **kwargs)
        b.forward = forward
    try:
        yield
    finally:
        for b, prev in saved:
            if prev is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = prev


@contextlib.contextmanager
def copied_norm_inputs(module: nn.Module):
    """Models that add residuals in place after a LayerNorm saved its input for backward (ComfyUI's
    CLIPLayer ``x += self.self_attn(self.layer_norm1(x))``, Flux's and HunyuanVideo's blocks
    ``img += ...``): harmless while frozen, an autograd error once a LoRA inside them trains. While
    gradients are on, each LayerNorm gets a copy of its input, so the tensor it saved is never
    modified (the values computed are the same)."""
    def copy_input(mod, args):
        if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
            return (args[0].clone(), *args[1:])
        return None

    handles = [m.register_forward_pre_hook(copy_input) for m in module.modules() if isinstance(m, nn.LayerNorm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def batches(dataset: Dataset, config: TrainConfig, step: int):
    """(bucket, sample indices, micro) for each micro-batch of global step ``step`` (0-based): the
    global batch, the same in every process. A bucket is chosen in proportion to its size."""
    sizes = torch.tensor([b.shape[0] for b in dataset.buckets], dtype=torch.float64)
    for micro in range(config.grad_accumulation_steps):
        g = torch.Generator().manual_seed(ad.mix(config.seed, step, micro))
        bucket = int(torch.multinomial(sizes, 1, generator=g)) if len(sizes) > 1 else 0
        idx = torch.randperm(int(sizes[bucket]), generator=g)[: config.batch_size]
        yield bucket, idx, micro


def sample_generator(seed: int, step: int, micro: int, position: int) -> torch.Generator:
    """The generator of one sample's σ and noise: from (seed, step, micro-batch, position in the
    global batch), so it is the same whichever process computes the sample."""
    return torch.Generator().manual_seed(ad.mix(seed, step, micro, position, 0x5A4D))


def _device_of(targets: dict[str, nn.Module]) -> torch.device:
    return next(iter(targets.values())).weight.device


# ---- the loop -----------------------------------------------------------------------------------
def train(*, targets: dict[str, nn.Module], denoise: Callable, objective: Objective, dataset: Dataset,
          config: TrainConfig, resume: Resume | None = None, root: nn.Module | None = None,
          checkpoint_blocks: Sequence[nn.Module] | None = None,
          on_step: Callable[[int, int, float], bool | None] | None = None,
          info: dict | None = None, te_targets: dict[str, nn.Module] | None = None, te_root: nn.Module | None = None,
          on_save: Callable[["TrainResult"], None] | None = None,
          on_sample: Callable[[int], None] | None = None, can_encode_text: bool = False,
          world: World = SINGLE) -> TrainResult:
    """Train adapters on ``targets`` for ``config.steps`` optimizer steps; return the LoRA.

    ``root``: the model, frozen for the run (its requires_grad flags are restored after).
    ``checkpoint_blocks``: blocks to recompute in backward when gradient checkpointing is on
    (default: ``blocks_to_checkpoint(root, targets)``).
    ``te_targets`` / ``te_root``: the text encoder's layers and module, trained when
    ``config.text_encoder_lr`` > 0; ``denoise`` then receives ``recipe.StepCaption`` (index, this
    step's caption) instead of conditioning indices (also when captions vary per step and
    ``can_encode_text``).
    ``on_save(result)`` / ``on_sample(step)``: every ``save_every_n_steps`` / ``sample_every_n_steps``.
    ``world``: this process's place in a data-parallel run (distributed.py); every process calls
    ``train`` with the same inputs and gets the same LoRA; only the caller decides who writes files.
    Raises TrainingError for bad inputs, and when the loss or the gradients stop being finite;
    then ``error.result`` is the LoRA as of the last good step.
    """
    # ComfyUI runs nodes under inference_mode; everything trained must be made outside it.
    with torch.inference_mode(False), torch.enable_grad():
        return _train(targets, denoise, objective, dataset, config, resume, root, checkpoint_blocks, on_step, info,
                      _Extras(te_targets or {}, te_root, on_save, on_sample, can_encode_text, world))


@dataclass
class _Extras:
    te_targets: dict
    te_root: nn.Module | None
    on_save: Callable | None
    on_sample: Callable | None
    can_encode_text: bool
    world: World = field(default_factory=World)


def _train(targets, denoise, objective, dataset, config, resume, root, checkpoint_blocks, on_step, info,
           extras: _Extras):
    config.check()
    extras.world.check_batch(config.batch_size)
    if not targets:
        raise TrainingError("the model has no layers to train (no Linear/Conv layers were selected)")
    started = time.time()
    device = _device_of(targets)
    alpha = config.alpha or config.rank          # kohya: network_alpha 0 (or None) means alpha = rank
    adapters = make_adapters(targets, config, alpha, resume)
    notes = list(resume.notes) if resume else []
    te_adapters = recipe.build_text_encoder(extras.te_targets, replace(config, alpha=alpha), resume, notes)
    params = param_table(adapters)
    te_params = param_table(te_adapters)
    all_params = {**params, **te_params}
    opt_state = resume.optimizer_state if resume else None
    if opt_state and resume.optimizer and resume.optimizer != config.optimizer:
        notes.append(f"optimizer state is for {resume.optimizer}, training with {config.optimizer}: starting fresh")
        opt_state = None
    opt = make_optimizer(all_params, config, opt_state, recipe.groups(params, te_params, config))
    base_lrs = [g["lr"] for g in opt.param_groups]
    schedule = recipe.schedule_of(config)
    ema = recipe.make_ema(all_params, config, resume, notes)
    texts = recipe.StepTexts(dataset, config, bool(te_adapters), extras.can_encode_text)
    if texts.skipped:
        notes.append("the captions vary per step (shuffle / dropout), but the train node has no CLIP to encode "
                     "them: trained with the captions as written")
    start_step = resume.steps if resume else 0
    total = start_step + config.steps
    losses: list[float] = []
    done = 0
    interrupted = False
    ctx = contextlib.ExitStack()
    every = {**adapters, **te_adapters}
    kxk = {n: a for n, a in adapters.items() if is_kxk(targets[n])}
    main = {n: a for n, a in adapters.items() if n not in kxk} or adapters

    def result() -> TrainResult:
        first = next(iter(adapters.values()))
        meta = dict(info or {})
        meta.update(
            algorithm=first.name, rank=max(a.rank for a in main.values()), alpha=next(iter(main.values())).alpha,
            has_conv=any(a.op.conv_dims > 0 for a in adapters.values()), steps=start_step + done,
            conv_dim=max((a.rank for a in kxk.values()), default=0) if kxk else None,
            conv_alpha=next(iter(kxk.values())).alpha if kxk else None,
            learning_rate=config.learning_rate, optimizer=config.optimizer, loss=config.loss, seed=config.seed,
            batch_size=config.batch_size, grad_accumulation_steps=config.grad_accumulation_steps,
            gradient_checkpointing=config.gradient_checkpointing, training_dtype=dtype_name(config.training_dtype),
            lora_dtype=dtype_name(config.lora_dtype), num_samples=dataset.size, prediction=objective.prediction,
            started_at=started, finished_at=time.time(), existing_lora=resume.source if resume else None,
            resolution=_resolution(dataset), max_train_steps=total,
        )
        meta.update(recipe.info(config, objective, te_adapters, ema, texts))
        online = snapshot(every, config.lora_dtype) if ema is not None else None
        with recipe.ema_weights(ema, all_params):
            tensors = snapshot(every, config.lora_dtype)
        lora = TrainedLoRA(tensors, meta, optimizer_state(opt, all_params), online)
        return TrainResult(lora, losses, start_step + done, interrupted, notes)

    with ctx:
        for module in (root, extras.te_root if te_adapters else None):
            if module is not None:
                flags = [(p, p.requires_grad) for p in module.parameters()]
                ctx.callback(lambda flags=flags: [p.requires_grad_(f) for p, f in flags])
                module.requires_grad_(False)
        ctx.enter_context(ad.Installed(targets, adapters))
        if te_adapters:
            ctx.enter_context(ad.Installed(extras.te_targets, te_adapters))
        if config.gradient_checkpointing:
            blocks = checkpoint_blocks if checkpoint_blocks is not None else (
                blocks_to_checkpoint(root, targets) if root is not None else [])
            ctx.enter_context(checkpointed(blocks))
        for i in range(config.steps):
            step = start_step + i
            recipe.set_lr(opt, base_lrs, schedule, step, total)
            try:
                loss = train_step(adapters, all_params, opt, dataset, objective, denoise, config, step, device, texts,
                                  extras.world)
            except TrainingError as e:       # keep its kind (distributed.PeerLost) and add the last good state
                e.result = result()
                raise
            if ema is not None:
                ema.update(all_params, step + 1)
            done += 1
            losses.append(loss)
            if extras.on_sample is not None and config.sample_every_n_steps and (step + 1) % config.sample_every_n_steps == 0:
                with recipe.ema_weights(ema, all_params), torch.no_grad():
                    extras.on_sample(step + 1)
            if extras.on_save is not None and config.save_every_n_steps and (step + 1) % config.save_every_n_steps == 0:
                extras.on_save(result())
            if on_step is not None and on_step(i + 1, config.steps, loss):
                interrupted = True
                notes.append(f"interrupted after step {start_step + done}; the LoRA as of that step is returned")
                break
    for a in every.values():
        a.requires_grad_(False)
    return result()


def train_step(adapters, params, opt, dataset: Dataset, objective: Objective, denoise: Callable,
               config: TrainConfig, step: int, device: torch.device, texts=None, world: World = SINGLE) -> float:
    """One optimizer step over ``grad_accumulation_steps`` micro-batches; returns the mean loss.

    Each micro-batch's loss is the mean of its samples' losses; a process computes its share of the
    global batch (``world.part``) and back-propagates Σ(share's losses) / (global batch size), and
    ``world.reduce`` sums gradients and losses over the processes (nothing to do for one process).
    On a non-finite loss or gradient nothing is updated and TrainingError names the step.
    ``texts`` (recipe.StepTexts) turns conditioning indices into this step's captions."""
    opt.zero_grad(set_to_none=True)
    n = config.grad_accumulation_steps
    autocast = torch.autocast(device.type, dtype=config.training_dtype,
                              enabled=config.training_dtype != torch.float32)
    local = torch.zeros(n, dtype=torch.float64)
    for bucket, idx, micro in batches(dataset, config, step):
        share = world.part(config.batch_size, len(idx))
        if not share:
            continue
        sel = idx[share.start: share.stop]
        x0 = dataset.buckets[bucket][sel].to(device)
        x_t, sigma, target = objective.draw(x0, [sample_generator(config.seed, step, micro, p) for p in share])
        conds = [dataset.conds[bucket][k] for k in sel.tolist()]
        if texts is not None:
            conds = texts(conds, step, micro, share)
        with autocast:
            pred = denoise(x_t, sigma, conds)
        loss = objective.sample_losses(pred.float(), target.float(), sigma).sum() / len(idx)
        (loss / n).backward()
        local[micro] = loss.detach().double().cpu()
    losses = world.reduce(params, local, step)
    value = float(losses.mean())
    if not math.isfinite(value):
        opt.zero_grad(set_to_none=True)
        raise TrainingError(f"the loss became {value} at step {step + 1}; training stopped there and the "
                            f"LoRA as of step {step} is kept (lower the learning rate, or train in fp32)")
    grads = [p.grad for p in params.values() if p.grad is not None]
    if grads and not bool(torch.stack(torch._foreach_norm(grads)).float().isfinite().all()):
        opt.zero_grad(set_to_none=True)
        raise TrainingError(f"the gradients became non-finite at step {step + 1}; training stopped there and the "
                            f"LoRA as of step {step} is kept (lower the learning rate, or train in fp32)")
    opt.step()
    return value


def is_kxk(layer: nn.Module) -> bool:
    """A conv layer with a kernel larger than 1x1 (what kohya's conv_dim trains)."""
    op = ad.layer_op(layer)
    return op is not None and op.conv_dims > 0 and any(k != 1 for k in op.shape[2:])


def make_adapters(targets: dict[str, nn.Module], config: TrainConfig, alpha: float,
                  resume: Resume | None) -> dict[str, ad.TrainableAdapter]:
    """Fresh adapters (kxk convs at conv_dim / conv_alpha when conv_dim > 0, the rest at rank / alpha),
    or ``resume``'s, in the order of ``targets``."""
    if resume is not None:
        return ad.create_adapters(targets, config.algorithm, config.rank, alpha, config.seed, config.lora_dtype,
                                  resume.adapters)
    convs = {n: m for n, m in targets.items() if config.conv_dim and is_kxk(m)}
    rest = {n: m for n, m in targets.items() if n not in convs}
    out = ad.create_adapters(rest, config.algorithm, config.rank, alpha, config.seed, config.lora_dtype) if rest else {}
    if convs:
        out.update(ad.create_adapters(convs, config.algorithm, config.conv_dim, config.conv_alpha or config.conv_dim,
                                      config.seed, config.lora_dtype))
    return {n: out[n] for n in targets}


def _resolution(dataset: Dataset) -> str | None:
    """'512x512' of the largest bucket (latent size × 8), for modelspec.resolution."""
    b = max(dataset.buckets, key=lambda t: t.shape[0])
    if b.dim() != 4:
        return None
    return f"{b.shape[-1] * 8}x{b.shape[-2] * 8}"


__all__ = ["DTYPES", "OPTIMIZERS", "Dataset", "TrainConfig", "TrainResult", "TrainedLoRA", "asdict",
           "blocks_to_checkpoint", "checkpointed", "copied_norm_inputs", "is_kxk", "make_adapters", "make_dataset", "sample_generator",
           "train", "train_step"]
