"""End-to-end runs of the trainer and the CLI on tiny synthetic data."""

import json

import pytest
import torch

from lomt_train.checkpoint import load_checkpoint
from lomt_train.cli import main
from lomt_train.config import RunConfig
from lomt_train.tasks import get_task
from lomt_train.trainer import WALL_CLOCK_KEYS, open_run, recalibrate_batchnorm, run_dir_for, run_epoch, train

TINY = dict(
    synthetic=True, backend="torch", backbone="small", aspp_channels=8, image_size=32, batch_size=4,
    epochs=2, lr=2e-3, synthetic_images=8, timing_repeats=1, device="cpu",
)


@pytest.fixture(autouse=True)
def _data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMT_DATA_CACHE", str(tmp_path / "cache"))


def _config(tmp_path, **overrides) -> RunConfig:
    values = {**TINY, "out": str(tmp_path / "runs"), **overrides}
    return RunConfig(**values)


def train_epochs(config: RunConfig, epochs: int, **kwargs) -> None:
    """Train ``epochs`` epochs of ``config`` and stop, as an interrupted run leaves its folder."""
    with open_run(config, progress=False, **kwargs) as run:
        for _ in range(epochs):
            run_epoch(run)


def without_wall_clock(history: list[dict]) -> list[dict]:
    """History rows without the entries that depend on the machine's speed."""
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_KEYS} for row in history]


@pytest.mark.parametrize(
    "dataset, tasks", [("nyu", ["seg"]), ("nyu", ["seg", "normal", "depth"]), ("celeba", ["seg", "male", "smile"])]
)
def test_run_writes_a_complete_folder(tmp_path, dataset, tasks):
    config = _config(tmp_path, dataset=dataset, tasks=tasks, lambda_=2.0)
    result = train(config, progress=False)
    run = result.run_dir
    for name in ("config.json", "history.json", "history.csv", "last.pt", "best.pt", "sparsity.json", "timing.json", "results.json"):
        assert (run / name).is_file(), name
    assert RunConfig.load(run / "config.json") == config
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    results = json.loads((run / "results.json").read_text())
    assert set(results["test"]) == {t if t != "smile" else "smiling" for t in tasks}
    # Every metric a task declares, the papers' ones included, reaches results.json and the history.
    for task in results["test"]:
        names = set(get_task(task).metrics().directions)
        assert set(results["test"][task]) == names and set(history[-1]["val"][task]) == names
    assert "iou_micro_per_image_paper" in results["test"]["seg"]
    assert results["group_sparsity"] > 0
    timing = json.loads((run / "timing.json").read_text())
    assert timing["backbone"][0]["median_ms"] > 0 and timing["model"][0]["batch_size"] == 1
    # The device settings that ran (all auto on the CPU: full precision, no workers) and the
    # loader and model throughput of every epoch, in the history and its CSV.
    assert results["runtime"] == {"device_type": "cpu", "workers": 0, "pin_memory": False, "amp_dtype": None,
                                  "channels_last": False}
    assert all(row["images_per_s"]["loader"] > 0 and row["images_per_s"]["model"] > 0 for row in history)
    header = (run / "history.csv").read_text().splitlines()[0].split(",")
    assert {"images_per_s/loader", "images_per_s/model"} <= set(header)


@pytest.mark.parametrize("dataset, tasks", [("nyu", ["depth"]), ("celeba", ["male"])])
def test_every_seed_trains_selects_and_tests_on_the_same_disjoint_splits(tmp_path, dataset, tasks):
    """splits.json (ids per split) is the dataset's, not the run's: the same for two seeds, and
    its splits are disjoint, so the model is chosen on images it is never tested on."""
    splits = []
    for seed in (0, 1):
        result = train(_config(tmp_path, dataset=dataset, tasks=tasks, seed=seed, epochs=1), progress=False)
        splits.append(json.loads((result.run_dir / "splits.json").read_text()))
        assert json.loads((result.run_dir / "results.json").read_text())["test_split"] == "test"
    assert splits[0] == splits[1]
    train_ids, val_ids, test_ids = (set(splits[0][name]) for name in ("train", "val", "test"))
    assert train_ids and val_ids and test_ids
    assert not (train_ids & val_ids or train_ids & test_ids or val_ids & test_ids)


