"""mmlab: prepare multimodal datasets, train late-fusion models, and analyse why multimodal training works."""

__version__ = "0.1.0"
