"""Evaluate a trained JEM: the paper's classification, OOD, histogram and sampling experiments, and
calibration.

Loads a checkpoint of this project or of the paper's code (the released CIFAR-10 model included, no
conversion) and writes `<mode>.json` (its numbers and the arguments used) and its figures into
--save_dir. The paper's command lines:

    python eval_wrn_ebm.py --load_path MODEL.pt --eval test_clf --dataset cifar_test
    python eval_wrn_ebm.py --load_path MODEL.pt --eval OOD --ood_dataset cifar_100 --score_fn px
    python eval_wrn_ebm.py --load_path MODEL.pt --eval logp_hist --datasets cifar10 svhn \
        --save_dir DIR
    python eval_wrn_ebm.py --load_path MODEL.pt --eval uncond_samples --save_dir DIR \
        --n_sample_steps 1000 --buffer_size 10000 --n_steps 40 --print_every 100 --reinit_freq 0.05
    python eval_wrn_ebm.py --load_path MODEL.pt --eval cond_samples --save_dir DIR
    python eval_wrn_ebm.py --load_path MODEL.pt --eval cond_samples --save_dir DIR \
        --n_sample_steps 1000 --buffer_size 10000 --n_steps 40 --print_every 10 --reinit_freq 0.05 \
        --fresh_samples
    python eval_wrn_ebm.py --load_path MODEL.pt --eval calibration --dataset cifar100_test \
        --save_dir DIR

Inception Score and FID of the checkpoint's replay buffer against CIFAR-10 train
(docs/sample-quality.md):

    python eval_wrn_ebm.py --load_path MODEL.pt --eval sample_quality --save_dir DIR

Offline, on the training quickstart's checkpoint (no download):

    python eval_wrn_ebm.py --load_path runs/quickstart/last_ckpt.pt --eval OOD --dataset synthetic \
        --ood_dataset cifar_interp --save_dir runs/quickstart/eval

Every mode is one function `mode(args, model, replay_buffer, device) -> dict of results`, chosen
from MODES.
"""
import os
import re

import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm import tqdm

from jem.chain_init import IMAGE_SHAPE
from jem.checkpoint import describe_state_dict, load_checkpoint, load_model_state, seed_everything
from jem.data import loader_workers, make_loader
from jem.errors import UserError
from jem.eval.attack import run_attack
from jem.eval.datasets import check_labeled, load_eval_dataset, one_size_batches
from jem.eval.metrics import (ECE_BINS, HISTOGRAM_LABELS, SCORES, expected_calibration_error,
                              histogram_values, ood_metrics)
from jem.eval.plots import save_grid, save_histograms, save_reliability_diagram, short_names
from jem.eval.sample_quality import (INCEPTION_BATCH_SIZE, Inception, dataset_batches,
                                     load_buffer_file, load_reference, score_sample_quality,
                                     tensor_batches)
from jem.eval.sampling import (chains_as_trained, class_names, classify_images, sample_fresh_buffer,
                               save_buffer, save_class_grids)
from jem.flags.common import flags_given
from jem.flags.evaluate import (FROM_CHECKPOINT, MODE_NAMES, MODEL_FLAGS, PAPER_MODEL,
                                attack_settings, build_parser, chain_settings, check_args,
                                describe_sampler, sample_as_trained, sampling_settings)
# the script's command line, as tests and docs read it
from jem.flags.evaluate import EVAL_FLAG_RANGES, parse_args  # noqa: F401
from jem.model import ModelSettings, build_model
from jem.run.device import autocast, describe_hardware, resolve_amp, select_device
from jem.run.log import RunLog, summary_line, write_json
from jem.sampler import ReplayBuffer, sgld
from utils import run_cli, save_dir_removed_on_failure

EVAL_BATCH_SIZE = 100  # images per batch when scoring a data set (the paper's eval loaders)


# --------------------------------------------------------------------------------------------------
# The model and its replay buffer, from a checkpoint.

def resolve_model_flags(args, ckpt):
    """Model flags not given on the command line: from the checkpoint's stored arguments, then the
    shapes of its weights (depth, width, classes), then the paper's defaults. Sets args.n_classes
    too."""
    stored = ckpt.get("args")
    stored = {k: stored[k] for k in PAPER_MODEL if k in stored} if isinstance(stored, dict) else {}
    found = {**PAPER_MODEL, **stored, **(describe_state_dict(ckpt["model_state_dict"]) or {})}
    for flag in MODEL_FLAGS:
        if getattr(args, flag) is FROM_CHECKPOINT:
            setattr(args, flag, found[flag])
    args.n_classes = found["n_classes"]


