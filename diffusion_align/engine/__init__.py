"""The engine: model families behind the `backbones.protocol.Backbone` protocol, the policy (a backbone's
denoiser with a LoRA, scored as sampler transitions), and `rollout`, the one denoising loop every method,
evaluation and `sample` run (`few_step` turns it into the noise -> image map of ReNO and search)."""
