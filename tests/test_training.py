"""Training loop: twins, resume, sharding, bad input, TFDS, configs."""

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from helpers import run_cli

from jbnn import data as jdata
from jbnn import training

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # configs/ is imported as a package, as train.py does
    sys.path.insert(0, str(ROOT))

CONFIGS = ("default", "digits", "shapes", "mnist", "cifar10_binarynet", "cifar10_birealnet")
CONFIGS += ("imagenet_birealnet",)


def get_config(name):
    return importlib.import_module(f"configs.{name}").get_config()


def tiny_config(**overrides):
    """Digits at 8 px with a tiny binarized MLP: 22 steps per epoch."""
    config = get_config("digits")
    config.image_size = 8
    config.model = "mlp"
    config.model_kwargs = {"hidden": (32,)}
    config.batch_size = 64
    config.eval_batch_size = 128
    config.num_epochs = 2
    config.optimizer.learning_rate = 3e-3
    config.train_control = False
    config.checkpoint_every_steps = 10
    config.log_every_steps = 4
    config.progress_bar = False
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def snapshot(path: Path) -> dict[str, str]:
    """Hash of every file under ``path``."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def deterministic(lines):
    return [{k: v for k, v in r.items() if k != "examples_per_sec"} for r in lines]


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished study (bnn, fp, control) with the batches each run asked for."""
    workdir = tmp_path_factory.mktemp("study")
    calls = []
    original = jdata.ArraySource.batches

    def recording(self, batch_size, **kwargs):
        if kwargs.get("shuffle", True):
            calls.append((kwargs["seed"], kwargs["epoch"], kwargs.get("skip_batches", 0)))
        return original(self, batch_size, **kwargs)

    steps = []
    config = tiny_config(train_control=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jdata.ArraySource, "batches", recording)
        results = training.train_and_evaluate(
            config, workdir, on_step=lambda run, step: steps.append((run, step))
        )
    return workdir, config, results, calls, steps


# --------------------------------------------------------------------------- the study
def test_study_writes_twins_and_control(trained):
    workdir, config, results, calls, steps = trained
    assert set(results) == {"bnn", "fp", "control"}
    # Same seed and data order for the twins, seed + 1 for the control: 2 epochs each.
    assert calls == [(0, 0, 0), (0, 1, 0)] * 2 + [(1, 0, 0), (1, 1, 0)]
    assert [s for r, s in steps if r == "bnn"] == list(range(1, 45))
    for name in ("bnn", "fp", "control"):
        run_dir = workdir / name
        assert {"config.json", "metrics.jsonl", "results.json", "checkpoints"} <= {
            p.name for p in run_dir.iterdir()
        }
        res = json.loads((run_dir / "results.json").read_text())
        assert res == results[name]
        assert res["steps"] == 44 and res["binary"] == (name == "bnn")
        for key in ("test_accuracy", "test_loss", "num_params", "train_time_s"):
            assert np.isfinite(res[key])
        lines = read_lines(run_dir / "metrics.jsonl")
        assert [r["step"] for r in lines] == [*range(4, 45, 4)]
        for r in lines:
            assert {
                "step",
                "epoch",
                "loss",
                "accuracy",
                "learning_rate",
                "examples_per_sec",
            } <= set(r)
            assert ("flip_ratio" in r) == (name == "bnn")
        assert lines[-1]["epoch"] == 2.0
        # The logged learning rate is the cosine schedule of the step just taken.
        lr = config.optimizer.learning_rate
        want = 0.5 * lr * (1 + np.cos(np.pi * (lines[0]["step"] - 1) / 44))
        assert lines[0]["learning_rate"] == pytest.approx(want, rel=1e-5)
    bnn_lines = read_lines(workdir / "bnn" / "metrics.jsonl")
    assert 0 < bnn_lines[0]["flip_ratio"] < 1
    assert results["fp"]["test_accuracy"] > 0.8  # learns something even in 44 steps
    assert results["bnn"]["num_params"] == results["fp"]["num_params"]
    assert results["bnn"]["num_binary_params"] == 64 * 32 + 32 * 10
    assert results["fp"]["num_binary_params"] == 0


def test_load_run_matches_an_independent_evaluation(trained):
    workdir, _, results, _, _ = trained
    test = jdata.load("digits", "test", image_size=8)
    for name in ("bnn", "fp"):
        model, variables, config = training.load_run(workdir / name)
        assert config.model == "mlp"
        logits = np.asarray(model.apply(variables, jnp.asarray(test.images)))
        accuracy = np.mean(np.argmax(logits, -1) == test.labels)
        logp = (
            logits
            - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1))[:, None]
            - logits.max(-1, keepdims=True)
        )
        loss = -np.mean(logp[np.arange(len(test.labels)), test.labels])
        assert accuracy == pytest.approx(results[name]["test_accuracy"], abs=1e-9)
        assert loss == pytest.approx(results[name]["test_loss"], rel=1e-4)
    bnn_model, bnn_vars, _ = training.load_run(workdir / "bnn")
    kernel = np.asarray(bnn_vars["params"]["dense1"]["kernel"])
    assert np.abs(kernel).max() <= 1.0  # latent weights clipped to kernel_clip
    assert bnn_model.binary and not model.binary