def replay_buffer_from(ckpt, args, device):
    """The checkpoint's replay buffer, or a fresh uniform one of --buffer_size when it has none."""
    images = ckpt.get("replay_buffer")
    is_buffer = torch.is_tensor(images) and tuple(images.shape[1:]) == IMAGE_SHAPE
    if images is not None and not is_buffer:
        raise UserError(f"{args.load_path}: its replay_buffer should be a tensor of shape (N, 3, "
                        "32, 32)")
    if images is None or len(images) == 0:
        return ReplayBuffer(args.buffer_size, args.n_classes, args.reinit_freq, device)
    return ReplayBuffer(0, args.n_classes, args.reinit_freq, device, images=images.float())


def load_jem(args, device, given=()):
    """(model in eval mode on device, replay buffer) from --load_path; fills in the model flags, and
    the sampler flags not `given` on the command line (sample_as_trained)."""
    ckpt = load_checkpoint(args.load_path)
    if not isinstance(ckpt["model_state_dict"], dict):
        raise UserError(f"{args.load_path}: model_state_dict is not a state dict")
    resolve_model_flags(args, ckpt)
    sample_as_trained(args, ckpt, given)
    model = build_model(ModelSettings(args.depth, args.width, args.norm, n_classes=args.n_classes,
                                      uncond=args.uncond))
    load_model_state(model, ckpt["model_state_dict"], args.load_path)
    model.requires_grad_(False)  # evaluation differentiates with respect to inputs only
    model = model.to(device).eval()
    if args.compile:
        model.f.compile()  # in place, so the module names stay those of the checkpoint
    return model, replay_buffer_from(ckpt, args, device)


# --------------------------------------------------------------------------------------------------
# Data.

def dataset_named(args, name, labeled=False):
    """A data set by any evaluation name; `labeled` checks its labels are classes of the model."""
    dataset = load_eval_dataset(name, args.data_root, args.sigma, args.celeba_root,
                                interp_of=args.dataset)
    if len(dataset) == 0:
        raise UserError(f"data set {name} holds no images")
    if labeled:
        check_labeled(dataset, args.n_classes, name, f"--eval {args.eval}")
    if args.max_images is not None:
        dataset = Subset(dataset, range(min(args.max_images, len(dataset))))
    return dataset


def batches(args, dataset, device, desc):
    """(x, y) on the device, in batches of EVAL_BATCH_SIZE, with a progress bar; a folder of images
    that the resize leaves of different sizes is one line naming the first odd file."""
    loader = make_loader(dataset, EVAL_BATCH_SIZE, False, device,
                         loader_workers(args.n_workers, device))
    for x, y in tqdm(one_size_batches(loader), desc=desc, total=len(loader), leave=False,
                     disable=args.print_to_log):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------------
# Scores and metrics.


def score_dataset(args, model, device, dataset, name):
    """The --score_fn score of every image of a data set, as a CPU float tensor."""
    score_fn = SCORES[args.score_fn]
    images = batches(args, dataset, device, name)
    scores = torch.cat([score_fn(model, x).float() for x, _ in images]).cpu()
    if not torch.isfinite(scores).all():
        raise UserError(f"the {args.score_fn} scores of {name} are not all finite: the model's "
                        "energies overflow (a diverged checkpoint?)")
    return scores


# --------------------------------------------------------------------------------------------------
# Classification modes.

def classify_dataset(args, model, device):
    """Logits and labels of every image of --dataset; with --n_steps > 0 the images first take that
    many steps on log p(x), the paper's test-time refinement (with the model's own sampler,
    jem/flags/evaluate.py)."""
    logits, labels = [], []
    dataset = dataset_named(args, args.dataset, labeled=True)
    for x, y in batches(args, dataset, device, args.dataset):
        if args.n_steps > 0:
            chain = chain_settings(args)
            with chains_as_trained(model, chain):
                x = sgld(model, x, chain)
        with torch.no_grad():
            logits.append(model.classify(x).float())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def test_clf(args, model, replay_buffer, device):
    """Accuracy and mean cross-entropy; per-example losses, correctness and max p(y|x) go to
    vals.pt."""
    logits, labels = classify_dataset(args, model, device)
    losses = F.cross_entropy(logits, labels, reduction="none")
    corrects = (logits.argmax(1) == labels).float()
    pys = logits.softmax(1).max(1).values
    path = os.path.join(args.save_dir, "vals.pt")
    torch.save({"losses": losses.cpu(), "corrects": corrects.cpu(), "pys": pys.cpu()}, path)
    return {"dataset": args.dataset, "accuracy": corrects.mean().item(),
            "loss": losses.mean().item(),
            "n_images": len(labels), "vals": path}


