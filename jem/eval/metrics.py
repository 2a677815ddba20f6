"""The scores and metrics of evaluation: log p(x) and its kin per image, OOD detection (AUROC, AUPR,
FPR at 95% TPR) and calibration (ECE over equal-width confidence bins)."""
import numpy as np
import torch

from jem.sampler import uncached_autocast


ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (the paper's figure)


def px_score(model, x):
    """log p(x) up to a constant: logsumexp f(x) (or the energy head of an --uncond model)."""
    with torch.no_grad():
        return model(x)


def py_score(model, x):
    """max_y p(y | x), the classifier's confidence."""
    with torch.no_grad():
        return model.classify(x).float().softmax(1).max(1).values


def pxgrad_score(model, x):
    """-||d log p(x) / dx||_2 per example: flat regions of the density are typical of the data."""
    x = x.detach().requires_grad_(True)
    # under --amp, no bf16 copy of every batch kept to the end
    with uncached_autocast(x.device.type):
        grad, = torch.autograd.grad(model(x).sum(), x)
    return -grad.flatten(1).norm(dim=1)


SCORES = {"px": px_score, "py": py_score, "pxgrad": pxgrad_score}


SCORE_LABELS = {"px": "log p(x) + const", "py": "max p(y|x)", "pxgrad": "-||d log p(x)/dx||"}


HISTOGRAM_LABELS = {**SCORE_LABELS, "pxgrad": "-log ||d log p(x)/dx||"}


def histogram_values(score_fn, scores):
    """What logp_hist plots: the score, but for pxgrad -log ||grad||, as the paper's histogram did
    (its OOD score, like ours, is -||grad||)."""
    return -np.log(-scores) if score_fn == "pxgrad" else scores


def ood_metrics(in_scores, out_scores):
    """AUROC, AUPR and FPR at 95% TPR of telling in-distribution (positives, higher scores) from
    OOD."""
    # imported here, not with the module: sklearn adds most of a second to every command line
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    labels = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
    scores = np.concatenate([np.asarray(in_scores), np.asarray(out_scores)])
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr": float(average_precision_score(labels, scores)),
        "fpr_at_95_tpr": float(
            fpr[np.searchsorted(tpr, 0.95)]
        ),  # the first threshold that keeps 95% in
    }


def expected_calibration_error(confidences, correct, n_bins=ECE_BINS):
    """ECE over equal-width confidence bins (lo, hi] (Guo et al. 2017), and each bin's numbers.

    ECE = sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|.
    """
    confidences, correct = np.asarray(confidences, dtype=float), np.asarray(correct, dtype=float)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.digitize(
        confidences, edges[1:-1], right=True
    )  # 0 for (0, 1/n], ..., n-1 for (1-1/n, 1]
    counts = np.bincount(which, minlength=n_bins)
    accuracy = np.bincount(which, weights=correct, minlength=n_bins) / np.maximum(counts, 1)
    confidence = np.bincount(which, weights=confidences, minlength=n_bins) / np.maximum(counts, 1)
    ece = float(np.sum(counts / len(confidences) * np.abs(accuracy - confidence)))
    bins = [{"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(counts[b]),
             "accuracy": float(accuracy[b]) if counts[b] else None,
             "confidence": float(confidence[b]) if counts[b] else None} for b in range(n_bins)]
    return ece, bins
