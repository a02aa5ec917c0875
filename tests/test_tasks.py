"""The task registry: names, aliases, per-dataset availability, outputs and directions."""

import dataclasses
import functools

import pytest
import torch

from lomt_train.losses import depth_loss
from lomt_train.metrics import DepthMetric
from lomt_train.tasks import TASKS, Task, get_task, resolve_tasks

CELEBA_40 = """
5_o_clock_shadow arched_eyebrows attractive bags_under_eyes bald bangs big_lips big_nose black_hair
blond_hair blurry brown_hair bushy_eyebrows chubby double_chin eyeglasses goatee gray_hair
heavy_makeup high_cheekbones male mouth_slightly_open mustache narrow_eyes no_beard oval_face
pale_skin pointy_nose receding_hairline rosy_cheeks sideburns smiling straight_hair wavy_hair
wearing_earrings wearing_hat wearing_lipstick wearing_necklace wearing_necktie young
""".split()


def test_the_40_celeba_attributes_are_attribute_tasks():
    assert len(CELEBA_40) == 40
    attributes = {name for name, t in TASKS.items() if t.kind == "attribute"}
    assert attributes == set(CELEBA_40)
    assert set(TASKS) == set(CELEBA_40) | {"seg", "depth", "normal", "edge"}


@pytest.mark.parametrize(
    "alias, name",
    [("smile", "smiling"), ("semseg", "seg"), ("segmentation", "seg"), ("normals", "normal"), ("Male", "male")],
)
def test_aliases_and_case(alias, name):
    assert get_task(alias).name == name


def test_out_channels_and_primary_directions():
    expected = {
        "seg": (40, "miou", True),
        "depth": (1, "abs_err", False),
        "normal": (3, "cos_sim", True),
        "edge": (1, "f1", True),
        "male": (1, "accuracy", True),
    }
    for name, (channels, primary, higher) in expected.items():
        task = get_task(name)
        assert task.out_channels(40) == channels
        assert task.primary_metric == primary
        assert task.higher_is_better is higher
    assert get_task("seg").out_channels(13) == 13


def test_resolve_tasks_per_dataset():
    assert [t.name for t in resolve_tasks(["seg", "depth", "normals", "edge"], "nyu")] == ["seg", "depth", "normal", "edge"]
    assert [t.name for t in resolve_tasks("semseg, smile,male", "celeba")] == ["seg", "smiling", "male"]


@pytest.mark.parametrize(
    "names, dataset, message",
    [
        (["depth"], "celeba", r"not available for 'celeba'; valid tasks are \['seg', '5_o_clock_shadow'"),
        (["male"], "nyu", r"valid tasks are \['seg', 'depth', 'normal', 'edge'\]"),
        (["segm"], "nyu", r"unknown task 'segm'; valid tasks are \["),
        (["smile", "smiling"], "celeba", "twice"),
        ([], "nyu", "no tasks given"),
        (["seg"], "cityscapes", r"valid datasets are \['celeba', 'nyu'\]"),
    ],
)
def test_resolve_tasks_errors_name_the_valid_choices(names, dataset, message):
    with pytest.raises(ValueError, match=message):
        resolve_tasks(names, dataset)


def test_depth_loss_option():
    pred = torch.tensor([[[[3.0]], [[1.0]]]]).view(2, 1, 1, 1)
    target = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    # errors 2 and -1: MSE (4 + 1) / 2, L1 (2 + 1) / 2
    (mse,) = resolve_tasks(["depth"], "nyu")
    (l1,) = resolve_tasks(["depth"], "nyu", depth_loss="l1")
    assert mse.loss(pred, target).item() == pytest.approx(2.5)
    assert l1.loss(pred, target).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="unknown depth loss"):
        resolve_tasks(["depth"], "nyu", depth_loss="huber")


def test_a_task_is_one_entry_and_is_checked():
    # A new task needs only its entry; a primary metric its metrics don't compute is refused.
    task = Task("height", "dense", functools.partial(depth_loss, mode="l1"), DepthMetric, "rmse", channels=1)
    assert task.out_channels(40) == 1 and not task.higher_is_better
    with pytest.raises(ValueError, match="primary metric"):
        dataclasses.replace(task, primary_metric="miou")
    with pytest.raises(ValueError, match="kind"):
        dataclasses.replace(task, kind="sparse")