def calibration(args, model, replay_buffer, device):
    """Expected calibration error of max p(y|x) over 15 bins, and the reliability diagram."""
    logits, labels = classify_dataset(args, model, device)
    confidence, predicted = logits.softmax(1).max(1)
    correct = (predicted == labels).cpu().numpy()
    ece, bins = expected_calibration_error(confidence.cpu().numpy(), correct)
    path = os.path.join(args.save_dir, "reliability_diagram.png")
    save_reliability_diagram(path, [b["lower"] for b in bins], [b["upper"] for b in bins],
                             [b["accuracy"] for b in bins], ece,
                             title=short_names([args.dataset])[args.dataset],
                             bin_count=[b["count"] for b in bins])
    return {"dataset": args.dataset, "ece": ece, "accuracy": float(correct.mean()),
            "n_images": len(labels),
            "n_bins": ECE_BINS, "figure": path, "bins": bins}


# --------------------------------------------------------------------------------------------------
# Density modes.

def ood(args, model, replay_buffer, device):
    """How well --score_fn tells --dataset (in-distribution) from --ood_dataset."""
    # fail early
    in_set, out_set = (dataset_named(args, name) for name in (args.dataset, args.ood_dataset))
    in_scores = score_dataset(args, model, device, in_set, args.dataset)
    out_scores = score_dataset(args, model, device, out_set, args.ood_dataset)
    return {"score_fn": args.score_fn, "dataset": args.dataset, "ood_dataset": args.ood_dataset,
            **ood_metrics(in_scores, out_scores), "n_in": len(in_scores), "n_out": len(out_scores),
            "mean_score_in": in_scores.mean().item(), "mean_score_out": out_scores.mean().item()}


def logp_hist(args, model, replay_buffer, device):
    """Overlaid normalised histograms of --score_fn, one per --datasets entry (PNG and PDF)."""
    # all found before any is scored
    datasets = {name: dataset_named(args, name) for name in args.datasets}
    scores = {name: score_dataset(args, model, device, dataset,
                                  name).numpy() for name, dataset in datasets.items()}
    plotted = {name: histogram_values(args.score_fn, s) for name, s in scores.items()}
    legend = short_names(plotted)
    figures = save_histograms(os.path.join(args.save_dir, "logp_hist"),
                              {legend[name]: s for name, s in plotted.items()},
                              HISTOGRAM_LABELS[args.score_fn])
    return {"score_fn": args.score_fn,
            **{f"mean_{legend[name]}": float(s.mean()) for name, s in plotted.items()},
            "figures": figures,
            "datasets": {name: {"n_images": len(s), "mean": float(s.mean()), "std": float(s.std())}
                         for name, s in plotted.items()}}


# --------------------------------------------------------------------------------------------------
# Sampling modes (jem/eval/sampling.py): chains as the model was trained (jem/flags/evaluate.py).

def uncond_samples(args, model, replay_buffer, device):
    """Unconditional samples from a fresh buffer; the final buffer and a grid of its first 100."""
    fresh, grids = sample_fresh_buffer(model, sampling_settings(args), device,
                                       os.path.join(args.save_dir, "uncond_samples"))
    final_grid = os.path.join(args.save_dir, "uncond_samples_final.png")
    save_grid(final_grid, fresh.images[:100])
    return {"n_samples": len(fresh), "grids": grids, "final_grid": final_grid,
            "buffer": save_buffer(buffer_path(args), fresh.images)}


def cond_samples(args, model, replay_buffer, device):
    """Classify every buffer image and save grids with one row per predicted class (the
    best-ranked --n_grids grids); the classified buffer too with --save_buffer.

    The buffer is the checkpoint's or, with --fresh_samples, a new one as uncond_samples samples.
    """
    if args.fresh_samples:
        replay_buffer, _ = sample_fresh_buffer(model, sampling_settings(args), device,
                                               os.path.join(args.save_dir, "uncond_samples"))
    elif len(replay_buffer) == 0:
        raise UserError(f"{args.load_path} has no replay buffer: sample one with --fresh_samples "
                        "--buffer_size N --n_steps T")
    predicted, scores = classify_images(model, replay_buffer.images)
    training_set = (args.training_data or {}).get("dataset", args.dataset)
    names = class_names(training_set, args.n_classes)
    grids = save_class_grids(replay_buffer.images, predicted, scores, names, args.n_grids,
                             args.save_dir)
    buffer = None
    if args.save_buffer:
        buffer = save_buffer(buffer_path(args), replay_buffer.images,
                             predicted_class=predicted.cpu(), score=scores.cpu())
    return {"buffer_source": "fresh" if args.fresh_samples else "checkpoint",
            "n_samples": len(replay_buffer), "class_names": names,
            "class_counts": torch.bincount(predicted, minlength=args.n_classes).tolist(),
            "grids": grids, "buffer": buffer}


def buffer_path(args):
    return os.path.join(args.save_dir, f"{args.eval}_buffer.pt")


