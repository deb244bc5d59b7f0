"""Reading weights files and fitting them to a model, with errors that name the file and the keys.

Every loader of official weights (extractors, models) raises `WeightsError` for a file it cannot
read or that does not match the architecture; the message says which file and which keys/shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.errors import VmrError

if TYPE_CHECKING:  # torch is imported where it is used: extractors' modules must import without it
    import torch


class WeightsError(VmrError, ValueError):
    """A weights file is unreadable or does not match the architecture (names file and keys)."""


def check_state_dict(model: torch.nn.Module, state: dict, path: str, *, strict: bool = True,
                     assign: bool = False) -> None:
    """load_state_dict with an error that names the file and the mismatching keys and shapes.
    `assign=True` makes the file's tensors the model's (a model built on the meta device has none)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    problems = []
    if missing and strict:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch {_few(wrong)}")
    if problems:
        raise WeightsError(f"{path}: does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=strict, assign=assign)


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)})"


def torch_load(path: str) -> object:
    """Read a torch checkpoint (pickle or zip) on the CPU, with a clear error if it is not one."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise WeightsError(f"{path}: not a readable torch checkpoint ({short_reason(e)})") from None


def short_reason(e: BaseException) -> str:
    """One line for an exception: torch's weights-only errors bury the cause in a page of advice."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def unwrap_state_dict(obj: object, path: str, keys: tuple[str, ...] = ("state_dict", "model_state", "model")) -> dict:
    """The tensor dict inside common checkpoint wrappers ({'state_dict': ...}, DataParallel 'module.')."""
    import torch

    for k in keys:
        if isinstance(obj, dict) and k in obj and isinstance(obj[k], dict):
            obj = obj[k]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj
