from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.predictions import aggregate_tracks
from training import artifact
from training.augment import mixup, spec_augment
from training.evaluate import confidence_threshold, report
from training.models import (
    MODEL_CONFIGS,
    ModelConfig,
    Tagger,
    TransformerConfig,
    _TimeTransformer,
    build_model,
    config_from_dict,
    inference_batch_size,
)

# a Transformer tagger small enough for unit tests
TINY = TransformerConfig(channels=(8, 16), time_pool=(2, 2), d_model=32, heads=4, layers=2,
                         ff_dim=64, embed_dim=24, max_positions=64)


def _attention_part(model: Tagger) -> _TimeTransformer:
    """The projection, positional table and encoder of a Transformer tagger."""
    part = [m for m in model.modules() if isinstance(m, _TimeTransformer)]
    assert len(part) == 1
    return part[0]


def _unit_config(name: str) -> tuple[ModelConfig, int]:
    """A family's config at unit-test size and its input rows."""
    cfg = MODEL_CONFIGS[name]() if name != "short_chunk_resnet" else \
        MODEL_CONFIGS[name](channels=8, embed_dim=32)
    return cfg, 20 if cfg.input == "mfcc" else 64


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_models_give_logits_and_embeddings(name):
    cfg, rows = _unit_config(name)
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


