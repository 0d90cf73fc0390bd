"""A second judge of the asked class, independent of the project's networks: a support-vector machine with an
RBF kernel (scikit-learn's ``SVC``) on raw pixels, fitted on train images with a fixed seed. It shares no
architecture, features or training code with the domain classifier or the priors, so a sample it recognises was
not merely shaped to fool our own network. On the 5,000 digits it recognises 95% of the held-out images (the
domain CNN 98-99%); its floor is reported beside it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MAX_TRAIN = 5000  # the fit grows with the square of the images: about 6 s for 4,000 digits on one core
MAX_CLASSES = 100  # one-vs-one: classes x (classes - 1) / 2 machines; beyond this the judge is skipped
MAX_SIDE = 32  # larger images are area-averaged down to this many pixels a side
C = 10.0
DESCRIPTION = f"an RBF support-vector machine on pixels (scikit-learn SVC, C = {C:g}, at most {MAX_SIDE} px a side)"


def pixel_vectors(pixels: torch.Tensor) -> np.ndarray:
    """uint8 images (B, C, H, W) -> float32 rows (B, D) in [0, 1]."""
    x = pixels.float().div(255)
    if max(x.shape[-2:]) > MAX_SIDE:
        x = F.adaptive_avg_pool2d(x, MAX_SIDE)
    return x.flatten(1).numpy()


def fit_judge(train, seed: int = 0, max_train: int = MAX_TRAIN):
    """Fit on at most ``max_train`` images of ``train`` (an indexed image set with ``__getitems__`` returning
    (uint8 pixels, labels)) drawn with ``seed``; returns the fitted classifier (None when the images hold fewer
    than two classes) and the number of images."""
    from sklearn.svm import SVC

    idx = np.sort(np.random.default_rng(seed).permutation(len(train))[:max_train])
    parts = [train.__getitems__(idx[i : i + 500].tolist()) for i in range(0, len(idx), 500)]
    x = np.concatenate([pixel_vectors(p) for p, _ in parts])
    y = np.concatenate([lab.numpy() for _, lab in parts])
    keep = y >= 0  # unlabelled images (label -1) teach nothing here
    if len(np.unique(y[keep])) < 2:
        return None, int(keep.sum())
    return SVC(C=C, gamma="scale").fit(x[keep], y[keep]), int(keep.sum())


def judged(judge, pixels_of, n: int) -> np.ndarray:
    """The judge's predicted class of the first ``n`` images ``pixels_of`` gives."""
    return np.concatenate([judge.predict(pixel_vectors(pixels_of(list(range(i, min(i + 500, n))))))
                           for i in range(0, n, 500)])
