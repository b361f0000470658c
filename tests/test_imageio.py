import logging

import numpy as np

from exporter.imageio import read_image_folder, write_image_folder


def test_uniform_images_are_written_with_a_warning_naming_them(tmp_path, caplog):
    rng = np.random.default_rng(0)
    images = {(0, k): rng.uniform(-1, 1, (1, 8, 8)).astype(np.float32) for k in range(3)}
    images[(1, 0)] = np.full((1, 8, 8), -1.0, np.float32)  # black
    images[(1, 1)] = np.full((1, 8, 8), 3.0, np.float32)  # saturates to white
    images[(1, 2)] = np.full((1, 8, 8), 0.3, np.float32) + rng.uniform(0, 1e-4, (1, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        write_image_folder(tmp_path / "a", images)
    assert "3 of 6 images are one uniform colour (1_0.png, 1_1.png, 1_2.png)" in caplog.text
    assert len(read_image_folder(tmp_path / "a")) == 6  # still written: the warning does not hide them

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        write_image_folder(tmp_path / "b", {k: v for k, v in images.items() if k[0] == 0})
    assert "uniform" not in caplog.text


def test_palette_and_alpha_pngs_read_as_the_colours_they_show(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    grey = rng.integers(0, 256, (8, 8)).astype(np.uint8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(colour).quantize(colors=16).save(folder / "0_0.png")  # palette of colours
    Image.fromarray(grey).convert("P").save(folder / "0_1.png")  # palette of greys
    Image.fromarray(grey).convert("LA").save(folder / "0_2.png")  # grey with alpha
    images = read_image_folder(folder)
    assert images[(0, 0)].shape == (8, 8, 3)  # before: read as grey
    assert images[(0, 1)].shape == (8, 8) and images[(0, 2)].shape == (8, 8)  # before: LA read as RGB
    np.testing.assert_array_equal(images[(0, 2)], (grey / 127.5 - 1.0).astype(np.float32))
