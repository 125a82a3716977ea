import torch
from PIL import Image

from ldm.images import make_grid, save_gif, save_grid, save_strip, to_uint8


def test_to_uint8_maps_range_and_clamps():
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 3.0, -5.0])).tolist() == [0, 128, 255, 255, 0]


def test_grid_places_images_row_major(tmp_path):
    imgs = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 1.0, -1.0)])
    grid = make_grid(imgs, nrow=2, padding=1)
    assert grid.shape == (1, 7, 7)
    assert grid[0, 1, 1] == 0 and grid[0, 1, 4] == 255 and grid[0, 4, 1] == 0
    path = save_grid(imgs, tmp_path / "g.png", nrow=2, scale=3)
    assert Image.open(path).size == (30, 30)  # default padding 2: (2 + 2·4) · 3


def test_strip_and_gif(tmp_path):
    rows = [torch.rand(5, 3, 4, 4) * 2 - 1, torch.rand(5, 3, 4, 4) * 2 - 1]
    assert Image.open(save_strip(rows, tmp_path / "s.png")).size == (2 + 5 * 6, 2 + 2 * 6)
    gif = Image.open(save_gif([torch.rand(2, 1, 4, 4) for _ in range(4)], tmp_path / "a.gif"))
    assert gif.n_frames == 4
