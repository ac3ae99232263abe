"""diffusion_align: reward fine-tuning of diffusion models on current diffusers."""

__version__ = "0.1.0"
