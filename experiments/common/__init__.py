"""Shared helpers of the analysis scripts (linear probe, Grad-CAM++, toy reproduction of Harmon's preliminary study).

Everything here goes through harmon's public API: the encoder registry (``ENCODERS``), the encoder interfaces
(``hidden_size`` and ``encode -> (B, N, D)``: a pixel encoder reads ``preprocess(pixels in [-1, 1])``, a MAR token
encoder reads VAE tokens), ``HarmonModel`` / ``HarmonPipeline`` and ``harmon.testing``. One module per seam:

* :mod:`.runtime` -- device / dtype from the command line, threads, seeding, timing;
* :mod:`.data` -- :func:`bundled_dataset` and :func:`image_folder_dataset`;
* :mod:`.features` -- :class:`TokenFeatures`, :func:`load_encoder`, pooled features and their cache;
* :mod:`.probe` -- the MAE linear-probe protocol (:class:`LinearProbe`, :func:`train_linear_probe`,
  :func:`topk_accuracy`);
* :mod:`.results` -- :func:`write_csv`, :func:`write_markdown_table`, JSON, mean ± std.

``from experiments.common import X`` keeps working for every name.
"""

from experiments.common.runtime import (  # noqa: F401
    DTYPES,
    REPO_ROOT,
    Timer,
    resolve_device,
    resolve_dtype,
    seed_everything,
    slug,
    torch_threads,
)
from experiments.common.data import (  # noqa: F401
    BUNDLED_DATASETS,
    COLORS,
    LabeledImages,
    QUADRANTS,
    SHAPES,
    bundled_dataset,
    image_folder_dataset,
    render_quadrant,
    render_shape,
)
from experiments.common.features import (  # noqa: F401
    HARMON_ROLES,
    KLLatentEncoder,
    LatentMAREncoder,
    TokenFeatures,
    VQLatentEncoder,
    build_registered_encoder,
    cache_key,
    cached,
    encoder_image_size,
    extract_pooled_features,
    harmon_features,
    is_harmon_folder,
    is_token_encoder,
    load_encoder,
    load_harmon_model,
    load_kl_vae,
    pixel_encoder_features,
    reads_pixels,
)
from experiments.common.probe import (  # noqa: F401
    LinearProbe,
    ProbeClassifier,
    ProbeResult,
    load_probe,
    make_optimizer,
    probe_checkpoint,
    topk_accuracy,
    train_linear_probe,
    warmup_cosine,
)
from experiments.common.results import (  # noqa: F401
    markdown_table,
    mean_std,
    read_csv,
    save_json,
    write_csv,
    write_markdown_table,
)

__all__ = [
    "BUNDLED_DATASETS",
    "COLORS",
    "DTYPES",
    "HARMON_ROLES",
    "KLLatentEncoder",
    "LabeledImages",
    "LatentMAREncoder",
    "LinearProbe",
    "ProbeClassifier",
    "ProbeResult",
    "QUADRANTS",
    "REPO_ROOT",
    "SHAPES",
    "Timer",
    "TokenFeatures",
    "VQLatentEncoder",
    "build_registered_encoder",
    "bundled_dataset",
    "cache_key",
    "cached",
    "encoder_image_size",
    "extract_pooled_features",
    "harmon_features",
    "image_folder_dataset",
    "is_harmon_folder",
    "is_token_encoder",
    "load_encoder",
    "load_harmon_model",
    "load_kl_vae",
    "load_probe",
    "make_optimizer",
    "markdown_table",
    "mean_std",
    "pixel_encoder_features",
    "probe_checkpoint",
    "read_csv",
    "reads_pixels",
    "render_quadrant",
    "render_shape",
    "resolve_device",
    "resolve_dtype",
    "save_json",
    "seed_everything",
    "slug",
    "topk_accuracy",
    "torch_threads",
    "train_linear_probe",
    "warmup_cosine",
    "write_csv",
    "write_markdown_table",
]
