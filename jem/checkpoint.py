"""Checkpoints: one format, written atomically, that stays readable by the paper's code.

A checkpoint is a dict. The paper's code wrote and read exactly two keys, which we keep:
    model_state_dict   the JEM module's state dict (keys `f.*`, `energy_output.*`, `class_output.*`)
    replay_buffer      FloatTensor (buffer_size, 3, 32, 32), on the CPU
This project adds `format_version`, `args` (the run's flags), and for resuming
`optimizer_state_dict`, `epoch`, `iteration` and `best_valid_acc`. Files from the paper's code (two
keys only) load as they are.

Checkpoints are data, not code: they hold only tensors and plain Python values, so they load with
`torch.load(path, weights_only=True)` (torch's default since 2.6), which cannot run code hidden in a
file. Format 1 held numpy's RNG state as a pickled array; such files are refused with a line that
says how to convert one you trust (`scripts/convert_checkpoint.py`).
"""
import os
import pickle
import random
import re

import numpy as np
import torch

from jem.errors import UserError

FORMAT_VERSION = 2  # 1: held pickled numpy objects; 2: tensors and plain Python values only
CONVERTER = "scripts/convert_checkpoint.py"
YOPO_ALIASES = (
    "f.layer_one.",
    "f.other_layers.",
)  # JEM++'s second names for tensors of the paper's layout


def write_checkpoint(path, state):
    """Write atomically: a crash mid-write never leaves a truncated file under `path`."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_state(model_state_dict, buffer_images, **extra):
    """A checkpoint dict in this project's format: the paper's two keys, the format version,
    extras."""
    # copy=True: on a CPU `.cpu()` would share storage with the live buffer, which later chains
    # overwrite.
    return {"format_version": FORMAT_VERSION, "model_state_dict": model_state_dict,
            "replay_buffer": buffer_images.detach().to("cpu", copy=True), **extra}


def require_checkpoint_file(path):
    """The checkpoint file --load_path names: the file itself, or a run's save dir's last_ckpt.pt
    (as --resume takes). A missing one is a UserError; the scripts check it before they make their
    save dir."""
    candidate = os.path.join(path, "last_ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        held = " (a folder without last_ckpt.pt)" if os.path.isdir(path) else ""
        raise UserError(f"no checkpoint at --load_path {path}{held}: pass a checkpoint file, or a "
                        "run's save dir that holds last_ckpt.pt")
    return candidate


def load_checkpoint(path):
    """The checkpoint dict, on the CPU, of a file or of a run's save dir (its last_ckpt.pt); a
    missing or foreign file is a UserError."""
    path = require_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise UserError(f"{path} is not a readable PyTorch checkpoint (UnpicklingError: {e})")
        raise UserError(f"{path} holds Python objects besides tensors and plain values (a "
                        "checkpoint of an earlier version of this project?), and unpickling them "
                        "could run code; if you trust the file, rewrite it once in the safe "
                        f"format: python {CONVERTER} {path} NEW.pt")
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})")
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise UserError(f"{path} is not a JEM checkpoint: expected a dict with 'model_state_dict' "
                        "(and 'replay_buffer'), as written by this project or the paper's code")
    version = ckpt.get("format_version", FORMAT_VERSION)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UserError(f"{path} is a checkpoint of format {version}, written by a newer version "
                        f"of this project; this one reads formats up to {FORMAT_VERSION}: update "
                        "the project to read it")
    return ckpt


def describe_state_dict(state_dict):
    """Depth, width and n_classes of the network a JEM state dict was saved from (None if unknown),
    and its norm where the keys tell it: batch (running statistics), act (loc and scale) or none (no
    norm layers); instance and layer norm hold the same keys, so the norm of such a file is left
    out."""
    try:
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"f\.layer1\.(\d+)\.", k))}
        width = state_dict["f.layer1.0.conv1.weight"].shape[0] // 16
        n_classes = state_dict["class_output.weight"].shape[0]
    except (KeyError, AttributeError, IndexError):
        return None
    description = {"depth": 6 * len(blocks) + 4, "width": width, "n_classes": n_classes}
    norm_keys = {k.rsplit(".", 1)[1] for k in state_dict if k.startswith("f.bn1.")}
    if "running_mean" in norm_keys:
        description["norm"] = "batch"
    elif "loc" in norm_keys:
        description["norm"] = "act"
    elif not norm_keys:
        description["norm"] = None
    return description


def network_name(description):
    depth, width, n_classes = (description[k] for k in ("depth", "width", "n_classes"))
    return f"a WRN-{depth}-{width} with {n_classes} classes"


def state_dict_mismatch(expected, found):
    """How a state dict differs from the expected one, in a few words: counts and the first key of
    each kind."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    reshaped = [
        k for k in expected if k in found and getattr(found[k], "shape", None) != expected[k].shape
    ]
    return "; ".join(
        f"{len(keys)} {what}, first {keys[0]}"
        for keys, what in (
            (missing, "keys missing from the file"),
            (extra, "keys this model lacks"),
            (reshaped, "of another shape"),
        )
        if keys
    )