def test_finished_runs_are_not_retrained_unless_forced(trained, tmp_path):
    workdir, config, results, _, _ = trained
    before = snapshot(workdir)
    steps = []
    again = training.train_and_evaluate(config, workdir, on_step=lambda *a: steps.append(a))
    assert steps == [] and again == results and snapshot(workdir) == before
    # A field that does not change the training (logging) is the same run.
    config2 = tiny_config(train_control=True, log_every_steps=7)
    assert training.train_and_evaluate(config2, workdir) == results


def test_force_retrains_from_scratch(tmp_path, caplog):
    config = tiny_config()
    first = training.train_and_evaluate(config, tmp_path)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("the old runs' report")
    steps = []
    with caplog.at_level(logging.INFO, logger="jbnn.training"):
        second = training.train_and_evaluate(
            config, tmp_path, force=True, on_step=lambda run, step: steps.append(step)
        )
    assert steps[0] == 1 and len(steps) == 2 * 44
    # One line per epoch, with the loss and accuracy of the last logged window and its steps
    # (22 steps per epoch, a record every 4 steps: epoch 1's last record is step 20).
    lines = {r["step"]: r for r in read_lines(tmp_path / "bnn" / "metrics.jsonl")}
    epoch_lines = [r.getMessage() for r in caplog.records if ": epoch " in r.getMessage()]
    assert len(epoch_lines) == 4  # bnn and fp, two epochs each
    for message, (end, start, last) in zip(
        epoch_lines[:2], [(22, 17, 20), (44, 41, 44)], strict=True
    ):
        want = (
            f"bnn: epoch {end // 22}/2, step {end}/44, loss {lines[last]['loss']:.4f}, "
            f"accuracy {lines[last]['accuracy']:.4f} (steps {start}-{last}), "
        )
        assert message.startswith(want), (message, want)
    # the report of the replaced runs is kept, with a warning that it is stale
    assert (tmp_path / "report" / "report.md").read_text() == "the old runs' report"
    assert any("no longer describes them" in r.getMessage() for r in caplog.records)
    for name in ("bnn", "fp"):  # deterministic: the same numbers again
        assert second[name]["test_accuracy"] == first[name]["test_accuracy"]
        assert second[name]["test_loss"] == first[name]["test_loss"]


# --------------------------------------------------------------------------- resume
class Interrupt(Exception):
    pass


@pytest.mark.parametrize("binary_optimizer", ["latent", "bop"])
def test_interrupted_run_resumes_and_matches_uninterrupted(tmp_path, binary_optimizer):
    config = tiny_config(**{"binary_optimizer.name": binary_optimizer, "log_every_steps": 3})
    if binary_optimizer == "bop":
        config.binary_optimizer.gamma = 1e-2
        config.binary_optimizer.threshold = 1e-6
    reference = training.train_and_evaluate(config, tmp_path / "ref")

    def stop_at(run_name, at):
        def hook(run, step):
            if run == run_name and step == at:
                raise Interrupt

        return hook

    work = tmp_path / "resumed"
    with pytest.raises(Interrupt):  # killed in epoch 2, after the checkpoint of step 30
        training.train_and_evaluate(config, work, on_step=stop_at("bnn", 35))
    assert not (work / "bnn" / "results.json").exists()
    with pytest.raises(FileNotFoundError, match="half-trained"):
        training.load_run(work / "bnn")
    # Lines after the checkpoint were written before the kill; resuming drops them.
    assert read_lines(work / "bnn" / "metrics.jsonl")[-1]["step"] == 33
    with pytest.raises(Interrupt):  # and once more, in the twin's first epoch
        training.train_and_evaluate(config, work, on_step=stop_at("fp", 13))
    seen = []
    resumed = training.train_and_evaluate(
        config, work, on_step=lambda run, step: seen.append((run, step))
    )
    assert seen[0] == ("fp", 11)  # bnn had finished; fp continues after step 10
    assert seen[-1] == ("fp", 44) and len(seen) == 34
    for name in ("bnn", "fp"):
        assert deterministic(read_lines(work / name / "metrics.jsonl")) == deterministic(
            read_lines(tmp_path / "ref" / name / "metrics.jsonl")
        )
        for key in ("test_accuracy", "test_loss", "final_train_loss", "steps"):
            assert resumed[name][key] == reference[name][key], (name, key)
        _, got, _ = training.load_run(work / name)
        _, want, _ = training.load_run(tmp_path / "ref" / name)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    if binary_optimizer == "bop":  # Bop keeps binary kernels exactly +-1
        _, bnn, _ = training.load_run(work / "bnn")
        for layer in ("dense1", "head"):
            assert set(np.unique(np.asarray(bnn["params"][layer]["kernel"]))) == {-1.0, 1.0}


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path):
    """A torn metrics line and a temporary checkpoint folder (a kill mid-write) are ignored."""
    config = tiny_config()
    reference = training.train_and_evaluate(config, tmp_path / "ref")
    work = tmp_path / "work"

    def hook(run, step):
        if step == 15:
            raise Interrupt

    with pytest.raises(Interrupt):
        training.train_and_evaluate(config, work, on_step=hook)
    ckpt = work / "bnn" / "checkpoints"
    (ckpt / "20.orbax-checkpoint-tmp-1234").mkdir()  # what a kill during save leaves
    with open(work / "bnn" / "metrics.jsonl", "a") as f:
        f.write('{"step": 16, "loss": 0.')  # a torn line
    resumed = training.train_and_evaluate(config, work)
    for name in ("bnn", "fp"):
        assert resumed[name]["test_loss"] == reference[name]["test_loss"]
        assert deterministic(read_lines(work / name / "metrics.jsonl")) == deterministic(
            read_lines(tmp_path / "ref" / name / "metrics.jsonl")
        )


