"""Library pieces the trainer uses instead of its own: diffusers' warm-up schedule (same learning rates as
before, step by step, and an old checkpoint resumes on the same schedule) and diffusers' `fuse_lora` for the
merged export (the weights W + (alpha / r) B A, computed here independently)."""

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from test_trainer import lora_of, max_diff, tiny_config

from diffusion_align.builder import train, warmup_schedule
from diffusion_align.engine.backbones import load_backbone
from diffusion_align.engine.policy import Policy
from diffusion_align.math.samplers import DDIMSampler
from diffusion_align.training import checkpointing
from diffusion_align.training.run_outputs import export_merged


def test_warmup_schedule_gives_the_documented_learning_rates():
    """Optimizer step k (from 1) runs at lr * min(1, k / warmup): never a step at 0, full rate at step
    `warmup`; lr itself when warmup is 0."""
    base = 0.3
    for warmup in (0, 1, 3, 6):
        param = torch.nn.Parameter(torch.zeros(2))
        optimizer = torch.optim.AdamW([param], lr=base)
        schedule = warmup_schedule(optimizer, warmup)
        used = []
        for _ in range(10):
            used.append(optimizer.param_groups[0]["lr"])
            param.grad = torch.ones(2)
            optimizer.step()
            schedule.step()
        expected = [base * min(1.0, k / warmup) if warmup else base for k in range(1, 11)]
        assert used == expected, warmup
        assert schedule.get_last_lr() == [expected[-1]]  # what the trainer logs as train/lr


def test_a_checkpoint_from_before_the_diffusers_schedule_resumes_on_the_same_rates(tmp_path):
    """Checkpoints saved by the hand-written LambdaLR count one scheduler step fewer; resume realigns them."""
    extra = {"train.epochs": 2, "logging.eval_every": 0, "train.lr_warmup_steps": 6}
    straight = train(tiny_config(tmp_path / "a", "ddpo", **extra))
    train(tiny_config(tmp_path / "b", "ddpo", **{**extra, "train.epochs": 1}))
    folder = tmp_path / "b" / "checkpoints" / "checkpoint-000001"
    state = torch.load(folder / "scheduler.pt", weights_only=True)
    assert state["last_epoch"] == 3  # 2 optimizer steps, started one step in
    state["last_epoch"] = 2  # as the LambdaLR of before wrote it
    torch.save(state, folder / "scheduler.pt")
    checkpointing.write_manifest(folder)
    resumed = train(tiny_config(tmp_path / "b", "ddpo", **{**extra, "checkpoint.resume": "latest"}))
    assert max_diff(lora_of(straight["lora_dir"]), lora_of(resumed["lora_dir"])) == 0


def test_merged_export_is_base_plus_scaled_lora_product(tmp_path):
    """tiny-sd (diffusers' fuse_lora) and tiny-t2v (a UNet without diffusers' adapter mixin) alike."""
    for name in ("tiny-sd", "tiny-t2v"):
        backbone = load_backbone(name, device="cpu")
        policy = Policy(backbone, DDIMSampler.from_scheduler(backbone.scheduler), rank=4, alpha=8)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        expected = {}
        for module_name, module in backbone.unet.named_modules():
            if isinstance(module, BaseTunerLayer):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                expected[module_name] = (module.base_layer.weight + (8 / 4) * b @ a).detach().clone()
        assert expected
        export_merged(backbone, tmp_path / name)
        pipe = type(backbone.pipe).from_pretrained(tmp_path / name)
        merged = dict(pipe.unet.named_modules())
        for module_name, weight in expected.items():
            torch.testing.assert_close(merged[module_name].weight, weight, rtol=0, atol=1e-6)
        assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
