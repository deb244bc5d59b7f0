"""The resume decision, branch by branch: a checkpoint's state, the current record, whether best.pt exists."""

from __future__ import annotations

from pipeline.training.resume import ResumeDecision, decide_resume

RECORD = {"model": "toy", "model_config": {"epochs": 4, "lr": 0.05}, "seed": 0, "select_split": "test"}


def checkpoint(epoch: int, kept: int, record: dict = RECORD) -> dict:
    return {"epoch": epoch, "config": dict(record), "best": {"epoch": kept, "metrics": {}, "value": 0.0}}


def test_no_checkpoint_starts_afresh():
    assert decide_resume(None, RECORD, best_exists=False) == ResumeDecision(False, "no checkpoint")
    assert not decide_resume(None, RECORD, best_exists=True).resume


def test_same_config_resumes():
    decision = decide_resume(checkpoint(epoch=3, kept=1), RECORD, best_exists=True)
    assert decision.resume and not decision.rewrite_best


def test_another_config_starts_afresh_whatever_best_pt():
    other = {**RECORD, "model_config": {"epochs": 4, "lr": 0.01}}
    for best_exists in (True, False):
        decision = decide_resume(checkpoint(epoch=3, kept=3, record=other), RECORD, best_exists)
        assert not decision.resume and not decision.rewrite_best
        assert "different config" in decision.reason


def test_best_pt_gone_and_kept_epoch_not_the_last_starts_afresh():
    # the checkpoint holds epoch 3's weights, not the kept epoch 1's: best.pt cannot be rebuilt
    decision = decide_resume(checkpoint(epoch=3, kept=1), RECORD, best_exists=False)
    assert not decision.resume and not decision.rewrite_best
    assert "epoch 1" in decision.reason and "best.pt" in decision.reason


def test_best_pt_gone_and_kept_epoch_the_last_resumes_and_rewrites_best_pt():
    decision = decide_resume(checkpoint(epoch=3, kept=3), RECORD, best_exists=False)
    assert decision.resume and decision.rewrite_best


def test_nothing_kept_yet_resumes_without_writing_best_pt():
    # selection starts later (eval_from): no epoch is kept, so there is no best.pt to lose
    decision = decide_resume(checkpoint(epoch=2, kept=0), RECORD, best_exists=False)
    assert decision.resume and not decision.rewrite_best
