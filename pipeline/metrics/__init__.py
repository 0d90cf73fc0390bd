"""Sample-quality metrics: FID and Inception Score from precomputed features/logits (torchmetrics),
precision/recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al. 2020), and an offline
Inception-v3 feature extractor. Importing this package has no side effects (torchmetrics is imported lazily).
"""

from pipeline.metrics.features import InceptionFeatures, default_inception_path, find_inception_in_wheel
from pipeline.metrics.fid import fid_from_features, inception_score_from_logits
from pipeline.metrics.prdc import precision_recall

__all__ = [
    "InceptionFeatures",
    "default_inception_path",
    "fid_from_features",
    "find_inception_in_wheel",
    "inception_score_from_logits",
    "precision_recall",
]
