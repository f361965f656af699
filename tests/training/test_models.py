from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.predictions import aggregate_tracks
from training.augment import mixup, spec_augment
from training.evaluate import confidence_threshold, report
from training.models import MODEL_CONFIGS, build_model, config_from_dict


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_models_give_logits_and_embeddings(name):
    cfg = MODEL_CONFIGS[name]() if name != "short_chunk_resnet" else \
        MODEL_CONFIGS[name](channels=8, embed_dim=32)
    rows = 20 if cfg.input == "mfcc" else 64
    model = build_model(cfg, rows, 5).eval()
    x = torch.randn(3, rows, 129)
    logits = model(x)
    assert logits.shape == (3, 5)
    assert model.embed(x).shape == (3, cfg.embed_dim)
    assert not torch.allclose(logits.softmax(-1).sum(-1), logits.sum(-1))  # raw logits
    assert config_from_dict(cfg.to_dict()) == cfg
    # batch == one at a time (eval mode)
    one = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(one, logits, rtol=1e-4, atol=1e-4)


def test_spec_augment_masks_and_keeps_input():
    x = torch.randn(4, 32, 50)
    g = torch.Generator().manual_seed(0)
    y = spec_augment(x, freq_width=8, time_width=10, generator=g)
    assert y.shape == x.shape and not torch.equal(x, y)
    assert (y == x).float().mean() > 0.4


def test_mixup_is_convex():
    x, y = torch.ones(4, 2, 3), torch.eye(4)
    mx, my = mixup(x, y, 0.4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(my.sum(1), torch.ones(4))
    torch.testing.assert_close(mx, x)


def test_track_aggregation_and_report():
    ids = np.array(["b", "a", "b", "a"], dtype=object)
    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6], [0.7, 0.3]], dtype=np.float32)
    agg = aggregate_tracks(ids, probs)
    tids, tp = agg.track_ids, agg.probabilities
    assert list(tids) == ["a", "b"]
    np.testing.assert_allclose(tp, [[0.8, 0.2], [0.3, 0.7]], atol=1e-6)
    rep = report(np.eye(2, dtype=np.float32), tp, ["x", "y"], multi_label=False)
    assert rep["accuracy"] == 1.0 and rep["macro_f1"] == 1.0
    assert rep["confusion"] == [[1.0, 0.0], [0.0, 1.0]]
    wrong = report(np.eye(2, dtype=np.float32)[::-1], tp, ["x", "y"], multi_label=False)
    assert wrong["accuracy"] == 0.0
    multi = report(np.array([[1, 1], [0, 1]], np.float32), np.array([[0.9, 0.6], [0.2, 0.7]]),
                   ["x", "y"], multi_label=True)
    assert multi["accuracy"] == 1.0 and multi["pr_auc"] == pytest.approx(1.0)


def test_confidence_threshold_keeps_most_correct():
    targets = np.eye(3, dtype=np.float32)[[0, 1, 2] * 20]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=60).astype(np.float32)
    probs[np.arange(60), targets.argmax(1)] += 1.0
    probs /= probs.sum(1, keepdims=True)
    t = confidence_threshold(targets, probs, multi_label=False, keep=0.9)
    assert (probs.max(1) >= t).mean() == pytest.approx(0.9, abs=0.05)
