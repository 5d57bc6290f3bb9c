"""AG-CNN attention crop against OpenCV references: Otsu per image, the chosen component and its box."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from kornia.filters import otsu_threshold

from bonedist.bench.attention import opencv_attention_crops
from bonedist.models.attention import (
    _attention_boxes_opencv,
    attention_boxes,
    attention_heatmap,
    crop_boxes,
    largest_component,
    mask_boxes,
    otsu_levels,
    threshold_mask,
)


def _blobs(seed: int, size: int = 96) -> np.ndarray:
    """A uint8 image of a few bright blobs of different sizes on a dim, noisy background."""
    rng = np.random.default_rng(seed)
    image = rng.normal(40, 8, (size, size))
    for _ in range(4):
        cx, cy, r = rng.integers(10, size - 10, 2).tolist() + [int(rng.integers(4, 14))]
        cv2.circle(image, (cx, cy), r, float(rng.uniform(150, 250)), -1)
    return np.clip(image, 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("seed", range(5))
def test_otsu_is_opencvs_on_the_8_bit_heat(seed):
    """The paper's code thresholded the 8-bit heat with OpenCV's Otsu: the batched version gives its level and mask
    exactly, and agrees with Kornia's float Otsu to within one bin."""
    image = _blobs(seed)
    t_cv, mask_cv = cv2.threshold(image, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    x = torch.from_numpy(image).float().view(1, 1, *image.shape)
    mask, level = otsu_levels(x + 0.5)  # fractions below the next level change nothing
    assert int(level) == int(t_cv) and np.array_equal(mask[0, 0].numpy(), mask_cv.astype(bool))
    _, t_k = otsu_threshold(x)
    assert abs(float(t_k) - t_cv) <= 1 + (float(image.max()) - float(image.min())) / 256


def test_threshold_does_not_depend_on_the_rest_of_the_batch():
    a = torch.from_numpy(_blobs(1)).float().view(1, 1, 96, 96)
    bright = a * 10 + 3000
    _, alone = otsu_threshold(a)
    _, batched = otsu_threshold(torch.cat([a, bright]))
    assert torch.equal(alone.flatten()[0], batched.flatten()[0])
    # and through our whole heat pipeline, a much brighter neighbour changes nothing
    features = torch.rand(1, 8, 6, 6)
    m_alone = threshold_mask(attention_heatmap(features, (48, 48)))
    m_batch = threshold_mask(attention_heatmap(torch.cat([features, features * 50 + 7]), (48, 48)))
    assert torch.equal(m_alone[0], m_batch[0])


@pytest.mark.parametrize("seed", range(5))
def test_largest_component_and_box_match_opencv(seed):
    images = [_blobs(seed * 10 + i) for i in range(3)]
    heat = torch.from_numpy(np.stack(images)).float().unsqueeze(1)  # (3, 1, 96, 96)
    mask = heat > 100
    chosen = largest_component(mask, heat)
    boxes = mask_boxes(chosen)
    for i, image in enumerate(images):
        n, labels, stats, _ = cv2.connectedComponentsWithStats((image > 100).astype(np.uint8), connectivity=8)
        sums = np.bincount(labels.ravel(), weights=image.ravel().astype(float), minlength=n)
        best = 1 + int(np.argmax(sums[1:]))
        assert np.array_equal(chosen[i, 0].numpy(), labels == best)
        x, y, w, h = stats[best, :4]
        assert boxes[i].tolist() == [x, y, x + w - 1, y + h - 1]


def test_empty_mask_keeps_the_whole_image():
    features = torch.zeros(2, 4, 5, 5)  # constant heat: nothing stands out
    boxes, masks = attention_boxes(features, (40, 30), threshold=0.7)
    assert boxes.tolist() == [[0, 0, 29, 39]] * 2 and not masks.any()


def test_fixed_fraction_threshold_and_max_reduction():
    features = torch.zeros(1, 3, 8, 8)
    features[0, 1, 2:4, 5:7] = 5.0  # one hot spot in one channel
    boxes, _ = attention_boxes(features, (64, 64), reduction="max", threshold=0.7)
    x1, y1, x2, y2 = boxes[0].tolist()
    assert 32 <= x1 < x2 <= 63 and 8 <= y1 < y2 <= 40  # around columns 5-6, rows 2-3 of the 8x8 map


def test_crop_takes_the_box_and_resizes():
    image = torch.arange(100.0).view(1, 1, 10, 10)
    crop = crop_boxes(image, torch.tensor([[2, 3, 5, 6]]), (4, 4))
    assert torch.allclose(crop[0, 0], image[0, 0, 3:7, 2:6])


def test_batched_pipeline_agrees_with_the_opencv_loop():
    torch.manual_seed(0)
    features = torch.nn.functional.avg_pool2d(torch.randn(6, 64, 10, 10).relu(), 3, 1)  # (6, 64, 8, 8)
    images = torch.rand(6, 1, 128, 128)
    boxes, _ = attention_boxes(features, (128, 128))
    crops = crop_boxes(images, boxes, (128, 128))
    _, boxes_cv = opencv_attention_crops(features.numpy(), images[:, 0].numpy())
    assert crops.shape == images.shape
    assert np.abs(boxes.numpy() - boxes_cv).max() <= 2  # bilinear upsampling: torch's and OpenCV's round apart


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_cpu_path_picks_the_same_components_as_the_batched_path(seed):
    """On a CPU components are labelled by OpenCV per image; on a GPU by Kornia's union-find for the whole batch:
    the same component (ties included: equal areas go to the first in raster order) and the same boxes."""
    from bonedist.ops import _largest_component_batched, _largest_component_opencv, mask_boxes

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(6, 1, 40, 52, generator=g) > 0.7  # many small components
    mask[0] = False  # an empty image
    mask[1] = False
    mask[1, 0, 2:5, 2:5] = mask[1, 0, 20:23, 30:33] = True  # two of equal area: a tie
    for heat in (torch.rand(6, 1, 40, 52, generator=g) * 255, torch.ones(6, 1, 40, 52)):
        ours, reference = _largest_component_opencv(mask, heat), _largest_component_batched(mask, heat)
        assert torch.equal(ours, reference)
        assert torch.equal(mask_boxes(ours), mask_boxes(reference))
    assert ours[1, 0, 3, 3] and not ours[1, 0, 21, 31]


@pytest.mark.parametrize("reduction, threshold", [("sum", "otsu"), ("max", "otsu"), ("sum", 0.6)])
def test_the_cpu_attention_path_gives_the_batched_paths_boxes_and_crops(reduction, threshold):
    """bench attention on a CPU runs the OpenCV path; a GPU the batched one: same boxes and components, and crops
    sampled at the same points."""
    from kornia.geometry.transform import crop_and_resize

    from bonedist.bench.attention import _inputs
    from bonedist.ops import _largest_component_batched

    features, images = _inputs(12, 160, torch.device("cpu"), seed=3)
    support = torch.zeros(12, 1, 160, 160, dtype=torch.bool)
    support[:, :, 10:150, 20:140] = True
    for sup in (None, support):
        heat = attention_heatmap(features, (160, 160), reduction)
        if sup is not None:
            heat = heat * sup
        boxes, masks = _attention_boxes_opencv(heat, threshold, sup)
        mask = threshold_mask(heat, threshold) & (sup if sup is not None else True)
        component = _largest_component_batched(mask, heat)
        assert torch.equal(masks, component) and torch.equal(boxes, mask_boxes(component))
    x1, y1, x2, y2 = boxes.float().unbind(1)
    corners = torch.stack([torch.stack([x1, y1], 1), torch.stack([x2, y1], 1), torch.stack([x2, y2], 1),
                           torch.stack([x1, y2], 1)], 1)
    reference = crop_and_resize(images, corners, (160, 160), mode="bilinear", align_corners=True)
    assert torch.allclose(crop_boxes(images, boxes, (160, 160)), reference, atol=1e-4)