KILL_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import ml_collections
    from jbnn import training

    config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
    training.train_and_evaluate(config, sys.argv[2], on_step=lambda run, step: time.sleep(0.05))
    """
)


@pytest.mark.slow
def test_sigkilled_process_resumes_to_the_uninterrupted_result(trained, tmp_path):
    reference_dir, _, reference, _, _ = trained
    config = tiny_config()
    work = tmp_path / "w"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(config.to_dict()), str(work)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (work / "bnn" / "checkpoints" / "20").exists():
            assert proc.poll() is None, "the training process ended before it was killed"
            assert time.monotonic() < deadline, "no checkpoint of step 20 within 240 s"
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: no cleanup, no exception handler runs
        proc.wait()
    assert not (work / "bnn" / "results.json").exists()
    resumed = training.train_and_evaluate(config, work)
    for name in ("bnn", "fp"):
        for key in ("test_accuracy", "test_loss", "final_train_loss", "steps"):
            assert resumed[name][key] == reference[name][key], (name, key)
        assert deterministic(read_lines(work / name / "metrics.jsonl")) == deterministic(
            read_lines(reference_dir / name / "metrics.jsonl")
        )


# --------------------------------------------------------------------------- bad input
def test_workdir_of_another_config_is_refused_and_kept(trained):
    workdir, _, _, _, _ = trained
    before = snapshot(workdir)
    other = tiny_config(train_control=True, **{"optimizer.learning_rate": 0.5})
    with pytest.raises(training.ConfigMismatchError, match=r"optimizer\.learning_rate"):
        training.train_and_evaluate(other, workdir)
    assert snapshot(workdir) == before


@pytest.mark.parametrize(
    "override, error, match",
    [
        ({"dataset": "nope"}, ValueError, "Unknown dataset 'nope'"),
        ({"model": "resnet9000"}, ValueError, "Unknown model 'resnet9000'"),
        ({"model_kwargs": {"depth": 3}}, ValueError, r"Unknown field\(s\) \['depth'\]"),
        ({"optimizer.name": "sgd"}, ValueError, "Unknown optimizer 'sgd'"),
        ({"binary_optimizer.name": "adam"}, ValueError, "Unknown binary optimizer 'adam'"),
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1"),
        ({"batch_size": 5000}, ValueError, "exceeds the 1437 examples"),
        ({"eval_batch_size": -5}, training.ConfigError, "eval_batch_size must be an int >= 1"),
        ({"augment": {"crop_padding": -1}}, training.ConfigError, r"augment.*crop_padding"),
        (
            {"model": "binarynet", "model_kwargs": {"width": 0.0}},
            training.ConfigError,
            "binarynet: width must be a finite positive",
        ),
        # BinaryNet's three 2x2 pools need 8 px; the bisection finds the smallest size
        (
            {"model": "binarynet", "model_kwargs": {"width": 0.125}, "image_size": 4},
            training.ConfigError,
            r"cannot take 4 x 4 x 1 images.*8 x 8 images and larger",
        ),
        (
            {"dataset": "imagenet2012", "manual_dir": "/no/such/folder"},
            jdata.DatasetNotAvailableError,
            "manual_dir",
        ),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, override, error, match):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep me")
    config = tiny_config()
    for key, value in override.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    with pytest.raises(error, match=match):
        training.train_and_evaluate(config, workdir)
    assert snapshot(workdir) == {"notes.txt": hashlib.sha256(b"keep me").hexdigest()}


@pytest.mark.parametrize(
    "override, match",
    [
        (
            {"optimizer.learning_rate": float("inf")},
            "learning_rate must be a finite number > 0, got inf",
        ),
        (
            {"optimizer.learning_rate": float("nan")},
            "learning_rate must be a finite number > 0, got nan",
        ),
        ({"optimizer.warmup_steps": -3}, "warmup_steps must be an int >= 0, got -3"),
        (
            {"optimizer.name": "adamw", "optimizer.weight_decay": float("inf")},
            "weight_decay must be a finite number >= 0, got inf",
        ),
        (
            {"optimizer.name": "adamw", "optimizer.weight_decay": -0.1},
            "weight_decay must be a finite number >= 0, got -0.1",
        ),
        (
            {"optimizer.name": "adamw", "optimizer.weight_decay": float("nan")},
            "weight_decay must be a finite number >= 0, got nan",
        ),
        ({"optimizer.weight_decay": 0.1}, "weight_decay=0.1: optimizer 'adam' takes no weight"),
        (
            {"binary_optimizer.name": "bop", "binary_optimizer.threshold": float("inf")},
            "threshold must be a finite number >= 0, got inf",
        ),
        (
            {"binary_optimizer.gamma": float("nan")},
            "gamma must be a finite number in (0, 1], got nan",
        ),
    ],
)
def test_optimizer_numbers_are_refused_before_the_data_is_loaded(
    tmp_path, monkeypatch, override, match
):
    # learning_rate=inf and a negative, inf or NaN weight decay trained (NaN from the
    # first step on); the message names the config field and the value.
    monkeypatch.setattr(training, "_load_data", lambda *a: pytest.fail("data loaded"))
    section = next(iter(override)).split(".")[0]
    with pytest.raises(training.ConfigError, match=re.escape(f"config.{section}.{match}")):
        training.train_and_evaluate(tiny_config(**override), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_force_deletes_only_jbnn_runs(tmp_path):
    # --force retrains by deleting workdir/bnn...: a folder there that holds no jbnn run
    # (no config.json) is somebody else's and stays, with nothing trained.
    (tmp_path / "bnn").mkdir()
    (tmp_path / "bnn" / "data.npz").write_text("not a run")
    before = snapshot(tmp_path)
    with pytest.raises(training.ConfigError, match=r"holds no jbnn run.*nothing deleted"):
        training.train_and_evaluate(tiny_config(), tmp_path, force=True)
    assert snapshot(tmp_path) == before


def test_train_cli_reports_clear_one_line_errors(tmp_path):
    # A bad config (found before anything is written) and an override that names no
    # field: one line each, no traceback, exit status 1, the workdir untouched.
    for overrides, message in [
        (("--config.eval_batch_size=-5",), "train.py: config.eval_batch_size must be an int"),
        (
            ("--config.optimizer.lr=0.1",),
            "train.py: --config.optimizer.lr: unknown config field (config.optimizer has no "
            "field 'lr'; its fields: learning_rate,",
        ),
    ]:
        proc = run_cli("train.py", "digits", tmp_path / "w", *overrides)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "w").exists()


def _damage_checkpoint(ckpt: Path, step: int) -> None:
    """Truncates a complete checkpoint's array data to 100 bytes (a disk that filled up,
    a copy cut short): orbax still lists the step, and reading it fails."""
    for f in (ckpt / str(step) / "default").glob("ocdbt.process_0/d/*"):
        os.truncate(f, 100)


def _steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def test_resuming_from_a_damaged_checkpoint_names_it_and_falls_back_only_when_told(
    trained, tmp_path
):
    # A half-trained run whose latest checkpoint is damaged: one line naming the
    # checkpoint, the folder to delete and the intact earlier step (was: orbax's bare
    # Exception, a 150-line traceback); no silent fallback; nothing written or deleted.
    workdir, config, results, _, _ = trained
    work = tmp_path / "w"
    shutil.copytree(workdir, work)
    ckpt = work / "bnn" / training.CHECKPOINT_DIR
    (work / "bnn" / training.RESULTS_FILE).unlink()
    *_, previous, last = _steps(ckpt)
    _damage_checkpoint(ckpt, last)
    before = snapshot(work)
    with pytest.raises(training.DamagedCheckpointError) as info:
        training.train_and_evaluate(config, work)
    message = str(info.value)
    assert isinstance(info.value, training.ConfigError)  # train.py prints it as one line
    assert "\n" not in message, message
    assert re.fullmatch(
        rf"checkpoint of step {last} in {re.escape(str(ckpt))} is damaged or unreadable "
        rf"\(ValueError: .*byte range.*\); delete that step's folder, "
        rf"{re.escape(str(ckpt / str(last)))}, and rerun train\.py \(same --config and "
        rf"--workdir\) to resume from the checkpoint of step {previous}, which reads back "
        r"intact\.",
        message,
    ), message
    assert snapshot(work) == before
    # Doing what it says resumes from that step and ends as the uninterrupted run did.
    shutil.rmtree(ckpt / str(last))
    resumed = training.train_and_evaluate(config, work)
    assert resumed["bnn"] == {
        **results["bnn"],
        "train_time_s": resumed["bnn"]["train_time_s"],
        "examples_per_sec": resumed["bnn"]["examples_per_sec"],
    }
    # No intact checkpoint left: train the run from scratch, by deleting them.
    (work / "bnn" / training.RESULTS_FILE).unlink()
    for step in _steps(ckpt):
        _damage_checkpoint(ckpt, step)
    before = snapshot(work)
    with pytest.raises(
        training.DamagedCheckpointError,
        match=rf"step {last} in .* is damaged or unreadable \(.*\); no earlier checkpoint reads "
        rf"back either \(step {previous}\): delete {re.escape(str(ckpt))} and rerun train\.py "
        r"\(same --config and --workdir\) to train the run in .*bnn from scratch\.$",
    ):
        training.train_and_evaluate(config, work)
    assert snapshot(work) == before


def test_damaged_json_files_of_a_workdir_are_named(trained, tmp_path):
    # A damaged config.json or results.json: a one-line ConfigError naming the file and
    # what to do, before anything is built (was: "Expecting value: line 2 column 1", or a
    # JSONDecodeError traceback after training the runs before it); nothing written.
    workdir, config, results, _, _ = trained
    for name, file, text, match in [
        ("bnn", training.CONFIG_FILE, '{\n  "augm', "is not valid JSON"),
        ("fp", training.CONFIG_FILE, "[1, 2]", "is not a jbnn config"),
        ("fp", training.RESULTS_FILE, "{\n", "is not valid JSON"),
        ("control", training.RESULTS_FILE, '{"run": "control"}', "is not a jbnn results file"),
    ]:
        work = tmp_path / f"{name}-{file}-{len(text)}"
        shutil.copytree(workdir, work)
        if file == training.CONFIG_FILE:  # an unfinished run: its config.json is read
            (work / name / training.RESULTS_FILE).unlink()
        (work / name / file).write_text(text)
        before = snapshot(work)
        with pytest.raises(training.ConfigError) as info:
            with pytest.MonkeyPatch.context() as mp:  # nothing built: no data loaded
                mp.setattr(training, "_load_data", lambda *a: pytest.fail("data loaded"))
                training.train_and_evaluate(config, work)
        message = str(info.value)
        assert message.startswith(f"{work / name / file} {match} ("), message
        assert "\n" not in message and snapshot(work) == before, message
        if file == training.CONFIG_FILE:
            assert "restore it from a copy, or delete " + str(work / name) in message
        else:  # results.json: delete it, and the run is only evaluated again
            assert f"resumes from its last checkpoint (step {results[name]['steps']})" in message
    (work / "control" / training.RESULTS_FILE).unlink()
    steps = []
    again = training.train_and_evaluate(config, work, on_step=lambda *a: steps.append(a))
    assert steps == [] and again == results


def test_a_workdir_that_is_a_file_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    # Was: NotADirectoryError with a traceback from train.py, after data and models were
    # built; the file is left as it was.
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    monkeypatch.setattr(training, "_load_data", lambda *a: pytest.fail("data loaded"))
    for workdir, match in [
        (afile, rf"workdir {re.escape(str(afile))} is a file, not a directory"),
        (
            afile / "sub",
            rf"workdir {re.escape(str(afile / 'sub'))} lies under {re.escape(str(afile))}, "
            "which is a file, not a directory",
        ),
    ]:
        with pytest.raises(training.ConfigError, match=match):
            training.train_and_evaluate(tiny_config(), workdir)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "bnn").write_text("not a run")
    with pytest.raises(training.ConfigError, match=r"w/bnn is a file, not a run directory"):
        training.train_and_evaluate(tiny_config(), tmp_path / "w")
    assert afile.read_text() == "keep me" and (tmp_path / "w" / "bnn").read_text() == "not a run"
    proc = run_cli("train.py", "digits", afile)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py:")]
    assert lines == [
        f"train.py: workdir {afile} is a file, not a directory: pass a --workdir "
        "that is a directory or does not exist yet."
    ], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and afile.read_text() == "keep me"


def test_an_override_into_an_empty_section_points_to_the_dict_literal():
    # configs/shapes.py has an empty data_kwargs: a dotted override names no field (the
    # message listed none: "its fields: ."); the dict literal it suggests does work.
    from absl import flags
    from ml_collections import config_flags

    from jbnn import _cli

    config_file = f"--config={ROOT / 'configs' / 'shapes.py'}"
    for bad, literal in [
        ("--config.data_kwargs.num_examples=500", "{'num_examples': 500}"),
        ("--config.data_kwargs.name=abc", "{'name': 'abc'}"),
    ]:
        message = _cli.override_error(["train.py", config_file, bad], AttributeError("x"))
        flag = f"--config.data_kwargs={literal}"
        assert message == (
            f"{bad.split('=')[0]}: unknown config field (config.data_kwargs is an empty section: "
            f'it has no fields to override; set it as a whole instead, "{flag}").'
        ), message
    argv = ["train.py", config_file, "--config.data_kwargs={'num_examples': 500}"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values, sys_argv=argv)
    values(argv)
    assert values.config.data_kwargs.to_dict() == {"num_examples": 500}
    train, test = training._load_data(values.config)
    assert train.num_examples == test.num_examples == 500  # per split
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            config_file,
            "--workdir=/nonexistent/w",
            "--config.data_kwargs.num_examples=500",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "train.py: --config.data_kwargs.num_examples: unknown config field (config.data_kwargs "
        "is an empty section: it has no fields to override; set it as a whole instead, "
        "\"--config.data_kwargs={'num_examples': 500}\")."
    )


def test_train_step_flags_a_non_finite_gradient_under_a_finite_loss():
    # d/dw sqrt(w - w) is 0.5 / sqrt(0) * 0 = NaN while the term adds 0 to the logits:
    # the loss stays finite, one gradient is NaN; the step must record step 1 (a check
    # of the loss alone would not, and Bop would hide such a NaN in its moment).
    import flax.linen as nn

    from jbnn import optim

    class NanGradient(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            w = self.param("w", nn.initializers.ones, ())
            return nn.Dense(10)(x.reshape(x.shape[0], -1)) + jnp.sqrt(w - w)

    model, shape = NanGradient(), (1, 4, 4, 1)
    tx = optax.adam(1e-3)
    mesh = training.make_mesh(jax.devices()[:1])
    state = training.create_train_state(model, tx, shape, 0, mesh)
    step = training.make_train_step(model, tx, optim.binary_kernels(model, shape), "latent", mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(0, 1, (8, 4, 4, 1)).astype(np.float32),
        "label": rng.integers(0, 10, 8).astype(np.int32),
    }
    state = step(state, training.shard_batch(batch, mesh))
    assert np.isfinite(float(state.loss_sum))
    assert not np.isfinite(np.asarray(state.params["w"]))
    assert int(state.nonfinite_step) == 1


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    original = jdata.ArraySource.batches

    def poisoned(self, batch_size, **kwargs):
        for i, batch in enumerate(original(self, batch_size, **kwargs)):
            if kwargs.get("shuffle", True) and i == 4:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch

    monkeypatch.setattr(jdata.ArraySource, "batches", poisoned)
    config = tiny_config(checkpoint_every_steps=2, log_every_steps=100)
    with pytest.raises(
        training.NonFiniteLossError, match="'bnn'.*non-finite .* at step 5;.*step 4 is kept"
    ):
        training.train_and_evaluate(config, tmp_path)
    steps = sorted(
        int(p.name) for p in (tmp_path / "bnn" / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert steps[-1] == 4


def test_load_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a jbnn run directory"):
        training.load_run(tmp_path / "missing")
    # A study workdir instead of one of its runs: the runs are named.
    for name in ("bnn", "fp"):
        (tmp_path / "w" / name).mkdir(parents=True)
        (tmp_path / "w" / name / training.CONFIG_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"study workdir.*w/bnn, .*w/fp\."):
        training.load_run(tmp_path / "w")


# --------------------------------------------------------------------------- sharding
SHARDING_SCRIPT = textwrap.dedent(
    """
    import json
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jbnn import optim, training
    from jbnn.layers import QuantConv, QuantDense

    assert jax.device_count() == 4, jax.devices()
    # as the fast_compiles fixture: XLA still partitions the programs over the devices and
    # inserts their collectives (the values compared below), only it compiles faster
    jax.config.update("jax_disable_most_optimizations", True)

    class TinyBNN(nn.Module):  # BinaryNet's blocks at toy size: quick to compile
        @nn.compact
        def __call__(self, x, train=False):
            bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
            x = QuantConv(8, kernel_quantizer="ste_sign", kernel_clip=1.0, use_bias=False)(x)
            x = bn()(nn.max_pool(x, (2, 2), (2, 2)))
            x = QuantConv(8, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                          kernel_clip=1.0, use_bias=False)(x)
            x = bn()(nn.max_pool(x, (2, 2), (2, 2))).reshape((x.shape[0], -1))
            x = QuantDense(5, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                           kernel_clip=1.0, use_bias=False)(x)
            return bn()(x)

    model = TinyBNN()
    x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 5
    shape = (1, 16, 16, 3)
    kernels = optim.binary_kernels(model, shape)
    out = {}
    for n in (4, 1):
        mesh = training.make_mesh(jax.devices()[:n])
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
        tx = optim.make_optimizer(
            abstract["params"], kernels, schedule=optim.make_schedule(1e-3, 10))
        state = training.create_train_state(model, tx, shape, 0, mesh)
        step = training.make_train_step(model, tx, kernels, "latent", mesh)
        losses = []
        for _ in range(3):
            batch = training.shard_batch({"image": x, "label": y}, mesh)
            state = step(state, batch)
            losses.append(float(state.loss_sum))  # the loss of this step's batch
            state = state.reset_window()
        out[n] = dict(
            losses=losses,
            batch_devices=len(batch["image"].sharding.device_set),
            shard_shape=list(batch["image"].addressable_shards[0].data.shape),
            param_devices=len(state.params["QuantDense_0"]["kernel"].sharding.device_set),
            replicated=state.params["QuantDense_0"]["kernel"].sharding.is_fully_replicated,
            cache=step._cache_size(),
            kernel=np.asarray(state.params["QuantConv_1"]["kernel"]).ravel().tolist(),
            stats=np.asarray(state.batch_stats["BatchNorm_1"]["var"]).tolist(),
        )
    from configs import digits
    config = digits.get_config()
    config.batch_size = 6
    try:
        training.train_and_evaluate(config, "/nonexistent/never")
    except ValueError as e:
        out["error"] = str(e)
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_train_step_sharded_over_4_devices_equals_1_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    four, one = out["4"], out["1"]
    assert four["batch_devices"] == 4 and four["shard_shape"] == [2, 16, 16, 3]
    assert one["batch_devices"] == 1 and one["shard_shape"] == [8, 16, 16, 3]
    assert four["param_devices"] == 4 and four["replicated"]
    assert four["cache"] == 1 and one["cache"] == 1  # compiled once, reused every step
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(four["kernel"], one["kernel"], atol=1e-5)
    np.testing.assert_allclose(four["stats"], one["stats"], rtol=1e-5)  # global-batch BN
    assert "batch_size=6 does not divide by the 4 devices" in out["error"]


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", CONFIGS)
def test_configs_construct_and_build_their_model(name):
    config = get_config(name)
    training._check_config(config)  # fields, names, optimizer
    assert "explain" in config
    size = config.image_size or {"mnist": 28}.get(config.dataset, 32)
    channels = {"digits": 1, "mnist": 1}.get(config.dataset, 3)
    shape = (1, size, size, channels)
    for binary in (True, False):
        model = training.build_model(config, binary, 10)
        abstract = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros(shape)))
        out = jax.eval_shape(lambda v, m=model: m.apply(v, jnp.zeros(shape)), abstract)
        assert out.shape == (1, 10)


