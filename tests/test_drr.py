"""Synthetic radiographs from CT: Beer-Lambert values, display orientation, projected masks."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.drr import MU_WATER_PER_MM, drr_from_nifti, drr_from_volume
from medvlm.errors import InputError
from tests.conftest import data_dir


def test_beer_lambert_and_orientation_on_a_synthetic_volume() -> None:
    hu = np.full((40, 20, 30), -1000.0, dtype=np.float32)  # air: X = patient left, Y = posterior, Z = superior
    hu[5:10, :, 25:28] = 0.0  # water slab on the patient's RIGHT (small X), near the top (large Z)
    labels = np.zeros(hu.shape, np.int32)
    labels[5:10, 3:7, 25:28] = 4
    drr = drr_from_volume(hu, (1.0, 2.0, 1.0), labels, {4: "liver"}, isotropic=False)
    assert drr.image.shape == (30, 40) and drr.spacing_mm == (1.0, 1.0)
    assert drr.tau is not None
    # 20 voxels of water, 2 mm deep each: tau = 40 mm * mu_water
    assert drr.tau[30 - 1 - 26, 7] == pytest.approx(40 * MU_WATER_PER_MM, rel=1e-5)
    assert drr.tau[0, 30] == 0.0  # air attenuates nothing
    rows, cols = np.nonzero(drr.masks["liver"])
    assert set(rows) == {2, 3, 4} and set(cols) == {5, 6, 7, 8, 9}  # top rows, image left = patient's right
    assert drr.image.max() == pytest.approx(1.0) and drr.image[0, 30] == 0.0


def test_isotropic_resampling_and_bad_input() -> None:
    hu = np.zeros((10, 8, 6), np.float32)
    drr = drr_from_volume(hu, (1.0, 1.0, 3.0), np.ones(hu.shape, np.int32))
    assert drr.image.shape == (18, 10) and drr.spacing_mm == (1.0, 1.0)
    assert drr.masks["label 1"].all()
    with pytest.raises(InputError):
        drr_from_volume(np.zeros((3, 3)), (1, 1, 1))
    with pytest.raises(InputError):
        drr_from_volume(hu, (1, 0, 1))
    with pytest.raises(InputError):
        drr_from_volume(hu, (1, 1, 1), np.zeros((2, 2, 2), np.int32))


@pytest.mark.data
def test_totalsegmentator_example_projects_organs_on_their_sides() -> None:
    import json

    root = data_dir("ct_totalsegmentator_example")
    names = {int(k): v for k, v in json.loads((root / "labels.json").read_text())["total"]["label_names"].items()}
    drr = drr_from_nifti(root / "example_ct_sm.nii.gz", root / "example_seg.nii.gz", names)
    assert drr.image.shape == (30, 122) and drr.spacing_mm == (3.0, 3.0)
    liver_x = np.nonzero(drr.masks["liver"])[1].mean()
    spleen_x = np.nonzero(drr.masks["spleen"])[1].mean()
    assert liver_x < spleen_x  # patient's right (liver) on the image left
    # denser where organs overlap than in the air beside the body
    assert drr.image[:, 61].mean() > drr.image[:, 0].mean()
