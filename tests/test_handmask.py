"""The hand mask keeps the hand and drops the markers: on 26 real radiographs (hand annotations in
tests/data/rsna_sample_markers.json), on phantoms, through the input pipeline and in AG-CNN's attention."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bonedist.data import synth
from bonedist.data.augment import AugmentConfig, InputPipeline
from bonedist.data.handmask import hand_mask
from bonedist.data.images import resize_square
from bonedist.models.attention import attention_boxes
from bonedist.spec import InputSpec
from tests.conftest import RSNA_SAMPLE

ANNOTATIONS = Path(__file__).parent / "data" / "rsna_sample_markers.json"


def _score(masks: np.ndarray, keys: list[str], notes: dict) -> tuple[list[int], list[float]]:
    """Per image: hand points inside the mask (of 3) and the largest share of a marker box the mask keeps."""
    kept, covered = [], []
    for mask, key in zip(masks, keys):
        kept.append(sum(bool(mask[y, x]) for x, y in notes[key]["hand"]))
        covered.append(max(float(mask[y1:y2, x1:x2].mean()) for x1, y1, x2, y2 in notes[key]["markers"]))
    return kept, covered


@pytest.mark.realdata
def test_mask_keeps_the_hand_and_drops_the_markers_on_real_radiographs():
    if not RSNA_SAMPLE.is_dir():
        pytest.skip("../shared/data/rsna-sample is not available")
    notes = json.loads(ANNOTATIONS.read_text())["images"]
    keys = sorted(notes)
    folder = RSNA_SAMPLE / "boneage-training-dataset"
    images = [resize_square(cv2.imread(str(folder / f"{k}.png"), cv2.IMREAD_GRAYSCALE), 500, "pad")[0] for k in keys]
    batch = torch.from_numpy(np.stack(images)).unsqueeze(1)
    masks = hand_mask(batch).squeeze(1).numpy()
    kept, covered = _score(masks, keys, notes)
    report = {k: (h, round(c, 3)) for k, h, c in zip(keys, kept, covered)}
    # Measured: 77 of 78 hand points kept (11043's faint fingers), 25 of 26 marker boxes dropped (7861: the marker
    # tag sits on the bright frame of a cassette that touches the wrist).
    assert sum(kept) >= 76, report
    assert sum(h == 3 for h in kept) >= 24, report
    assert sum(c <= 0.10 for c in covered) >= 25, report
    assert float(np.median(covered)) == 0.0, report
    areas = masks.reshape(len(keys), -1).mean(axis=1)
    assert ((areas > 0.08) & (areas < 0.7)).all(), dict(zip(keys, areas.round(2)))
    # a mask depends on its image only, not on the rest of the batch
    alone = torch.cat([hand_mask(batch[i: i + 1]) for i in range(0, len(keys), 5)]).squeeze(1).numpy()
    assert (alone == masks[::5]).all()


def test_mask_drops_phantom_markers(monkeypatch):
    """Phantoms: the marker pixels are the difference between a render with and without markers."""
    kept_bone, marker_in_mask = [], []
    for seed in range(8):
        age, male = 30.0 + 25 * seed, bool(seed % 2)
        with_markers = synth.render_phantom(age, male, size=256, seed=seed)
        monkeypatch.setattr(synth, "_draw_markers", lambda image, rng: None)
        plain = synth.render_phantom(age, male, size=256, seed=seed)
        monkeypatch.undo()
        markers = with_markers != plain
        bone = (plain > 180) & ~markers  # bones are drawn at 0.8 of full scale, brighter than tissue and noise
        mask = hand_mask(torch.from_numpy(with_markers)[None, None])[0, 0].numpy()
        kept_bone.append(mask[bone].mean())
        if markers.any():
            marker_in_mask.append(mask[markers].mean())
    assert min(kept_bone) > 0.97, kept_bone
    assert max(marker_in_mask) < 0.05, marker_in_mask


def test_pipeline_applies_the_mask_before_augmentation():
    image = synth.render_phantom(120.0, True, size=128, seed=3)
    square, _ = resize_square(image, 128, "pad")
    batch = torch.from_numpy(square)[None, None]
    spec = InputSpec(image_size=128, input_size=128, channels=1, mean=(0.0,), std=(1.0,), hand_mask=True)
    x = InputPipeline(spec).eval(batch)
    mask = hand_mask(batch)
    assert (x[~mask] == 0).all() and (x[mask] > 0).float().mean() > 0.95
    plain = InputPipeline(InputSpec(image_size=128, input_size=128, channels=1, mean=(0.0,), std=(1.0,)))
    assert (plain.eval(batch)[~mask] > 0).any()  # without the option the background stays
    augmented = InputPipeline(spec, AugmentConfig()).train(batch, step=0)
    assert augmented.shape == x.shape


def test_masks_kept_by_a_cache_give_the_inputs_computed_per_batch(phantom_shards):
    """A cached split keeps every radiograph's hand mask (computed once, at the mask's work size) and hands it out
    with each batch: training, evaluation and mirrored evaluation inputs are those of masks computed per batch, and
    the pipeline no longer computes any."""
    from bonedist.data.cache import DeviceCache
    from bonedist.data.sampling import SplitIndex

    index = SplitIndex.from_manifest(json.loads((phantom_shards / "manifest.json").read_text()), "train")
    cache = DeviceCache(phantom_shards, index, "cpu", 96, progress=False, positions=list(range(12)))
    spec = InputSpec(image_size=80, input_size=80, channels=1, mean=(0.5,), std=(0.5,), hand_mask=True,
                     contrast="stretch")
    pipe = InputPipeline(spec, AugmentConfig())
    plain = cache.batch(torch.arange(5))
    assert "hand_mask" not in plain
    cache.keep_masks(pipe.hand_masks, batch_size=4, progress=False)
    kept = cache.batch(torch.arange(5))
    assert kept["hand_mask"].shape == (5, 1, 128, 128) and kept["hand_mask"].dtype == torch.bool
    assert torch.equal(kept["hand_mask"], pipe.hand_masks(plain["image"]))
    for step, flip in ((None, False), (None, True), (3, False)):
        assert torch.equal(pipe.model_batch(kept, step=step, flip=flip).image,
                           pipe.model_batch(plain, step=step, flip=flip).image), (step, flip)
    import bonedist.data.augment as augment

    calls = []
    original = augment.hand_mask_small
    augment.hand_mask_small = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        pipe.model_batch(kept, step=1)
        assert not calls  # the kept masks were used
        pipe.model_batch(plain, step=1)
        assert calls
    finally:
        augment.hand_mask_small = original


def test_training_patches_are_centred_on_the_hand():
    from bonedist.data.augment import gather_patches

    square = np.stack([resize_square(synth.render_phantom(60.0 + 40 * i, True, 256, seed=i), 128, "pad")[0]
                       for i in range(4)])
    batch = torch.from_numpy(square).unsqueeze(1)
    mask = hand_mask(batch)
    spec = InputSpec(image_size=128, input_size=32, channels=1, mean=(0.0,), std=(1.0,), num_patches=16,
                     hand_mask=True)
    pipe = InputPipeline(spec, AugmentConfig.off())
    x = pipe.train(batch, step=0)
    assert x.shape == (64, 1, 32, 32)
    ys, xs = pipe._patch_corners(mask, 4, 16, 128, 32, torch.device("cpu"))
    centres = mask[torch.arange(4).repeat_interleave(16), 0, ys.flatten() + 16, xs.flatten() + 16]
    assert centres.all()  # every patch centre on the hand
    # and the patches the pipeline drew are mostly hand, unlike uniform corners over the whole picture
    torch.manual_seed(0)
    hand_share = gather_patches(mask.float(), *pipe._patch_corners(mask, 4, 16, 128, 32, torch.device("cpu")),
                                32).mean()
    uniform = gather_patches(mask.float(), *pipe._patch_corners(None, 4, 16, 128, 32, torch.device("cpu")), 32).mean()
    assert hand_share > uniform + 0.15, (float(hand_share), float(uniform))


def test_attention_is_confined_to_the_support():
    """The hottest feature sits outside the hand: with the support the box moves onto the hand."""
    features = torch.zeros(2, 4, 16, 16)
    features[:, :, 1:5, 1:5] = 10.0  # a "marker" in the corner, the strongest response
    features[:, :, 8:13, 6:11] = 4.0  # the hand
    support = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    support[:, :, 24:60, 16:48] = True
    free, _ = attention_boxes(features, (64, 64), reduction="max")
    assert (free[:, :2] < 24).all()  # the corner wins without the mask
    boxes, masks = attention_boxes(features, (64, 64), reduction="max", support=support)
    assert (masks & ~support).sum() == 0
    x1, y1, x2, y2 = boxes[0].tolist()
    assert 16 <= x1 < x2 < 48 and 24 <= y1 < y2 < 60