def test_command_line_overrides():
    from absl import flags
    from ml_collections import config_flags

    argv = [
        "train.py",
        f"--config={ROOT / 'configs' / 'shapes.py'}",
        "--config.num_epochs=3",
        "--config.optimizer.learning_rate=0.5",
        "--config.binary_optimizer.name=bop",
        "--config.data_dir=/data",
    ]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values, sys_argv=argv)
    values(argv)
    config = values.config
    assert config.dataset == "shapes" and config.num_epochs == 3
    assert config.optimizer.learning_rate == 0.5 and config.binary_optimizer.name == "bop"
    assert config.data_dir == "/data"


# --------------------------------------------------------------------------- TFDS
@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_tfds_path_with_mock_data(tmp_path, dataset):
    import tensorflow_datasets as tfds  # CI installs the tfds extra: never skipped

    config = get_config("mnist" if dataset == "mnist" else "cifar10_binarynet")
    config.model = "mlp"  # the data path is under test, not the model: keep it quick
    config.model_kwargs = {"hidden": (16,)}
    config.batch_size = 16
    config.eval_batch_size = 16
    config.optimizer.warmup_steps = 0
    config.num_epochs = 1
    config.checkpoint_every_steps = 2
    config.log_every_steps = 2
    config.progress_bar = False
    config.data_dir = str(tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=48):
        results = training.train_and_evaluate(config, tmp_path / "w")
    for name in ("bnn", "fp"):
        res = results[name]
        assert res["steps"] == 3 and res["test_examples"] == 48
        assert res["image_shape"] == ([28, 28, 1] if dataset == "mnist" else [32, 32, 3])
        assert 0.0 <= res["test_accuracy"] <= 1.0 and np.isfinite(res["test_loss"])


