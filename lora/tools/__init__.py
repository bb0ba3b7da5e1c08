"""LoRA tools: rewrite LoRA files (convert, merge, resize), make them (extract) and describe them
(inspect). Core only: plain torch + safetensors, no ComfyUI import; nodes/tools.py and
scripts/loratool.py are thin callers of these functions."""
