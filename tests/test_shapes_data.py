"""The shapes data generator: determinism, split rules, captions that say what the pixels show."""

import numpy as np

from diffusion_align.bundled import PROMPT_LISTS, SHAPES
from diffusion_align.prompts import load_prompts
from diffusion_align.zoo import shapes_data as data
from diffusion_align.zoo.shapes_card import write_prompt_lists
from rewards import shapes


def test_sample_is_deterministic_and_independent_of_batching():
    img, scene = data.sample("train", 7)
    img2, scene2 = data.sample("train", 7)
    assert np.array_equal(img, img2) and scene == scene2
    batch = data.make_split("train", 3, start=6)
    assert np.array_equal((batch.images[1].permute(1, 2, 0) * 255).round().byte().numpy(), img)
    assert batch.scenes[1] == scene
    assert not np.array_equal(data.sample("val", 7)[0], img)  # splits have their own seeds


def test_splits_hold_out_unseen_pairs():
    train, heldout = set(data.split_scenes("train")), set(data.split_scenes("heldout"))
    assert train and heldout and not train & heldout
    assert set(data.split_scenes("val")) == train
    seen_cs = {(s.color, s.shape) for s in train}
    seen_sb = {(s.shape, s.background) for s in train}
    for pair in data.HELDOUT_COLOR_SHAPE:
        assert pair not in seen_cs
    for pair in data.HELDOUT_SHAPE_BACKGROUND:
        assert pair not in seen_sb
    assert all(data.is_heldout(s) for s in heldout)
    assert all(shapes.parse_caption(p) in heldout for p in data.heldout_prompts())
    assert len(set(data.heldout_prompts())) == len(data.heldout_prompts()) == 48


def test_shipped_prompt_lists_are_the_generators_and_what_the_build_writes(tmp_path):
    """shapes_train / shapes_heldout ship as files beside the bundled model; they must be the generator's
    captions (what the model was trained on and held out from) and byte-equal to what `zoo build` writes."""
    assert load_prompts("shapes_train") == [s.caption() for s in data.split_scenes("train")]
    assert load_prompts("shapes_heldout") == data.heldout_prompts()
    write_prompt_lists(tmp_path)
    for path in PROMPT_LISTS.values():
        assert (tmp_path / path.relative_to(SHAPES)).read_bytes() == path.read_bytes(), path


def test_captions_round_trip_through_the_parser():
    for split in ("train", "heldout"):
        batch = data.make_split(split, 40)
        assert [shapes.parse_caption(c) for c in batch.captions] == batch.scenes


def test_detector_reads_ground_truth_images():
    # The pixel rewards and the adherence metric rely on this detector; measure it on real data.
    batch = data.make_split("train", 150)
    held = data.make_split("heldout", 150)
    dets = shapes.detect(batch.images) + shapes.detect(held.images)
    acc = shapes.adherence(dets, batch.scenes + held.scenes)
    for key in ("color", "shape", "count", "size", "background"):
        assert acc[key] >= 0.97, (key, acc)


def test_pixels_match_caption_colours():
    img, scene = data.sample("train", 3)
    bg = np.array(shapes.BACKGROUNDS[scene.background])
    corner = img[0, 0].astype(int)
    assert np.abs(corner - bg).max() <= data.COLOR_JITTER
    fg = img.reshape(-1, 3)[np.abs(img.reshape(-1, 3).astype(int) - corner).max(1) > 0]
    assert len(fg) > 10
    assert np.abs(fg[0].astype(int) - np.array(shapes.SHAPE_COLORS[scene.color])).max() <= data.COLOR_JITTER