# --------------------------------------------------------------------------- loading
def _loud_records(caplog):
    import logging

    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]


def test_load_run_logs_no_warnings(trained, caplog):
    """A read-only CheckpointManager logged 3 absl warnings on every load_run."""
    import logging
    import warnings

    workdir = trained[0]
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("bnn", "fp"):
            training.load_run(workdir / name)
    assert not _loud_records(caplog), _loud_records(caplog)
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]


def test_load_run_skips_a_killed_save_and_names_a_damaged_checkpoint(trained, tmp_path, caplog):
    import logging
    import shutil

    _, want, _ = training.load_run(trained[0] / "bnn")
    run = tmp_path / "bnn"
    shutil.copytree(trained[0] / "bnn", run)
    ckpt = run / training.CHECKPOINT_DIR
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert steps[-1] == trained[2]["bnn"]["steps"]  # the final checkpoint
    # What a kill during the save of a later step leaves: a partial temporary copy.
    partial = ckpt / f"{steps[-1] + 10}.orbax-checkpoint-tmp-1234"
    shutil.copytree(ckpt / str(steps[-1]), partial)
    (partial / "default" / "_METADATA").unlink()
    with caplog.at_level(logging.INFO):
        _, got, _ = training.load_run(run)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    assert not _loud_records(caplog), _loud_records(caplog)
    # The final checkpoint gone, an earlier one left: not the weights results.json
    # describes, refused (was: restored silently).
    final = ckpt / str(steps[-1])
    final.rename(ckpt / str(steps[-1] - 1))
    with pytest.raises(FileNotFoundError, match=f"finished at step {steps[-1]}.*of step"):
        training.load_run(run)
    (ckpt / str(steps[-1] - 1)).rename(final)
    # A complete checkpoint with a damaged file: one line that names it and the way to
    # train the run again (orbax's error is the cause, its first line the reason).
    (ckpt / str(steps[-1]) / "default" / "_METADATA").unlink()
    with pytest.raises(training.DamagedCheckpointError) as info:
        training.load_run(run)
    assert isinstance(info.value.__cause__, ValueError)
    assert re.fullmatch(
        rf"{re.escape(str(run))}: checkpoint of step {steps[-1]} is damaged or unreadable "
        r"\(ValueError: pytree structure error: .*\); it holds the run's final weights: to "
        rf"train them again, delete {re.escape(str(ckpt / str(steps[-1])))} and "
        rf"{re.escape(str(run / 'results.json'))}, then rerun train\.py \(same --config and "
        rf"--workdir\): it resumes from the checkpoint of step {steps[-2]}, which reads back "
        r"intact\.",
        str(info.value),
    ), str(info.value)
    # Only the temporary folder left: no complete checkpoint, the clear error as before.
    for step in steps:
        shutil.rmtree(ckpt / str(step))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        training.load_run(run)