def test_resume_ends_exactly_as_an_uninterrupted_run(tmp_path):
    straight = _config(tmp_path / "a", dataset="nyu", tasks=["seg", "depth"], lambda_=0.05, epochs=3, augment=True)
    interrupted = _config(tmp_path / "b", dataset="nyu", tasks=["seg", "depth"], lambda_=0.05, epochs=3, augment=True)
    train(straight, progress=False)
    train_epochs(interrupted, 1)
    assert len(json.loads((run_dir_for(interrupted) / "history.json").read_text())) == 1
    train(interrupted, progress=False, resume=True)

    a, b = (load_checkpoint(run_dir_for(c) / "last.pt") for c in (straight, interrupted))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert without_wall_clock(a["history"]) == without_wall_clock(b["history"])
    results = [json.loads((run_dir_for(c) / "results.json").read_text()) for c in (straight, interrupted)]
    assert results[0]["test"] == results[1]["test"]


@pytest.mark.slow
def test_gpu_style_settings_run_and_resume_exactly_on_the_cpu(tmp_path):
    """Loader workers, bf16 autocast and channels_last (CUDA's auto settings, asked for here on
    the CPU): the run trains, records them, and still resumes bit for bit, since the workers'
    seeds derive from (seed, epoch)."""
    options = dict(dataset="nyu", tasks=["seg", "depth"], lambda_=0.05, augment=True, workers=1, amp=True,
                   channels_last=True)
    straight, interrupted = _config(tmp_path / "a", **options), _config(tmp_path / "b", **options)
    result = train(straight, progress=False)
    train_epochs(interrupted, 1)
    train(interrupted, progress=False, resume=True)
    a, b = (load_checkpoint(run_dir_for(c) / "last.pt") for c in (straight, interrupted))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert without_wall_clock(a["history"]) == without_wall_clock(b["history"])
    runtime = json.loads((result.run_dir / "results.json").read_text())["runtime"]
    assert runtime == {"device_type": "cpu", "workers": 1, "pin_memory": False, "amp_dtype": "bfloat16",
                       "channels_last": True}
    assert all(torch.isfinite(v).all() for v in a["model"].values() if v.is_floating_point())


def test_an_existing_run_is_not_overwritten(tmp_path):
    config = _config(tmp_path, dataset="nyu", tasks=["depth"], epochs=1)
    train(config, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, progress=False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nyu", "--tasks", "seg,male", "--synthetic"], "not available for 'nyu'"),
        (["celeba", "--tasks", "seg", "--synthetic", "--lambda", "-1"], "lambda_=-1.0 is negative"),
        (["nyu", "--tasks", "seg", "--data", "/nonexistent/nyu"], "no such folder"),
        (["nyu", "--tasks", "seg"], "--data PATH, or use --synthetic"),
        (["nyu", "--tasks", "seg", "--synthetic", "--attach", "seg"], "expected TASK=LAYER"),
        (["nyu", "--tasks", "seg", "--synthetic", "--lambda", "nan"], "lambda_=nan: it must be a finite number >= 0"),
        (["nyu", "--tasks", "seg", "--synthetic", "--lr", "-1"], "lr=-1.0: it must be a finite number > 0"),
        (["nyu", "--tasks", "seg", "--synthetic", "--weight-decay", "inf"], "weight_decay=inf"),
        (["nyu", "--tasks", "seg", "--synthetic", "--image-size", "0"], "image_size=0: it must be >= 8"),
        (["nyu", "--tasks", "seg", "--synthetic", "--max-nonfinite-steps", "0"], "max_nonfinite_steps=0"),
        (["nyu", "--tasks", "seg", "--synthetic", "--lomt", "/nonexistent/profile.json"], "profile.json"),
    ],
)
def test_cli_rejects_bad_input_before_any_work(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    # One error line, no traceback; only the missing-data error goes on to list the layouts.
    first, *rest = err.splitlines()
    assert first.startswith("lomt_train: error:") and message in first and "Traceback" not in err
    assert not rest or "--synthetic" in message
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cli_asks_for_a_gpu_that_is_not_there(tmp_path, capsys):
    assert main(["nyu", "--tasks", "seg", "--synthetic", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cli_sweep_and_report(tmp_path):
    out = tmp_path / "runs"
    tiny_flags = [
        "--backend", "torch", "--image-size", "32", "--batch-size", "4", "--epochs", "2",
        "--aspp-channels", "8", "--synthetic-images", "8", "--device", "cpu", "--no-progress",
    ]
    argv = ["celeba", "--tasks", "seg,smile", "--synthetic", "--lambda", "0", "2", "--seeds", "0", "1", "--out", str(out)]
    assert main(argv + tiny_flags) == 0
    runs = sorted(out.rglob("results.json"))
    assert len(runs) == 4
    report = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report)]) == 0
    table = (report / "table.md").read_text()
    assert "smiling/accuracy" in table and "± " in table
    assert sorted(p.name for p in report.glob("*.png")) == [
        "channels_celeba-seg+smiling.png", "lambda_celeba-seg+smiling.png", "lambda_sparsity.png"]
    csv_lines = (report / "table.csv").read_text().splitlines()
    assert len(csv_lines) == 3  # header + two lambda_ values


