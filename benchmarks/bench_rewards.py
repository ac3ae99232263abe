"""Reward scoring throughput against a bare forward of the same model, measured in the same run.

"bare" is the lower bound: the model's own forward on pixels that are already resized/normalised and
prompts that are already tokenised. "reward" is `reward(images, prompts)` on `[0, 1]` images at the
model's input size, i.e. including torch preprocessing, tokenisation and the score formula.
ratio = bare time / reward time (target >= 0.9). Calls alternate between the two so load from other
processes hits both alike; the median of the repeats is reported.

    python benchmarks/bench_rewards.py                 # tiny models, every reward
    python benchmarks/bench_rewards.py --full          # + full-size architectures with random weights
    python benchmarks/bench_rewards.py --full --only aesthetic clip --batch 2 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewards  # noqa: E402
from rewards import testing as tiny  # noqa: E402
from rewards.clip_towers import HFClipTowers, OpenClipTowers  # noqa: E402
from rewards.preprocess import clip_preprocess, hps_preprocess, siglip_preprocess  # noqa: E402
from rewards.tokenizers import clip_tokenizer  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon"


# ---------------------------------------------------------------------------------------------------
# Bare forwards: the same modules the reward holds, on prepared inputs.


def bare_aesthetic(r, images, prompts):
    pixels = clip_preprocess(images, r.image_size)
    return lambda: r.head(nn.functional.normalize(r.vision(pixel_values=pixels).image_embeds, dim=-1))


def bare_aesthetic_v25(r, images, prompts):
    pixels = siglip_preprocess(images, r.image_size)
    return lambda: r.head(nn.functional.normalize(r.vision(pixel_values=pixels).pooler_output, dim=-1))


def bare_hf_clip(r, images, prompts):
    t = r.towers
    pixels = clip_preprocess(images, t.image_size, t.mean, t.std)
    tok = t.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")

    def run():
        i = t.model.get_image_features(pixel_values=pixels)
        x = t.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return getattr(i, "pooler_output", i), getattr(x, "pooler_output", x)

    return run


def bare_hps(r, images, prompts):
    t = r.towers
    pixels = hps_preprocess(images, t.image_size, t.mean, t.std)
    tokens = t.tokenizer(prompts)
    return lambda: (t.model.encode_image(pixels), t.model.encode_text(tokens))


def bare_imagereward(r, images, prompts):
    pixels = clip_preprocess(images, r.image_size)
    tok = r.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")

    def run():
        emb = r.vision(pixel_values=pixels).last_hidden_state
        mask = torch.ones(emb.shape[:2], dtype=torch.long)
        out = r.text(
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            encoder_hidden_states=emb,
            encoder_attention_mask=mask,
            is_decoder=False,
        )
        return r.mlp(out.last_hidden_state[:, 0])

    return run


def bare_jpeg(r, images, prompts):
    from PIL import Image

    arrays = [np.ascontiguousarray(a) for a in (images * 255).round().byte().permute(0, 2, 3, 1).numpy()]

    def run():
        for a in arrays:
            Image.fromarray(a).save(io.BytesIO(), format="JPEG", quality=95)

    return run


BARE = {
    "aesthetic": bare_aesthetic,
    "aesthetic_v25": bare_aesthetic_v25,
    "clip": bare_hf_clip,
    "pickscore": bare_hf_clip,
    "hpsv2": bare_hps,
    "imagereward": bare_imagereward,
    "jpeg_compressibility": bare_jpeg,
}


# ---------------------------------------------------------------------------------------------------
# Models


def tiny_rewards(root: Path) -> dict[str, tuple[nn.Module, int]]:
    clip_dir = tiny.save_tiny_clip(root / "clip")
    aes = tiny.save_tiny_aesthetic(root / "aes")
    enc, head = tiny.save_tiny_aesthetic_v25(root / "v25")
    arch, hps_dir = tiny.save_tiny_hps(root / "hps")
    ir = tiny.save_tiny_imagereward(root / "ir")
    return {
        "aesthetic": (rewards.build("aesthetic", pretrained=aes[1], clip=aes[0]), 64),
        "aesthetic_v25": (rewards.build("aesthetic_v25", pretrained=head, encoder=enc), 32),
        "clip": (rewards.build("clip", pretrained=clip_dir), 64),
        "pickscore": (rewards.build("pickscore", pretrained=clip_dir, processor=None), 64),
        "hpsv2": (rewards.build("hpsv2", pretrained=hps_dir, arch=arch), 64),
        "imagereward": (rewards.build("imagereward", pretrained=ir), 32),
        "jpeg_compressibility": (rewards.build("jpeg_compressibility"), 512),
    }


def full_size(name: str, root: Path) -> tuple[nn.Module, int]:
    """Full-size architectures with random weights (no download): the real configs, built in-process."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from rewards.aesthetic import AestheticMLP, AestheticReward
    from rewards.clip_score import CLIPScoreReward
    from rewards.hps import HPSReward
    from rewards.pickscore import PickScoreReward

    vit_l14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    vit_l14.update(image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
    text_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    tok = clip_tokenizer()
    text_ids = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(0)
    if name == "aesthetic":
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**vit_l14)).eval()
        return AestheticReward(vision, AestheticMLP(768)), 224
    if name == "clip":
        cfg = CLIPConfig(
            text_config=dict(text_l, hidden_act="quick_gelu", **text_ids),
            vision_config=vit_l14,
            projection_dim=768,
        )
        return CLIPScoreReward(HFClipTowers(CLIPModel(cfg).eval(), tok)), 224
    if name == "pickscore":  # CLIP-H/14 in transformers layout
        cfg = CLIPConfig(
            text_config=dict(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                hidden_act="gelu",
                **text_ids,
            ),
            vision_config=dict(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
                hidden_act="gelu",
            ),
            projection_dim=1024,
        )
        return PickScoreReward(HFClipTowers(CLIPModel(cfg).eval(), tok)), 224
    if name == "hpsv2":
        import open_clip

        model = open_clip.create_model("ViT-H-14", pretrained=None).eval()
        return HPSReward(OpenClipTowers(model, open_clip.get_tokenizer("ViT-H-14"))), 224
    if name == "imagereward":
        return full_imagereward(root), 224
    if name == "jpeg_compressibility":
        return rewards.build("jpeg_compressibility"), 512
    raise SystemExit(f"no full-size recipe for {name}")


