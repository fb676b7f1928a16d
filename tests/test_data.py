import numpy as np
import pytest
from PIL import Image

from sra2.data.demo import write_demo_dataset
from sra2.data.images import (
    BadImage,
    DataError,
    center_crop_arr,
    list_images,
    load_cropped,
    load_crops,
    load_rgb,
)

from conftest import jpeg_bytes, write_folder


def test_labels_follow_sorted_class_folders(tmp_path):
    img = jpeg_bytes(np.zeros((8, 8, 3), np.uint8))
    write_folder(tmp_path, {"n02/b.JPEG": img, "n01/z.JPEG": img, "n01/a.jpeg": img,
                            "n03/c.png": img, "n03/notes.txt": b"x"})
    listed = list_images(tmp_path)
    assert listed.classes == ["n01", "n02", "n03"]
    assert listed.files == ["n01/a.jpeg", "n01/z.JPEG", "n02/b.JPEG", "n03/c.png"]
    assert listed.labels == [0, 0, 1, 2]


def test_missing_root_and_empty_class_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        list_images(tmp_path)


def test_adm_crop_matches_hand_computation(photo):
    # 512x512 photo to 128: BOX-halve twice (512 >= 256, 256 >= 256), bicubic is then the identity
    out = center_crop_arr(Image.fromarray(photo), 128)
    x = photo.astype(np.float64)
    for _ in range(2):
        x = (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]) / 4
    assert out.shape == (128, 128, 3)
    # PIL rounds to uint8 after each halving: at most 1 grey level per halving
    assert np.abs(out - x).max() <= 2.0
    direct = np.asarray(Image.fromarray(photo).resize((128, 128), Image.BICUBIC), np.float64)
    assert np.abs(direct - x).max() > 10  # a crop without the BOX halvings is told apart


def test_adm_crop_takes_the_centre_of_a_wide_image():
    wide = np.zeros((64, 160, 3), np.uint8)
    wide[:, 48:112] = 255  # the central 64 columns
    out = center_crop_arr(Image.fromarray(wide), 64)
    assert out.shape == (64, 64, 3) and out.min() == 255


def test_awkward_files_become_rgb_or_clear_rejections(tmp_path, photo):
    small = photo[::8, ::8]
    cmyk, gray, png = tmp_path / "cmyk.JPEG", tmp_path / "gray.JPEG", tmp_path / "png.JPEG"
    cmyk.write_bytes(jpeg_bytes(small, "CMYK"))
    gray.write_bytes(jpeg_bytes(small, "L"))
    Image.fromarray(small).save(png, format="PNG")
    for f in (cmyk, gray, png):
        assert load_rgb(f).mode == "RGB" and load_cropped(f, 32).shape == (32, 32, 3)
    truncated, empty, text = tmp_path / "t.JPEG", tmp_path / "e.JPEG", tmp_path / "x.JPEG"
    truncated.write_bytes(jpeg_bytes(small)[:300])
    empty.write_bytes(b"")
    text.write_text("not an image")
    for f, reason in [(truncated, "OSError|truncated"), (empty, "empty file"),
                      (text, "cannot identify")]:
        with pytest.raises(BadImage, match=reason):
            load_rgb(f)


def test_demo_dataset_is_real_jpegs_and_deterministic(tmp_path):
    write_demo_dataset(tmp_path / "a", 3, 4, 40, 140, seed=7)
    write_demo_dataset(tmp_path / "b", 3, 4, 40, 140, seed=7)
    listed = list_images(tmp_path / "a")
    assert len(listed) == 12 and len(listed.classes) == 3
    for rel in listed.files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
        with Image.open(tmp_path / "a" / rel) as im:
            assert im.format == "JPEG" and 40 <= min(im.size) and max(im.size) <= 140


def test_load_crops_takes_every_file_or_a_spread_over_the_classes(tmp_path):
    write_demo_dataset(tmp_path, 3, 4, 40, 140, seed=7)
    listed = list_images(tmp_path)
    every = load_crops(tmp_path, 16)
    assert every.shape == (12, 16, 16, 3) and every.dtype == np.uint8
    np.testing.assert_array_equal(every[5], load_cropped(tmp_path / listed.files[5], 16))
    spread = load_crops(tmp_path, 16, count=3)  # files 0, 6 and 11: one of each class
    np.testing.assert_array_equal(spread, every[[0, 6, 11]])
    assert [listed.labels[i] for i in (0, 6, 11)] == [0, 1, 2]
