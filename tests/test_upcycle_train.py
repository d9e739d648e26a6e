"""Training an upcycled model: the aux loss in the objective (plain loop and transformers Trainer), routing
statistics in the logs, EDA augmentation and the Robust QA data splits."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from upcycle_models import tiny

import moekit
from moekit import SwitchLoss, TopK
from moekit.convert.unit_gate import UnitGate
from moekit.convert.upcycle import UpcycleConfig, upcycle_
from moekit.recipes.eda import eda, random_deletion, random_insertion, random_swap

CFG = UpcycleConfig(num_experts=4, router=UnitGate(router=TopK(k=1)), balance=SwitchLoss(coef=0.5), noise=0.01)


def _reference_switch_loss(handle, coef):
    """coef * E * sum_e f_e P_e per layer, from the routers' own scores (Fedus et al. 2021), summed over layers."""
    total = 0.0
    for moe in handle.moe_layers().values():
        a = moe.router.inner.last_assignment
        E = a.num_experts
        f = torch.bincount(a.expert_N, minlength=E).double() / a.num_tokens
        P = a.scores_TE.double().mean(0)
        total += coef * E * float((f * P.detach()).sum())
    return total


def test_aux_loss_collects_every_layer(monkeypatch):
    model, inputs = tiny("bert")
    handle = upcycle_(model, CFG)
    for moe in handle.moe_layers().values():  # keep each layer's routing to recompute the loss independently
        inner = moe.router.inner
        orig = inner.forward

        def spy(x, task=None, _orig=orig, _inner=inner, **kw):
            a = _orig(x, task=task, **kw)
            _inner.last_assignment = a
            return a

        monkeypatch.setattr(inner, "forward", spy)
    model.train()
    model(**inputs)
    aux = moekit.aux_loss(model)
    assert aux.requires_grad
    assert abs(float(aux.detach()) - _reference_switch_loss(handle, 0.5)) < 1e-5
    aux.backward()  # the balance loss trains the routers
    assert all(m.router.inner.gate.weight.grad is not None for m in handle.moe_layers().values())


def test_trainer_adds_aux_loss_and_logs_routing(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from moekit.convert.trainer import MoETrainer

    model, _ = tiny("bert")
    upcycle_(model, CFG)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 61, (6,), generator=gen), "labels": i % 3} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=4,
                             max_steps=2, logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = MoETrainer(model=model, args=args, train_dataset=data, moe_log_per_layer=True)

    batch = {"input_ids": torch.stack([d["input_ids"] for d in data[:4]]), "labels": torch.tensor([0, 1, 2, 0])}
    model.train()
    torch.manual_seed(1)
    loss = trainer.compute_loss(model, dict(batch))
    torch.manual_seed(1)  # same dropout masks
    task = model(**batch).loss
    aux = moekit.aux_loss(model)
    assert float(aux.detach()) > 0
    torch.testing.assert_close(loss, task + aux, rtol=0, atol=1e-6)
    model.eval()  # evaluation: the task loss alone
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), model(**batch).loss, rtol=0, atol=1e-6)

    trainer._moe_aux_sum, trainer._moe_aux_count = 0.0, 0
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["moe_aux_loss"] > 0 and h["moe_max_over_mean"] >= 1.0 and h["moe_dropped_fraction"] == 0.0
        shares = [v for k, v in h.items() if k.startswith("moe_bert.encoder.layer.0") and "_share" in k]
        assert len(shares) == 4 and abs(sum(shares) - 1.0) < 1e-9


def test_eda_operations():
    rng = random.Random(0)
    words = ["what", "is", "the", "capital", "city", "of", "france", "today"]
    swapped = random_swap(words, 2, rng)
    assert sorted(swapped) == sorted(words) and swapped != words
    deleted = random_deletion(words, 0.3, rng)
    assert 1 <= len(deleted) < len(words) and all(w in words for w in deleted)
    inserted = random_insertion(words, 2, rng)
    assert len(inserted) == len(words) + 2 and set(inserted) == set(words)
    assert random_deletion(["one"], 0.9, rng) == ["one"]
    assert eda("a b c d e", random.Random(3)) == eda("a b c d e", random.Random(3))  # seeded: same seed, same text
    assert len({eda("a b c d e f g h", random.Random(s)) for s in range(6)}) > 1  # and the seed is used
    with pytest.raises(ValueError, match="unknown operations"):
        eda("a b", rng, ops=("synonym",))


@pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None or importlib.util.find_spec("yaml") is None,
    reason="needs chatterbot-corpus and PyYAML",
)
def test_robust_qa_splits_hold_a_domain_out():
    from moekit.recipes.robust_qa import RobustQAConfig, build_splits

    cfg = RobustQAConfig(held_out="trivia", max_train_per_domain=50, max_test_per_domain=10)
    train, test, held = build_splits(cfg)
    assert held and all(it.domain == "trivia" for it in held)
    assert "trivia" not in test and all(it.domain != "trivia" for it in train)
    assert {it.domain for it in train} == set(test)
    test_q = {(it.domain, it.question) for items in test.values() for it in items}
    assert not test_q & {(it.domain, it.question) for it in train}
    for it in train + held:
        assert len(it.candidates) == 4 and len(set(it.candidates)) == 4 and 0 <= it.gold < 4
    again = build_splits(cfg)
    assert [it.candidates for it in again[2]] == [it.candidates for it in held]  # fixed by the seed
    with pytest.raises(ValueError, match="unknown held-out domain"):
        build_splits(RobustQAConfig(held_out="astrology"))


def test_robustqa_cli_arguments_map_to_the_config():
    import argparse

    from moekit.cli import COMMANDS, robustqa
    from moekit.recipes.robust_qa import RobustQAConfig

    assert COMMANDS["robustqa"][0] == "moekit.cli.robustqa"
    parser = argparse.ArgumentParser()
    robustqa.add_arguments(parser)
    args = parser.parse_args(["--steps", "3", "--layers", "1", "3", "--train-only-moe", "--eda-prob", "0.5"])
    cfg = robustqa.config_from_args(args)
    assert (cfg.steps, cfg.layers, cfg.train_only_moe, cfg.eda_prob, cfg.held_out) == (3, (1, 3), True, 0.5, "trivia")
    assert robustqa.config_from_args(parser.parse_args([])) == RobustQAConfig()