def attack(args, model, replay_buffer, device):
    """Robust accuracy of the SGLD-refined classifier under PGD (jem/eval/attack.py)."""
    return run_attack(attack_settings(args), model, device)


# --------------------------------------------------------------------------------------------------
# Sample quality.

def samples_to_score(args, replay_buffer):
    """(uint8 batches, count) of the --samples images."""
    if args.samples == "buffer":
        if len(replay_buffer) == 0:
            raise UserError(f"{args.load_path} has no replay buffer: pass --samples with a "
                            "<mode>_buffer.pt of uncond_samples / cond_samples or an image folder")
        images = replay_buffer.images
    elif os.path.isfile(args.samples):
        images = load_buffer_file(args.samples)
    else:
        dataset = load_eval_dataset(args.samples, args.data_root, 0.0, args.celeba_root,
                                    normalize=False)
        return dataset_batches(dataset), len(dataset)
    return tensor_batches(images), len(images)


def sample_quality(args, model, replay_buffer, device):
    """Inception Score, FID and KID of --samples against --fid_reference (reference statistics
    cached)."""
    inception = Inception(args.inception_weights, device)  # resolved by check_args
    sample_batches, n_samples = samples_to_score(args, replay_buffer)
    reference = load_reference(inception, args.fid_reference, args.data_root, args.fid_cache,
                               args.celeba_root,
                               args.max_images, quiet=args.print_to_log)
    pool, logits = inception.features(sample_batches, total=-(-n_samples // INCEPTION_BATCH_SIZE),
                                      desc="samples",
                                      quiet=args.print_to_log)
    return {**score_sample_quality(pool, logits, reference, args.is_splits), "n_samples": len(pool),
            "samples": args.samples, "reference": args.fid_reference,
            "n_reference": reference["n_images"],
            "is_splits": args.is_splits, "reference_cache": reference["cache"],
            "reference_cache_hit": reference["cache_hit"],
            "inception_weights": inception.weights_path,
            "inception_weights_sha256": inception.weights_sha256}


MODES = {  # the choices of --eval (MODE_NAMES)
    "test_clf": test_clf,
    "OOD": ood,
    "logp_hist": logp_hist,
    "uncond_samples": uncond_samples,
    "cond_samples": cond_samples,
    "calibration": calibration,
    "attack": attack,
    "sample_quality": sample_quality,
}
assert set(MODES) == set(MODE_NAMES), "the modes --eval offers (jem/flags/evaluate.py)"


# --------------------------------------------------------------------------------------------------


def result_files(args):
    """The JSON files a mode writes its results to: <mode>.json, and for OOD also one named by its
    score and OOD set, so that runs of other --score_fn or --ood_dataset in one save dir keep theirs
    (OOD.json holds the last run, what the study scripts read)."""
    if args.eval == "OOD":
        ood_set = re.sub(r"[^\w.-]+", "_", short_names([args.ood_dataset])[args.ood_dataset])
        return ["OOD.json", f"OOD_{args.score_fn}_{ood_set}.json"]
    return [f"{args.eval}.json"]


def main(argv=None):
    parser = build_parser()
    args, given = parser.parse_args(argv), flags_given(parser, argv)
    check_args(args)
    # a failed evaluation leaves no new folder behind, even one holding the log of its start
    with save_dir_removed_on_failure(args.save_dir, scratch=("log.txt", "metrics.jsonl")):
        return evaluate(args, given)


def evaluate(args, given):
    device = select_device(args.device)
    args.device = str(device)
    seed_everything(args.seed)

    # append: the dir may hold a training log
    log = RunLog(args.save_dir, quiet=args.print_to_log, append=True)
    try:
        return run_mode(args, given, device, log)
    finally:
        log.close()


def run_mode(args, given, device, log):
    args.amp = resolve_amp(args.amp, device, log.line)
    args.hardware = describe_hardware(device)
    if args.load_path is None:  # sample_quality of a file or a folder: no model (check_args)
        model, replay_buffer = None, None
        log.line(f"{args.eval}: {args.samples} on {device}")
    else:
        model, replay_buffer = load_jem(args, device, given)
        log.line(f"{args.eval}: WRN-{args.depth}-{args.width} ({args.n_classes} classes, norm "
                 f"{args.norm}{', uncond' if args.uncond else ''}) from {args.load_path} on "
                 f"{device}; sampler of --recipe {args.recipe}: {describe_sampler(args)}")
    with autocast(device, args.amp):
        results = MODES[args.eval](args, model, replay_buffer, device)
    for name in result_files(args):
        write_json(os.path.join(args.save_dir, name), {**results, "args": vars(args)})
    log.record(kind=f"eval_{args.eval}", **results)
    log.line(summary_line(args.eval, results))
    return results


if __name__ == "__main__":
    run_cli(main)