def test_dry_run_prints_what_would_run_and_writes_nothing(tmp_path, capsys):
    argv = ["nyu", "--tasks", "seg,depth", "--synthetic", "--paper", "--lambda", "0", "1e-3", "--seeds", "0", "1",
            "--out", str(tmp_path / "runs"), "--dry-run"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["lambdas"] == [0.0, 1e-3] and plan["seeds"] == [0, 1] and len(plan["runs"]) == 4
    assert plan["config"]["image_size"] == 256 and plan["config"]["lr"] == 1e-4  # --paper over --synthetic
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    assert main([*argv, "--lr", "-1"]) == 2  # checked as training would check it


def test_the_depth_head_starts_at_the_training_splits_mean_depth(tmp_path):
    # A head that starts at 0 predicts metres short and Adam needs hundreds of steps to get there.
    config = _config(tmp_path, dataset="nyu", tasks=["seg", "depth"])
    with open_run(config, progress=False) as run:
        model = run.state.model.eval()
        pred_sum = target_sum = count = 0.0
        with torch.no_grad():
            for index in range(len(run.train_set)):
                sample = run.train_set[index]
                depth = model(sample["image"][None])["depth"][0]
                valid = sample["depth"] > 0
                pred_sum += depth[valid].sum().item()
                target_sum += sample["depth"][valid].sum().item()
                count += valid.sum().item()
    target_mean = target_sum / count
    # The untrained head's weights add a term of the order of their own scale (a tenth of a metre).
    assert abs(pred_sum / count - target_mean) < 0.5
    assert run.output_bias["depth"] == pytest.approx(target_mean, rel=0.05)  # files' resolution vs the resized maps
    results = train(config, progress=False).run_dir / "results.json"
    assert json.loads(results.read_text())["output_bias"] == run.output_bias


def test_batchnorm_statistics_are_recomputed_with_the_current_weights(tmp_path):
    config = _config(tmp_path, dataset="nyu", tasks=["seg"])
    with open_run(config, progress=False) as run:
        model = run.state.model
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(100.0)
        momentum = bn.momentum
        inputs = []
        handle = bn.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach()))
        recalibrate_batchnorm(model, run, epoch=0)
        handle.remove()
        # Equal batches (the short one is dropped): the average of the batch means is their mean.
        expected = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
        torch.testing.assert_close(bn.running_mean, expected, rtol=1e-5, atol=1e-6)
        assert bn.momentum == momentum and model.training
        assert sum(x.shape[0] for x in inputs) == len(run.train_set) // config.batch_size * config.batch_size