def in_paper_layout(state_dict, model):
    """A state dict of JEM++'s or SADA-JEM's code in the paper's layout, which `model` holds.

    Their Wide-ResNets drop the paper's unused `f.linear`, and JEM++'s "yopo" network registers its
    first convolution and its stages a second time (`f.layer_one.*`, `f.other_layers.*`, the same
    tensors under other names). The aliases are dropped and a missing `f.linear` is taken from
    `model` (it never enters a score); any other difference is left for the strict load to report.
    """
    state = {k: v for k, v in state_dict.items() if not k.startswith(YOPO_ALIASES)}
    linear = {k: v for k, v in model.state_dict().items() if k.startswith("f.linear.")}
    if "f.conv1.weight" in state and not any(k in state for k in linear):
        state.update(linear)
    return state


def load_model_state(model, state_dict, path):
    """Strict load (of the paper's layout, or JEM++'s and SADA-JEM's: see in_paper_layout); a
    checkpoint of another architecture gets one short line that says what to pass."""
    state_dict = in_paper_layout(state_dict, model)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError:
        expected = model.state_dict()
        raise UserError(
            f"checkpoint {path} does not fit this model: {what_it_holds(state_dict)}, "
            f"this model is {network_name(describe_state_dict(expected))} "
            f"({state_dict_mismatch(expected, state_dict)}){flags_that_fit(state_dict, expected)}"
        ) from None


def what_it_holds(state_dict):
    found = describe_state_dict(state_dict)
    return f"it holds {network_name(found)}" if found else \
        f"it holds {len(state_dict)} tensors that are not a JEM Wide-ResNet's"


def flags_that_fit(state_dict, expected):
    """'; pass ...': the flags that build the file's network, as far as its keys tell them."""
    found, wanted = describe_state_dict(state_dict), describe_state_dict(expected)
    if found is None:
        return ""
    norm = (
        f"--norm {found['norm'] or 'none'}" if "norm" in found else "the --norm it was trained with"
    )
    if (found["depth"], found["width"]) != (wanted["depth"], wanted["width"]):
        return f"; pass --depth {found['depth']} --width {found['width']} and {norm}"
    if found["n_classes"] != wanted["n_classes"]:
        n_classes = found["n_classes"]
        return f"; it classifies {n_classes} classes: use it with a data set of {n_classes} classes"
    return f"; pass {norm}"


def rng_states():
    """Every random-number state a training iteration draws from, to resume a run exactly.

    Tensors and plain values only (Python's own state is a tuple of ints already).
    """
    states = {"torch": torch.get_rng_state(), "numpy": plain_numpy_state(np.random.get_state()),
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def plain_numpy_state(state):
    """numpy's legacy RNG state (name, uint32 key array, position, has_gauss, cached_gaussian) as
    plain values."""
    name, key, position, has_gauss, cached_gaussian = state
    return {"bit_generator": name, "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(position), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian)}


def numpy_state(plain):
    return (plain["bit_generator"], plain["key"].numpy().astype(np.uint32), plain["pos"],
            plain["has_gauss"], plain["cached_gaussian"])


def restore_rng_states(states):
    torch.set_rng_state(states["torch"])
    np.random.set_state(numpy_state(states["numpy"]))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def find_resume_checkpoint(path):
    """`--resume` takes a checkpoint file or a run's save dir (then its last_ckpt.pt)."""
    candidate = os.path.join(path, "last_ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise UserError(f"--resume {path}: no checkpoint there (a run's save dir holds "
                        "last_ckpt.pt)")
    return candidate


def convert_trusted_checkpoint(old_path, new_path):
    """Rewrite a checkpoint of format 1 (pickled numpy RNG state) in the current, safe format.

    Reading the old file unpickles it fully, which can run code hidden in it: only for files you
    trust.
    """
    if not os.path.isfile(old_path):
        raise UserError(f"no checkpoint at {old_path}")
    try:
        ckpt = torch.load(old_path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise UserError(
            f"{old_path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})"
        )
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise UserError(f"{old_path} is not a JEM checkpoint (no 'model_state_dict'); nothing to "
                        "convert")
    ckpt["format_version"] = FORMAT_VERSION
    if "rng_states" in ckpt:  # one dict per process of the run that wrote it
        ckpt["rng_states"] = [
            {**states, "numpy": plain_numpy_state(states["numpy"])}
            if isinstance(states["numpy"], tuple)
            else states
            for states in ckpt["rng_states"]
        ]
    write_checkpoint(new_path, ckpt)
    return load_checkpoint(new_path)  # proves that the new file loads without unpickling code


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
