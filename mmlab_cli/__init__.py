"""mmlab: prepare multimodal datasets, train late-fusion models, and analyse why multimodal training works.

The plug-in API for other training loops (docs/plugins.md) is importable from here, e.g.
`from mmlab_cli import DAGRLoss`: its names load `mmlab_cli.plugins` (and torch) on first use only, so that
`mmlab --help` stays fast.
"""

__version__ = "0.1.0"

PLUGINS = (  # the public names of mmlab_cli.plugins
    "DAGRLoss", "pareto_alpha", "min_norm_alpha",
    "DMLSampler", "DMLDataset",
    "ogm_scores", "ogm_coefficients", "ogm_parameters", "ogm_modulate",
    "agm_shapley", "agm_score_sums", "agm_coefficients", "agm_clip",
    "pmr_prototypes", "pmr_terms", "pmr_weights",
    "mmpareto_combine",
)


def __getattr__(name: str):
    if name not in PLUGINS:  # a static list: `from mmlab_cli import config` must not import torch
        raise AttributeError(f"module 'mmlab_cli' has no attribute {name!r}")
    from mmlab_cli import plugins

    return getattr(plugins, name)
