"""The one tolerance table. Every numeric comparison in the suite takes its bound from here.

rel  = max|a - b| / max|b|   (max relative error, as the issues specify it)
Values are the loosest error the comparison may show; each says why it is not zero.
"""
import torch

TOL = {
    # Same formula, same fp32 ops, different order of summation (matmul blocking, einsum paths).
    "fp32": 1e-6,
    # ComfyUI core vs LoRA Lab on the same file, fp32 checkpoint (the bar).
    "core_parity_fp32": 1e-6,
    # Results rounded once to half precision: one ulp of fp16 / bf16 at |w| ~ 1.
    "fp16": 1e-3,
    "bf16": 8e-3,
    # Bypass (forward-pass) vs merged weights: different summation order of the same products.
    "bypass_fp32": 1e-5,
    "bypass_fp16": 2e-3,
    "bypass_bf16": 2e-2,
    # Cross-checks against producing libraries (lycoris-lora, PEFT): their fp32 math vs ours.
    "reference_fp32": 1e-5,
    # One network written twice, ComfyUI's and diffusers' (testkit/loralab_testkit/families.py twins): other
    # attention kernels, rope and norm op order, fp32; seen up to 7e-6 (Z-Image) on the tiny models.
    "twin_forward_fp32": 3e-5,
    # LoRA tools (lora/tools): an fp32 SVD (QR core of factors, Gram eigendecomposition) against
    # LAPACK's in float64: rounding of the products, seen up to 2e-6 on the test matrices.
    "svd_fp32": 1e-5,
    # SVD merge / resize error against the optimal truncated-SVD error (the bar, relative).
    "eckart_young": 1e-4,
    # Extract of base + a known rank-r LoRA at rank r: ΔW back from an fp32 difference of two fp32
    # models (the bar; the difference itself is rounded once, ~1e-7 of the weights).
    "extract_fp32": 1e-5,
    # Data-parallel training (training/distributed.py) vs one process, fp32, per trained tensor after a
    # few steps: the gradient is summed over processes instead of over the batch inside one matmul.
    # With SGD that is all (seen ~1e-6 on the tiny SD3 after 3 steps). AdamW divides each gradient
    # element by its own running magnitude (+ eps 1e-8): elements whose gradient is a cancellation
    # residue near eps keep the reduction-order error in their update; seen up to 7e-4.
    "distributed_sgd_fp32": 1e-5,
    "distributed_adamw_fp32": 5e-3,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def tol_for(dtype: torch.dtype, kind: str = "") -> float:
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return TOL[f"{kind}_{name}" if kind else name]
