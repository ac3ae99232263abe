"""`diffusion-align train-artifact-head --clean DIR --artifact DIR`: fit the artifact_head reward.

Embeds every image with a frozen CLIP model, holds out a stratified fraction, fits a logistic head (or one
hidden layer) on the rest, reports held-out accuracy and writes the head as safetensors. Use it with
`--reward artifact_head --reward-arg artifact_head.pretrained=FILE` or in a training config.
"""

from __future__ import annotations

import argparse
import sys

from diffusion_align.errors import UserError

HELP = "Train the light CLIP-feature artifact head on a folder of clean and a folder of artifact images."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clean", action="append", required=True, metavar="DIR", help="artifact-free images")
    parser.add_argument(
        "--artifact", action="append", required=True, metavar="DIR", help="images with artifacts"
    )
    parser.add_argument(
        "--clip",
        default="openai/clip-vit-large-patch14",
        help="CLIP backbone: hub id or local save_pretrained directory (recorded in the head file)",
    )
    parser.add_argument("--out", default="artifact_head.safetensors", help="where to write the head")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of each class")
    parser.add_argument("--hidden", type=int, default=0, help="hidden units; 0 = logistic regression")
    parser.add_argument("--steps", type=int, default=500, help="full-batch optimiser steps")
    parser.add_argument("--lr", type=float, default=5e-2, help="AdamW learning rate on standardised features")
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16, help="images per CLIP forward")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the head's init")


def embed_folders(clip, folders: list[str], batch_size: int, device, desc: str):
    """CLIP embeddings `(N, D)` of every image under `folders`, and the files that could not be used."""
    import torch
    from tqdm import tqdm

    from rewards.artifact_head import clip_image_embeddings
    from rewards.io import LoadFailure, find_media, group_by_shape, load_many

    files, failures = find_media(folders)
    feats = []
    with tqdm(total=len(files), unit="img", desc=desc, disable=None, file=sys.stderr) as bar:
        for start in range(0, len(files), 4 * batch_size):
            media, bad = load_many(files[start : start + 4 * batch_size], max_frames=1)
            failures += bad
            images = [m for m in media if not m.is_video]
            failures += [LoadFailure(m.path, "videos are not used for training") for m in media if m.is_video]
            for batch in group_by_shape(images, batch_size):
                pixels = torch.stack([images[i].pixels for i in batch]).to(device)
                with torch.no_grad():
                    feats.append(clip_image_embeddings(clip, pixels).cpu())
            bar.update(len(files[start : start + 4 * batch_size]))
    dim = clip.config.projection_dim
    return (torch.cat(feats) if feats else torch.zeros(0, dim)), failures


def stratified_split(labels, val_fraction: float, seed: int):
    """Index tensors (train, val); each class contributes round(val_fraction * n) (at least 1) to val."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in (0, 1):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = max(1, round(val_fraction * len(idx))) if val_fraction > 0 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train), torch.cat(val)


def accuracy(head, features, labels) -> float:
    import torch

    with torch.no_grad():
        return float(((head(features) > 0).float() == labels).float().mean())


def run(args: argparse.Namespace) -> int:
    import torch

    from rewards.artifact_head import fit_head, load_clip, save_head

    if not 0 <= args.val_fraction < 1:
        raise UserError("--val-fraction must be in [0, 1)")
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    clip = load_clip(args.clip).to(device)
    clean, bad_clean = embed_folders(clip, args.clean, args.batch_size, device, "clean")
    artifact, bad_artifact = embed_folders(clip, args.artifact, args.batch_size, device, "artifact")
    for f in bad_clean + bad_artifact:
        print(f"skipped {f.path}: {f.reason}", file=sys.stderr)
    need = 2 if args.val_fraction > 0 else 1
    if len(clean) < need or len(artifact) < need:
        raise UserError(
            f"need at least {need} usable images per class, found {len(clean)} clean and "
            f"{len(artifact)} artifact; check the --clean/--artifact folders"
        )

    features = torch.cat([clean, artifact])
    labels = torch.cat([torch.zeros(len(clean)), torch.ones(len(artifact))])
    train, val = stratified_split(labels, args.val_fraction, args.seed)
    head = fit_head(
        features[train], labels[train], args.hidden, args.steps, args.lr, args.weight_decay, args.seed
    )
    train_acc = accuracy(head, features[train], labels[train])
    print(f"images: {len(clean)} clean, {len(artifact)} artifact; train {len(train)}, held-out {len(val)}")
    print(f"train accuracy: {train_acc:.4f}")
    meta = {"clip": args.clip, "train_accuracy": f"{train_acc:.6f}", "n_train": str(len(train))}
    if len(val):
        val_acc = accuracy(head, features[val], labels[val])
        per_class = [
            accuracy(head, features[val][labels[val] == c], labels[val][labels[val] == c]) for c in (0, 1)
        ]
        print(f"held-out accuracy: {val_acc:.4f} (clean {per_class[0]:.4f}, artifact {per_class[1]:.4f})")
        meta.update(heldout_accuracy=f"{val_acc:.6f}", n_heldout=str(len(val)))
    else:
        print("held-out accuracy: n/a (--val-fraction 0)")
    path = save_head(head, args.out, **meta)
    print(f"wrote {path}")
    return 0
