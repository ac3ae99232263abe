"""Memory planning: a pipeline's models built on the meta device from their config files only
(`meta_models`), per-rank bytes of a LoRA run on them (`plan`), and the measured activation profiles it
scales (`activations`)."""
