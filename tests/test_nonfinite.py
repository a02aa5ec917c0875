"""A batch that makes the loss non-finite is skipped and reported; many in a row stop the run."""

import json

import numpy as np
import pytest
import torch

from lomt_train.data import make_synthetic_nyu
from lomt_train.nonfinite import NonFiniteError
from lomt_train.trainer import train

from test_trainer import _config


def _data(tmp_path, poisoned: list[str]):
    """A synthetic NYU-v2 folder whose listed train items have one depth pixel of 1e20 (the
    squared error overflows float32)."""
    root = make_synthetic_nyu(tmp_path / "nyu", num_train=8, num_val=2, num_test=2, size=(32, 32))
    for item in poisoned:
        depth = np.load(root / "depth" / f"{item}.npy")
        depth[5, 5] = 1e20
        np.save(root / "depth" / f"{item}.npy", depth)
    return root


def test_a_nan_batch_is_skipped_and_counted(tmp_path):
    root = _data(tmp_path, ["000003"])
    config = _config(tmp_path, dataset="nyu", tasks=["seg", "depth"], synthetic=False, data=str(root), lambda_=0.5)
    result = train(config, progress=False)
    assert [row["skipped_steps"] for row in result.history] == [1, 1]  # one of the two batches per epoch
    assert [row["nonfinite_groups"] for row in result.history] == [0, 0]
    assert json.loads((result.run_dir / "results.json").read_text())["test"]["depth"]
    model = torch.load(result.run_dir / "last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(value).all() for value in model.values())


def test_non_finite_steps_in_a_row_stop_the_run_naming_batch_and_task(tmp_path):
    root = _data(tmp_path, [f"{i:06d}" for i in range(8)])
    config = _config(
        tmp_path, dataset="nyu", tasks=["seg", "depth"], synthetic=False, data=str(root), max_nonfinite_steps=2,
    )
    with pytest.raises(NonFiniteError, match=r"epoch 1, batch 2 \(items 0000\d\d, .*\): non-finite loss of task depth; "
                                             r"step skipped \(2 in a row, 2 in all\); stopping"):
        train(config, progress=False)
