"""Without ``--data``: ``$LOMT_DATA/<dataset>``, or an error that says where the data comes from."""

from __future__ import annotations

import pytest

from lomt_train.cli import build_parser, config_from_args
from lomt_train.data import DATA_ENV, default_data_root


def test_lomt_data_holds_one_folder_per_dataset(monkeypatch, tmp_path):
    (tmp_path / "celeba").mkdir()
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert default_data_root("celeba") == tmp_path / "celeba"
    args = build_parser().parse_args(["celeba", "--tasks", "seg,male"])
    config, _, _ = config_from_args("celeba", args)
    assert config.data == str(tmp_path / "celeba") and not config.synthetic


@pytest.mark.parametrize(
    "dataset, published, layout",
    [
        ("nyu", ["NYUD_MT.tgz", "github.com/lorenmt/mtan"], ["gt_sets/train.txt", "train/normal/<i>.npy"]),
        ("celeba", ["github.com/switchablenorms/CelebAMask-HQ"], ["CelebAMask-HQ-attribute-anno.txt"]),
    ],
)
def test_no_data_says_where_it_is_published_and_its_layout(monkeypatch, tmp_path, dataset, published, layout):
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(ValueError) as unset:
        default_data_root(dataset)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(ValueError) as missing:
        default_data_root(dataset)
    assert "$LOMT_DATA is not set" in str(unset.value)
    assert f"$LOMT_DATA/{dataset} ({tmp_path / dataset}) is not a folder" in str(missing.value)
    for message in (str(unset.value), str(missing.value)):
        assert "--synthetic to run now" in message
        for text in published + layout:
            assert text in message


def test_synthetic_and_data_need_no_lomt_data(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_ENV, raising=False)
    synthetic, _, _ = config_from_args("nyu", build_parser().parse_args(["nyu", "--tasks", "seg", "--synthetic"]))
    given, _, _ = config_from_args("nyu", build_parser().parse_args(["nyu", "--tasks", "seg", "--data", str(tmp_path)]))
    assert synthetic.data is None and given.data == str(tmp_path)