@pytest.mark.parametrize("binary_optimizer", ["latent", "bop"])
def test_train_step_equals_the_update_written_out(binary_optimizer):
    # The donated, jitted step against optax written out step by step (separate jits):
    # parameters, flip ratio (counted against the old kernels) and the finiteness check.
    from configs.default import get_config
    from jbnn import models, optim

    config = get_config()
    config.binary_optimizer.name = binary_optimizer
    model = models.get("mlp", binary=True, num_classes=10, hidden=(48, 32))
    shape = (1, 8, 8, 3)
    kernels = optim.binary_kernels(model, shape)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    tx, _ = training.make_optimizer(config, abstract["params"], kernels, total_steps=100)
    mesh = training.make_mesh(jax.devices()[:1])
    state = training.create_train_state(model, tx, shape, 0, mesh)
    step = training.make_train_step(model, tx, kernels, binary_optimizer, mesh)

    def loss_fn(params, batch_stats, batch):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    # each compiled once (the batch an argument, not a constant baked into the program)
    grad_fn, update_fn = jax.jit(jax.grad(loss_fn)), jax.jit(tx.update)
    apply_fn = jax.jit(
        lambda params, updates: optim.project_binary_kernels(
            optax.apply_updates(params, updates), kernels, binary_optimizer
        )
    )
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {
            "image": rng.uniform(0, 1, (16, 8, 8, 3)).astype(np.float32),
            "label": rng.integers(0, 10, 16).astype(np.int32),
        }
        old = jax.tree.map(np.array, state)  # host copies: the step donates the state
        grads = grad_fn(old.params, old.batch_stats, batch)
        updates, _ = update_fn(grads, old.opt_state, old.params)
        expected = apply_fn(old.params, updates)
        state = step(state, training.shard_batch(batch, mesh))
        for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        flat_old, flat_new = (traverse_util.flatten_dict(p) for p in (old.params, state.params))
        flips = sum(
            int(np.sum((flat_old[p] >= 0) != (np.asarray(flat_new[p]) >= 0))) for p in kernels.paths
        )
        total = sum(flat_old[p].size for p in kernels.paths)
        assert float(state.flip_sum - old.flip_sum) == pytest.approx(flips / total, abs=1e-7)
        assert int(state.nonfinite_step) == -1
    assert float(state.flip_sum) > 0  # weights did flip: the count was exercised
