"""Reward models for diffusion fine-tuning and image/video scoring.

A leaf package of the diffusion-align distribution: it never imports `diffusion_align`.
"""
