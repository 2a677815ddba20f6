"""Checkpoints: one format, written atomically, that stays readable by the paper's code.

A checkpoint is a dict. The paper's code wrote and read exactly two keys, which we keep:
    model_state_dict   the JEM module's state dict (keys `f.*`, `energy_output.*`, `class_output.*`)
    replay_buffer      FloatTensor (buffer_size, 3, 32, 32), on the CPU
This project adds `format_version`, `args` (the run's flags), and for resuming `optimizer_state_dict`,
`epoch`, `iteration` and `best_valid_acc`. Files from the paper's code (two keys only) load as they are.
"""
import os
import random
import re

import numpy as np
import torch

from utils import UserError

FORMAT_VERSION = 1


def write_checkpoint(path, state):
    """Write atomically: a crash mid-write never leaves a truncated file under `path`."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_state(model_state_dict, buffer_images, **extra):
    """A checkpoint dict in this project's format: the paper's two keys, the format version, extras."""
    return {"format_version": FORMAT_VERSION, "model_state_dict": model_state_dict,
            "replay_buffer": buffer_images.detach().cpu(), **extra}


def load_checkpoint(path):
    """The checkpoint dict, on the CPU; a missing or foreign file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at --load_path {path}")
    try:
        # weights_only=False: project checkpoints hold the run's args (plain Python values) too.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})")
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise UserError(f"{path} is not a JEM checkpoint: expected a dict with 'model_state_dict' "
                        "(and 'replay_buffer'), as written by this project or the paper's code")
    return ckpt


def describe_state_dict(state_dict):
    """Depth, width and n_classes of the network a JEM state dict was saved from (None if unknown)."""
    try:
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"f\.layer1\.(\d+)\.", k))}
        width = state_dict["f.layer1.0.conv1.weight"].shape[0] // 16
        n_classes = state_dict["class_output.weight"].shape[0]
    except (KeyError, AttributeError, IndexError):
        return None
    return {"depth": 6 * len(blocks) + 4, "width": width, "n_classes": n_classes}


def load_model_state(model, state_dict, path):
    """Strict load; a checkpoint of another architecture gets one line that says what to pass."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        found = describe_state_dict(state_dict)
        hint = (f"it holds a WRN-{found['depth']}-{found['width']} with {found['n_classes']} classes; pass "
                f"--depth {found['depth']} --width {found['width']} and the --norm it was trained with"
                if found else "its keys are not those of a JEM Wide-ResNet")
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"checkpoint {path} does not fit this model: {hint} ({detail})")


def rng_states():
    """Every random-number state a training iteration draws from, to resume a run exactly."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states):
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def find_resume_checkpoint(path):
    """`--resume` takes a checkpoint file or a run's save dir (then its last_ckpt.pt)."""
    candidate = os.path.join(path, "last_ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise UserError(f"--resume {path}: no checkpoint there (a run's save dir holds last_ckpt.pt)")
    return candidate
