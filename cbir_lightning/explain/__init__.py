"""Visual explanations of classifier decisions and retrieval similarities, and their faithfulness scores.

``Explainer`` computes class activation maps with pytorch-grad-cam for ``ClassTarget`` (a class logit of a
trained head) or ``SimilarityTarget`` (the cosine similarity of a query and a result).
``faithfulness_scores`` measures how well the maps rank the pixels the score depends on.
"""

from cbir_lightning.explain.cam import (
    CAM_METHODS,
    ClassScoreModel,
    EmbeddingModel,
    Explainer,
    normalize_maps,
    vit_reshape_transform,
)
from cbir_lightning.explain.faithfulness import (
    BASELINES,
    baseline_images,
    class_confidence_fn,
    faithfulness_scores,
    gaussian_maps,
    random_maps,
    similarity_score_fn,
)
from cbir_lightning.explain.targets import (
    ClassHead,
    ClassTarget,
    SimilarityTarget,
    class_targets,
    load_class_head,
    similarity_targets,
)

__all__ = [
    "BASELINES",
    "CAM_METHODS",
    "ClassHead",
    "ClassScoreModel",
    "ClassTarget",
    "EmbeddingModel",
    "Explainer",
    "SimilarityTarget",
    "baseline_images",
    "class_confidence_fn",
    "class_targets",
    "faithfulness_scores",
    "gaussian_maps",
    "load_class_head",
    "normalize_maps",
    "random_maps",
    "similarity_score_fn",
    "similarity_targets",
    "vit_reshape_transform",
]
