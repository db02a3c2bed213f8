"""DiffusionInst: instance segmentation as denoising diffusion over boxes (Gu et al., arXiv 2212.02773)."""

__version__ = "0.1.0"
