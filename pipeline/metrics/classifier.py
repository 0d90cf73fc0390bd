"""The ``domain`` feature extractor: a small CNN classifier trained on the dataset's labelled train split.

Its logits give p(y|x) for the Inception Score; its 128-d penultimate layer gives the features of FID and
precision/recall. Trained once per run with a fixed seed (FID depends on the network) and cached in the run
folder with its held-out accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import ImageSet, to_float
from pipeline.io import UserError, atomic_torch_save, load_checkpoint


class DomainClassifier(nn.Module):
    """Strided convolutions down to 4 x 4 (5x5/2, 3x3/2, 3x3/2, 3x3), a 128-d feature layer and a linear head;
    about 0.6 GMAC per 128 images of 32 x 32, so it trains in tens of seconds on a CPU."""

    num_features = 128

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 5, stride=2, padding=2), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> (B, 128) features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (pad by repeating the border, the background of digits
    and of icons on white alike, then crop)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]  # (B, C, H, W)


@torch.no_grad()
def accuracy(model: DomainClassifier, images: ImageSet, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        pixels, labels = images.__getitems__(list(range(start, min(start + batch_size, len(images)))))
        correct += int((model(to_float(pixels)).argmax(1) == labels).sum())
    return correct / len(images)


def train_classifier(train: ImageSet, holdout: ImageSet, num_classes: int, steps: int, batch_size: int = 128,
                     seed: int = 0, lr: float = 3e-3, log=print) -> tuple[DomainClassifier, float]:
    from tqdm.auto import tqdm

    if num_classes < 2:
        raise UserError("evaluate.extractor=domain needs labelled data (a classifier is trained on it); "
                        "use evaluate.extractor=inception for unlabelled data")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DomainClassifier(train[0][0].shape[0], num_classes)  # channels of the first image: any image set
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    for _ in tqdm(range(steps), desc="domain classifier", leave=False):
        idx = torch.randint(len(train), (batch_size,), generator=g).tolist()
        pixels, labels = train.__getitems__(idx)
        x = _shift(to_float(pixels), 2, g)
        loss = F.cross_entropy(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    acc = accuracy(model, holdout)
    log(f"domain classifier: held-out accuracy {acc:.2%} after {steps} steps")
    return model.eval(), acc


def load_or_train_classifier(path: Path, train: ImageSet, holdout: ImageSet, num_classes: int, steps: int,
                             batch_size: int, seed: int = 0, log=print) -> tuple[DomainClassifier, float]:
    """The cached classifier of a run (retrained when its settings differ), and its held-out accuracy."""
    settings = {"arch": DomainClassifier.__doc__, "num_classes": num_classes, "steps": steps,
                "batch_size": batch_size, "seed": seed, "train_size": len(train), "holdout_size": len(holdout)}
    if path.exists():
        ckpt = load_checkpoint(path)
        if ckpt.get("settings") == settings:
            model = DomainClassifier(ckpt["in_channels"], num_classes, ckpt["width"])
            model.load_state_dict(ckpt["model"])
            log(f"domain classifier: reusing {path} (held-out accuracy {ckpt['accuracy']:.2%})")
            return model.eval(), ckpt["accuracy"]
    model, acc = train_classifier(train, holdout, num_classes, steps, batch_size, seed, log=log)
    atomic_torch_save(path, {"model": model.state_dict(), "settings": settings, "accuracy": acc,
                             "in_channels": model.in_channels, "width": model.width})
    return model, acc
