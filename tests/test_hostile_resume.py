"""A resume or a stop that never ends (issue 27, items 10 and 11): a crafted data-order position is
bounded by the checkpoint's iteration, the replay to it honours SIGTERM, and SIGTERM during a
run's final evaluation stops the run instead of being swallowed."""

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from test_reliability import _det_cfg, tiny_cfg

from moco.utils.cli import Interrupted
from moco.utils.hooks import SignalStop, stop_requested


@pytest.fixture(scope="module")
def det_checkpoint(synthetic_root, tmp_path_factory):
    """A fine-tune of 2 iterations: model_final.pth at iteration 1, 2 batches consumed."""
    from detection.data.datasets import register_synthetic
    from detection.trainer import DetectionTrainer

    register_synthetic(synthetic_root)
    out = tmp_path_factory.mktemp("det")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = DetectionTrainer(
            _det_cfg(out, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "2")
        )
        trainer.resume_or_load(resume=True)
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert saved["iteration"] == 1 and saved["trainer"]["hooks"]["DataOrder"]["batches"] == 2
    return out, saved


@pytest.mark.parametrize("batches", [3, 200_000, 2**61])
def test_a_data_order_position_past_the_checkpoints_iteration_is_one_line(
    synthetic_datasets, det_checkpoint, tmp_path, one_thread, batches
):
    """``batches`` 2^61 (inside the old bound 2^62) replayed the sampler for ever; 200,000 at
    iteration 1 was accepted without a word. One batch a step: at most iteration + 1."""
    from detection.trainer import DetectionTrainer

    src, saved = det_checkpoint
    out = tmp_path / "crafted"
    out.mkdir()
    saved["trainer"]["hooks"]["DataOrder"]["batches"] = batches
    torch.save(saved, out / "model_final.pth")
    (out / "last_checkpoint").write_text("model_final.pth")
    trainer = DetectionTrainer(_det_cfg(out, "SOLVER.MAX_ITER", "4"))
    with pytest.raises(ValueError) as e:
        trainer.resume_or_load(resume=True)
    assert str(e.value) == (
        f"{out / 'model_final.pth'}: data order batches {batches} is more than the 2 steps to "
        "its iteration 1 consumed; the file is damaged or was edited"
    )


def test_the_checkpoints_own_position_resumes(synthetic_datasets, det_checkpoint, one_thread):
    """The bound is what a run writes: its own checkpoint (batches = iteration + 1) resumes."""
    from detection.trainer import DetectionTrainer

    out, _ = det_checkpoint
    trainer = DetectionTrainer(_det_cfg(out, "SOLVER.MAX_ITER", "2"))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2 and trainer._trainer.data_loader.start == 2


def test_sigterm_during_the_replay_to_the_position_stops_it():
    """SIGTERM printed "stopping after this step" and was ignored while the replay ran (no step
    boundary came); now the replay checks for it and ends the run with one line."""
    from detectron2.data.samplers import TrainingSampler

    from detection.data.order import ResumableTrainLoader

    dicts = [{"i": i, "width": 100, "height": 100} for i in range(10)]
    loader = ResumableTrainLoader(dicts, lambda d: d["i"], TrainingSampler(10, seed=3), 3, True, 0)
    loader.load_state_dict({"seed": 3, "batches": 10**6})  # long to replay (about 20 s)
    hook = SignalStop(lambda: None, "rerun")
    hook.trainer = SimpleNamespace(iter=2, max_iter=10)  # resuming at iteration 2 of 10
    hook.before_train()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler records it: no step has run yet
        assert stop_requested() == signal.SIGTERM
        with pytest.raises(Interrupted) as e:
            next(iter(loader))
    finally:
        hook.after_train()
    assert str(e.value).startswith(
        "stopped by SIGTERM while replaying the data order to the checkpoint's position "
        "(0 of 1000000 batches)"
    )
    assert e.value.exit_code == 128 + signal.SIGTERM and stop_requested() is None
    assert signal.getsignal(signal.SIGTERM) is not hook._handle  # the handlers are restored


def test_sigterm_during_the_final_evaluation_stops_the_run(
    synthetic_datasets, tmp_path, one_thread, monkeypatch
):
    """SignalStop was still installed while the evaluation hook ran in ``after_train``: the
    signal was recorded, the run "finished" and a pipeline started its next stage. Now the run
    stops at once with the checkpoint of the last step complete, and nothing reports success."""
    from detection.trainer import DetectionTrainer

    calls, evaluated = [], []

    def test(cls, cfg, model, evaluators=None):
        calls.append(True)
        if len(calls) <= 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the evaluation runs
        evaluated.append(True)
        return {"bbox": {"AP": 1.0}}

    monkeypatch.setattr(DetectionTrainer, "test", classmethod(test))
    out = tmp_path / "det"
    trainer = DetectionTrainer(
        _det_cfg(out, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "('synthetic_voc_test',)")
    )
    trainer.resume_or_load(resume=True)
    with pytest.raises(Interrupted) as e:
        trainer.train()
    assert str(e.value).startswith(
        "stopped by SIGTERM after the last iteration (2), during the final evaluation; the "
        "training's checkpoint is complete; to evaluate it, rerun the same command with --resume"
    )
    assert evaluated == [] and getattr(trainer, "_last_eval_results", None) is None
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    # --resume: nothing left to train, the evaluation runs; a stop there is honoured as well
    cfg = _det_cfg(out, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "('synthetic_voc_test',)")
    for stopped in (True, False):
        again = DetectionTrainer(cfg)
        again.resume_or_load(resume=True)
        assert again.start_iter == 2
        if stopped:
            with pytest.raises(Interrupted, match="during the final evaluation"):
                again.train()
            continue
        again.train()
    assert evaluated == [True] and again._last_eval_results == {"bbox": {"AP": 1.0}}


def test_sigterm_during_pretrainings_final_knn_stops_and_resume_measures_it(
    synthetic_root, tmp_path, one_thread, monkeypatch
):
    """The same for pretraining's final kNN measurement (KNNMonitor.after_train): the stop is
    honoured, no summary is written, and --resume auto, with nothing left to train, measures it."""
    import moco.engine.hooks as engine_hooks
    from moco.engine.trainer import PretrainTrainer

    measure, calls = engine_hooks.knn_evaluate, []

    def knn_evaluate(*args, **kwargs):
        calls.append(True)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return measure(*args, **kwargs)

    monkeypatch.setattr(engine_hooks, "knn_evaluate", knn_evaluate)
    out = tmp_path / "pre"
    knn = os.path.join(synthetic_root, "imagefolder")
    cfg = tiny_cfg(synthetic_root, out, **{"SOLVER.EPOCHS": 1, "KNN.DATA": knn})
    cfg.freeze()
    with pytest.raises(Interrupted, match="during the final evaluation"):
        PretrainTrainer(cfg).train()
    assert (out / "checkpoint_0000.pth.tar").is_file() and not (
        out / "pretrain_summary.json"
    ).exists()
    summary = PretrainTrainer(cfg, resume="auto").train()
    assert len(calls) == 2 and [r["epoch"] for r in summary["knn"]] == [1]
    assert (out / "pretrain_summary.json").is_file()
