"""Image grids: the tiling (torchvision's make_grid), and captioned grids with a verdict frame per image."""
import numpy as np
import pytest
import torch

from policy.images import FAIL_COLOR, PASS_COLOR, captioned_grid, image_grid, save_captioned_grid, save_grid


def _images(b=5, h=6, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200, (b, h, w, 3), dtype=torch.uint8, generator=g)


def _manual_tiling(arr, nrow, pad, scale):
    """An independent tiling: white canvas, image i at row i // nrow, column i % nrow."""
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    b, h, w, _ = arr.shape
    rows = -(-b // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    return grid


@pytest.mark.parametrize("nrow,pad,scale", [(None, 2, 1), (2, 2, 3), (5, 1, 1), (3, 0, 2)])
def test_image_grid_places_every_image(nrow, pad, scale):
    imgs = _images()
    grid = image_grid(imgs, nrow=nrow, pad=pad, scale=scale)
    assert grid.dtype == np.uint8
    assert np.array_equal(grid, _manual_tiling(imgs.numpy(), nrow or 3, pad, scale))   # default: ceil(sqrt(5))
    assert np.array_equal(image_grid(imgs.numpy(), nrow=nrow, pad=pad, scale=scale), grid)   # numpy input too


def test_image_grid_rejects_other_layouts():
    with pytest.raises(ValueError, match=r"uint8 images \[B, H, W, 3\]"):
        image_grid(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        image_grid(torch.zeros(2, 4, 4, 3))


def test_captioned_grid_rows_captions_and_verdict_frames():
    imgs = _images(b=5, h=40, w=30)
    verdicts = [1.0, 0.0, None, True, 0]
    pad = 4
    grid = captioned_grid(imgs, ["first prompt", "second prompt"], nrow=3, verdicts=verdicts, pad=pad)
    assert grid.shape[1] == 3 * (30 + pad) + pad
    # find each image by content: it is pasted unchanged except the verdict mark in its top-right corner
    mark = max(10, 30 // 5)
    positions = []
    for i in range(5):
        target = imgs[i].numpy()
        hits = [(y, x) for y in range(grid.shape[0] - 40 + 1) for x in range(pad, grid.shape[1] - 30 + 1, 30 + pad)
                if np.array_equal(grid[y + mark + 4:y + 40, x:x + 30], target[mark + 4:])]
        assert len(hits) == 1, (i, hits)
        positions.append(hits[0])
    (y0, x0), (y3, x3) = positions[0], positions[3]
    assert x0 == x3 == pad and y3 > y0 + 40                       # image 3 starts the second row
    assert [p[0] for p in positions[:3]] == [y0] * 3 and positions[4][0] == y3
    assert y0 > 13 and y3 - (y0 + 40) > 13                        # a caption strip above each row
    for (y, x), v in zip(positions, verdicts):
        left = grid[y + 20, x - 1]                                # the padding just left of the image
        if v is None:
            assert tuple(left) == (255, 255, 255)
        else:
            assert tuple(left) == (PASS_COLOR if v else FAIL_COLOR)
        corner = grid[y + 2:y + 2 + mark, x + 30 - mark - 2:x + 28]
        if v is not None:                                         # the drawn mark is in the verdict's colour
            assert ((corner == np.array(PASS_COLOR if v else FAIL_COLOR)).all(-1)).sum() > 5
    # the caption strips hold dark text pixels, the rest of the strip is white
    strip = grid[:y0 - pad]
    assert (strip.max(-1) < 100).sum() > 20


def test_captioned_grid_row_tally_and_validation(tmp_path):
    wide = _images(b=8, h=16, w=64)
    plain = captioned_grid(wide, ["a", "b"], nrow=4)
    judged = captioned_grid(wide, ["a", "b"], nrow=4, verdicts=[1, 0, 1, 1, 0, 0, 0, 1])
    assert plain.shape == judged.shape                            # "k/n correct" fits on the caption line
    narrow = captioned_grid(wide[:, :, :8], ["a long prompt that cannot fit in one line", "b"], nrow=4)
    assert narrow.shape[0] > plain.shape[0]                       # long captions wrap onto more lines
    imgs = _images(b=4, h=8, w=8)
    with pytest.raises(ValueError, match="1 captions for 2 rows"):
        captioned_grid(imgs, ["only one"], nrow=2)
    with pytest.raises(ValueError, match="3 verdicts for 4 images"):
        captioned_grid(imgs, ["a", "b"], nrow=2, verdicts=[1, 0, 1])
    with pytest.raises(ValueError, match="3 scores for 4 images"):
        captioned_grid(imgs, ["a", "b"], nrow=2, scores=[1.0, 0.0, 1.0])
    # scores without verdicts: no frame (the padding stays white), each image labelled in its top-left corner
    black = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    scored = captioned_grid(black, ["a"], nrow=2, scores=[21.25, 19.5], score_name="pickscore", pad=6)
    y0 = int(np.nonzero((scored[:, 60] == 0).all(-1))[0][0])            # the first row of the first image
    assert (scored[y0 - 3:y0, :] == 255).all() and (scored[y0:y0 + 64, 3:6] == 255).all()   # white padding
    assert (scored[y0 + 1:y0 + 12, 7:30] == 255).all(-1).sum() > 10       # the label's white box on a black image
    assert (scored[y0 + 1:y0 + 12, 7:30] < 100).all(-1).sum() > 5         # and its dark digits
    assert (scored[y0 + 20:y0 + 64, 6:70] == 0).all()                     # below it the image is untouched
    from PIL import Image
    path = save_captioned_grid(imgs, tmp_path / "g" / "grid.png", ["a", "b"], nrow=2, verdicts=[1, 0, 1, 1], scale=2)
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")),
                              captioned_grid(imgs, ["a", "b"], nrow=2, verdicts=[1, 0, 1, 1], scale=2))
    assert not list(path.parent.glob("*.tmp*"))
    path = save_grid(imgs, tmp_path / "plain.png", nrow=4)
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), image_grid(imgs, nrow=4))
