"""Which slug file a path given where a model is expected is (``slug apply``/``revert --checkpoint``,
``--pretrained``): a patch's tensor file, a gradients file, a LoRA — read from the safetensors header alone."""

from __future__ import annotations


def is_patch_file(path) -> bool:
    """Whether ``path`` is a ``patch.safetensors``: every tensor named ``original/…`` or ``patched/…`` (read from
    the header alone; False for anything that is not a readable safetensors file)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception:
        return False
    return bool(keys) and all(k.startswith(("original/", "patched/")) for k in keys)


def other_file_of_ours(path) -> str | None:
    """What slug file that is no model ``path`` is (a ``slug grads`` gradients file, a LoRA ``slug export --lora``
    wrote), from its header; None for anything else."""
    import json

    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return None
    try:
        fmt = str((json.loads(meta.get("slugkit", "{}")) or {}).get("format", ""))
    except (ValueError, AttributeError):
        fmt = ""
    if fmt.startswith("slugkit-gradients"):
        return "a gradients file `slug grads` (or --save-gradients) wrote (it goes in `slug unlearn --gradients`)"
    if meta.get("slugkit.format") == '"slugkit-lora"':
        return "a LoRA `slug export --lora` wrote (diffusers' load_lora_weights reads it)"
    return None
