"""The math: denoising transitions (`samplers`: the `Sampler` protocol and DDIM-eta; `scheduler_sampler`:
any diffusers scheduler), the method losses (`losses`) and per-prompt reward statistics (`stat_tracking`).
Pure functions of tensors; imports nothing from the rest of the toolkit but `errors`."""