def full_imagereward(root: Path):
    """BLIP ViT-L/16 + BERT-base with cross-attention (ImageReward's sizes), random weights."""
    from transformers import BlipTextModel, BlipVisionConfig, BlipVisionModel

    from rewards.imagereward import ImageRewardReward, RewardMLP, blip_text_config, load_bert_tokenizer

    med = tiny.tiny_med_config(30524, 1024)
    med.update(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    med.update(max_position_embeddings=512)
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=16,
            layer_norm_eps=1e-6,
        )
    ).eval()
    text = BlipTextModel(blip_text_config(med, 1024), add_pooling_layer=False).eval()
    tok = load_bert_tokenizer(tiny.write_tiny_bert_vocab(root / "bert"))  # vocab size does not change speed
    return ImageRewardReward(vision, text, RewardMLP(768), tok)


# ---------------------------------------------------------------------------------------------------


def bench(name, reward, size, batch, repeats):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g)
    prompts = [PROMPT] * batch
    bare = BARE[name](reward, images, prompts)
    times = {"reward": [], "bare": []}
    with torch.no_grad():
        reward(images, prompts), bare()  # warm-up
        for _ in range(repeats):
            for key, fn in (("reward", lambda: reward(images, prompts)), ("bare", bare)):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    t_reward, t_bare = statistics.median(times["reward"]), statistics.median(times["bare"])
    params = sum(p.numel() for p in reward.parameters()) / 1e6
    return dict(name=name, params=params, size=size, batch=batch, reward=t_reward, bare=t_bare)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also full-size architectures (random weights)")
    parser.add_argument("--only", nargs="*", help="reward names to run")
    parser.add_argument(
        "--batch", type=int, default=4, help="batch size for tiny models (full: --full-batch)"
    )
    parser.add_argument("--full-batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--full-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.only or list(BARE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        built = tiny_rewards(root)
        for name in names:
            reward, size = built[name]
            rows.append(dict(bench(name, reward, size, args.batch, args.repeats), model="tiny"))
            print(f"  done tiny {name}", file=sys.stderr, flush=True)
        if args.full:
            for name in names:
                reward, size = full_size(name, root)
                rows.append(dict(bench(name, reward, size, args.full_batch, args.full_repeats), model="full"))
                print(f"  done full {name}", file=sys.stderr, flush=True)
                del reward
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of repeats")
    print(f"| {'reward':22} | model | params (M) | batch | reward (s) | bare (s) | ratio bare/reward |")
    print(f"|{'-' * 24}|-------|------------|-------|------------|----------|-------------------|")
    for r in rows:
        ratio = r["bare"] / r["reward"]
        print(
            f"| {r['name']:22} | {r['model']:5} | {r['params']:10.1f} | {r['batch']:5d} | "
            f"{r['reward']:10.4f} | {r['bare']:8.4f} | {ratio:17.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