# ---------------------------------------------------------------- the Transformer tagger
def test_transformer_is_registered_with_logmel_input():
    assert MODEL_CONFIGS["transformer"] is TransformerConfig
    assert TransformerConfig.input == "logmel"
    model = build_model(TransformerConfig(), 128, 10)
    assert isinstance(_attention_part(model).encoder, torch.nn.TransformerEncoder)
    assert _attention_part(model).encoder.layers[0].self_attn.batch_first
    # modest: CPU-trainable (about 0.8 M parameters at the defaults, 128 mel bands)
    assert 2e5 < sum(p.numel() for p in model.parameters()) < 2e6


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_transformer_shapes_follow_config_and_data(pooling):
    cfg = replace(TINY, pooling=pooling)
    for rows in (40, 128):  # the projection is sized from the remaining frequency bins
        model = build_model(cfg, rows, 7).eval()
        x = torch.randn(4, rows, 129)
        assert model(x).shape == (4, 7)
        assert model.embed(x).shape == (4, cfg.embed_dim)
        assert _attention_part(model).project.in_features == 16 * (-(-rows // 4))


def test_transformer_takes_any_frame_count():
    model = build_model(TINY, 64, 3).eval()
    with torch.inference_mode():
        for frames in (1, 37, 129, 300):  # 300 frames: 75 steps, more than the 64 positions
            assert model(torch.randn(2, 64, frames)).shape == (2, 3)
        # the positional table reaches the output, on both paths (sliced and resampled)
        for frames in (129, 300):
            x = torch.randn(2, 64, frames)
            before = model.embed(x)
            _attention_part(model).positions.mul_(50.0)
            assert not torch.allclose(before, model.embed(x))


def test_transformer_config_round_trips_with_tuples():
    cfg = TransformerConfig(channels=(16, 32, 32, 64), time_pool=(2, 1, 2, 1), pooling="mean",
                            layers=4, dropout=0.1, attention_dropout=0.0)
    back = config_from_dict(json.loads(json.dumps(cfg.to_dict())))  # as meta.json stores it
    assert back == cfg and isinstance(back, TransformerConfig)
    assert isinstance(back.channels, tuple) and isinstance(back.time_pool, tuple)
    assert cfg.to_dict()["name"] == "transformer" and cfg.to_dict()["input"] == "logmel"
    with pytest.raises(ValueError, match="one entry per block"):
        TransformerConfig(channels=(8, 16, 32), time_pool=(2, 2))
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(d_model=30, heads=4)
    with pytest.raises(ValueError, match="pooling"):
        TransformerConfig(pooling="max")


def _toy_batch(n=24, rows=32, frames=32, seed=0):
    """Two classes: energy in the low or in the high bands, under noise of the same size."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, rows, frames, generator=g)
    band = torch.zeros(2, rows, 1)
    band[0, : rows // 3], band[1, -rows // 3:] = 1.5, 1.5
    return x + band[y], y


def test_transformer_learns_a_separable_toy_batch():
    torch.manual_seed(0)
    x, y = _toy_batch()
    model = build_model(replace(TINY, dropout=0.0, attention_dropout=0.0), x.shape[1], 2)
    model.standardize.set(x.mean(dim=(0, 2)), x.std(dim=(0, 2)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0], losses
    # and it generalises to fresh draws of the same two classes
    xt, yt = _toy_batch(seed=1)
    model.eval()
    with torch.inference_mode():
        assert (model(xt).argmax(1) == yt).float().mean() >= 0.9


def test_transformer_artifact_round_trip_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    rows = 40
    model = build_model(TINY, rows, 3)
    model.standardize.set(torch.linspace(-1, 1, rows), torch.linspace(0.5, 2, rows))
    model.train()
    model(torch.randn(8, rows, 129))  # BatchNorm running statistics away from their defaults
    model.eval()
    meta = {"input": "logmel", "model_config": TINY.to_dict(), "classes": ["a", "b", "c"],
            "multi_label": False, "temperature": 1.0}
    artifact.save(str(tmp_path / "m"), meta, torch_model=model)
    loaded = artifact.load(str(tmp_path / "m"), device="cpu")
    assert loaded.torch_model is not None and loaded.torch_model is not model
    assert loaded.input == "logmel" and loaded.embed_dim == TINY.embed_dim
    assert loaded.torch_model.config == TINY
    x = np.random.default_rng(0).standard_normal((5, rows, 129)).astype(np.float32)
    with torch.inference_mode():
        expect_emb = model.embed(torch.from_numpy(x))
        expect = model.head(expect_emb)
    logits, emb = loaded.predict(x, raw=True, embeddings=True)
    # to rounding only: a CPU artifact loads in channels-last layout (decision 72), which
    # sums the convolutions in another order
    torch.testing.assert_close(torch.from_numpy(logits), expect, rtol=1e-5, atol=1e-6)
    assert emb is not None
    torch.testing.assert_close(torch.from_numpy(emb), expect_emb, rtol=1e-5, atol=1e-6)
    probs, _ = loaded.predict(x)
    np.testing.assert_allclose(probs, expect.softmax(-1).numpy(), rtol=1e-6)


def _warmed_model(name: str) -> tuple[Tagger, int]:
    """A unit-size model of family ``name`` whose BatchNorm statistics are away from their
    defaults, in training mode; and its input rows.
    """
    torch.manual_seed(0)
    cfg, rows = _unit_config(name)
    model = build_model(cfg, rows, 4)
    model.train()
    model(torch.randn(6, rows, 129))
    return model, rows


def _saved_and_loaded(model: Tagger, tmp_path) -> artifact.Predictor:
    """``model`` saved as an artifact and loaded back on CPU."""
    cfg = model.config
    meta = {"input": cfg.input, "model_config": cfg.to_dict(), "classes": list("abcd"),
            "multi_label": False, "temperature": 1.0}
    artifact.save(str(tmp_path / "m"), meta, torch_model=model)
    return artifact.load(str(tmp_path / "m"), device="cpu")


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_channels_last_gives_the_same_outputs_and_cpu_artifacts_load_in_it(name, tmp_path):
    model, rows = _warmed_model(name)
    model.eval()
    x = torch.randn(5, rows, 129)
    with torch.inference_mode():
        expect = model(x)
    loaded = _saved_and_loaded(model, tmp_path)
    net = loaded.torch_model
    assert net is not None and net.channels_last and not model.channels_last
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    logits, _ = loaded.predict(x.numpy(), raw=True)
    torch.testing.assert_close(torch.from_numpy(logits), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_predictions_run_with_batch_norm_folded_and_the_saved_model_keeps_it(name, tmp_path):
    model, rows = _warmed_model(name)
    with pytest.raises(RuntimeError, match="evaluation-mode"):
        model.folded()
    model.eval()
    x = torch.randn(5, rows, 129)
    with torch.inference_mode():
        expect, expect_emb = model(x), model.embed(x)
    loaded = _saved_and_loaded(model, tmp_path)
    logits, emb = loaded.predict(x.numpy(), raw=True, embeddings=True)
    torch.testing.assert_close(torch.from_numpy(logits), expect, rtol=1e-4, atol=1e-5)
    assert emb is not None
    torch.testing.assert_close(torch.from_numpy(emb), expect_emb, rtol=1e-4, atol=1e-5)

    def norms(net: torch.nn.Module) -> int:
        return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())

    net, twin = loaded.torch_model, loaded._inference_model()
    assert net is not None and norms(net) > 0 and norms(twin) == 0
    assert twin.head is net.head and twin.standardize is net.standardize
    assert twin.channels_last and all(
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in twin.modules() if isinstance(m, torch.nn.Conv2d))
    # what a loaded model saves again (an ensemble's members) is the model as trained
    again = artifact.load(loaded.save(str(tmp_path / "again")), device="cpu")
    assert again.torch_model is not None
    assert again.torch_model.state_dict().keys() == model.state_dict().keys()
    np.testing.assert_allclose(again.predict(x.numpy(), raw=True)[0], logits, rtol=1e-6,
                               atol=1e-7)


def test_inference_batch_size_follows_row_size_and_device():
    assert inference_batch_size(20 * 130, "cpu") == 50  # an MFCC segment
    assert inference_batch_size(128 * 130, "cpu") == 7  # a log-mel segment
    assert inference_batch_size(10, "cpu") == 256  # small rows: capped
    assert inference_batch_size(10**7, "cpu") == 4  # huge rows: a floor
    assert inference_batch_size(0, "cpu") == 256
    assert inference_batch_size(128 * 130, "cuda") == 2048


def test_predict_batches_by_the_rule_and_scores_do_not_depend_on_the_batch(tmp_path):
    torch.manual_seed(0)
    rows, frames = 64, 129
    cfg = MODEL_CONFIGS["cnn"]()
    model = build_model(cfg, rows, 3).eval()
    meta = {"input": "logmel", "model_config": cfg.to_dict(), "classes": ["a", "b", "c"],
            "multi_label": False, "temperature": 1.5}
    artifact.save(str(tmp_path / "m"), meta, torch_model=model)
    loaded = artifact.load(str(tmp_path / "m"), device="cpu")
    assert loaded.torch_model is not None
    calls: list[int] = []
    loaded.torch_model.head.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    x = np.random.default_rng(1).standard_normal((40, rows, frames)).astype(np.float32)
    probs, emb = loaded.predict(x, embeddings=True)
    per_batch = inference_batch_size(rows * frames, "cpu")
    assert per_batch == 15
    assert calls == [15, 15, 10]
    calls.clear()
    whole, whole_emb = loaded.predict(x, embeddings=True, batch_size=len(x))
    assert calls == [40]
    np.testing.assert_allclose(probs, whole, rtol=1e-5, atol=1e-6)
    assert emb is not None and whole_emb is not None
    np.testing.assert_allclose(emb, whole_emb, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_train_flow_with_the_transformer_registers_a_working_pyfunc(
        labelled_store, mlflow_env, tmp_path, prefect_harness):
    """``mtag train --model transformer`` end to end: trained by the loop, logged as a pyfunc,
    registered, and reloaded with the predictions of the artifact.
    """
    from flows.train import train_flow
    from training import tracking

    store, labels, _ = labelled_store
    name = f"tx-{tmp_path.name}"[:60]
    summary = train_flow(store=store, labels=labels, model="transformer", registered_name=name,
                         valid_size=0.2, test_size=0.2, workdir=str(tmp_path / "w"),
                         train_config={"epochs": 8, "batch_size": 16, "lr": 2e-3,
                                       "patience": 8},
                         model_params={"channels": [8, 16, 16], "time_pool": [2, 2, 1],
                                       "d_model": 32, "heads": 4, "layers": 2, "ff_dim": 64,
                                       "embed_dim": 32})
    best = summary.best
    assert best["model"] == "transformer" and summary.promotion["version"] == "1"
    assert best["test"]["accuracy"] > 1 / 3 + 0.2, best["test"]  # 3 classes
    loaded = artifact.load(best["artifact_dir"], device="cpu")
    assert loaded.meta["model_config"]["channels"] == [8, 16, 16]  # JSON lists, read back
    assert loaded.torch_model is not None
    assert isinstance(loaded.torch_model.config, TransformerConfig)
    assert loaded.torch_model.config.channels == (8, 16, 16)
    from training.trainer import prepare
    prep = prepare(store, labels, valid_size=0.2, test_size=0.2)
    x = np.stack([prep.reader.matrix("logmel", i) for i in range(4)])
    pyfunc = tracking.load_pyfunc(f"models:/{name}/1")
    np.testing.assert_allclose(pyfunc.predict(x), loaded.predict(x)[0], rtol=1e-6)
    assert pyfunc.predict(x, params={"output": "embedding"}).shape == (4, 32)


def test_a_last_batch_of_one_segment_does_not_stop_training():
    # 2 * 16 + 1 segments: a one-row last batch would reach the embedding's BatchNorm in
    # training mode ("Expected more than 1 value per channel"), which stopped a CV fold
    from torch.utils.data import TensorDataset

    from training.loop import TrainConfig, train_network
    from training.models import MFCCCNNConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 20, 32, generator=g)
    y = torch.randint(0, 2, (33,), generator=g)
    model = build_model(MFCCCNNConfig(), 20, 2)
    result = train_network(model, TensorDataset(x, y), TensorDataset(x[:8], y[:8]),
                           TrainConfig(epochs=2, batch_size=16, patience=9, seed=0),
                           multi_label=False, score=lambda net: 0.0)
    assert len(result.history) == 2 and result.steps == 4  # two full batches an epoch
    # trained on CPU in channels-last layout (decision 72); its weights save and load back
    assert model.channels_last
    fresh = build_model(MFCCCNNConfig(), 20, 2).eval()
    fresh.load_state_dict(result.state_dict)
    with torch.inference_mode():
        torch.testing.assert_close(fresh(x), model.eval()(x), rtol=1e-5, atol=1e-5)
