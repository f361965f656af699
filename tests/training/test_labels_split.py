from __future__ import annotations

import pandas as pd
import pytest

from tasks.errors import ParameterError
from training.labels import match_labels, read_labels
from training.split import split_tracks


def test_read_labels_paths_multi_and_split(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("path,label,split,artist\nsub/a.wav,rock|pop,train,x\n/abs/b.wav,jazz,,y\n"
                 "c.wav,,test,z\n")
    t = read_labels(str(f), group_column="artist")
    assert list(t["key"]) == [str(tmp_path / "sub" / "a.wav"), "/abs/b.wav"]  # empty label out
    assert list(t["labels"]) == [["pop", "rock"], ["jazz"]]
    assert t["split"][0] == "train" and pd.isna(t["split"][1])
    assert list(t["group"]) == ["x", "y"]


@pytest.mark.parametrize("text, match", [
    ("file,label\na,b\n", "needs a 'path' or 'track_id'"),
    ("path,label,split\na,b,holdout\n", "train/valid/test"),
])
def test_bad_labels_files(tmp_path, text, match):
    f = tmp_path / "l.csv"
    f.write_text(text)
    with pytest.raises(ParameterError, match=match):
        read_labels(str(f))


def test_match_reports_unmatched_and_failed(tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("path,label\n/m/a.wav,x\n/m/renamed.wav,y\n/m/bad.wav,x\n/m/nope.wav,x\n")
    tracks = pd.DataFrame({"track_id": ["A", "B", "C"], "path": ["/m/a.wav", "/m/b.wav",
                                                                  "/m/bad.wav"],
                           "status": ["ok", "ok", "failed"]})
    sources = pd.DataFrame({"uri": ["/m/renamed.wav"], "track_id": ["B"]})
    ls = match_labels(read_labels(str(f)), tracks, sources)
    assert list(ls.frame["track_id"]) == ["A", "B"]
    assert ls.unmatched == ["/m/nope.wav"] and ls.failed == ["/m/bad.wav"]
    assert ls.classes == ["x", "y"] and not ls.multi_label
    assert ls.targets(["B", "A"]).tolist() == [[0, 1], [1, 0]]
    assert "match no ingested track" in ls.report()


def test_split_is_by_track_stratified_seeded_and_grouped():
    frame = pd.DataFrame({"track_id": [f"t{i}" for i in range(60)],
                          "labels": [[c] for c in "abc" * 20],
                          "group": [f"g{i // 3}" for i in range(60)]})
    a = split_tracks(frame, valid_size=0.2, test_size=0.2, seed=1)
    b = split_tracks(frame, valid_size=0.2, test_size=0.2, seed=1)
    assert a.equals(b)
    assert not a.equals(split_tracks(frame, valid_size=0.2, test_size=0.2, seed=2))
    for g, part in frame.groupby("group"):
        assert a[part.index].nunique() == 1, g  # a group never straddles two splits
    counts = a.value_counts()
    assert counts["test"] > 0 and counts["valid"] > 0 and counts["train"] > counts["test"]


def test_explicit_split_column_wins():
    frame = pd.DataFrame({"track_id": ["a", "b", "c", "d"], "labels": [["x"]] * 4,
                          "split": ["test", None, "valid", None]})
    s = split_tracks(frame, seed=0)
    assert s[0] == "test" and s[2] == "valid"


def test_auto_tries_the_heavy_models_only_with_data_and_sizes_them_to_the_device():
    from flows.train import auto_candidates, auto_params

    assert auto_candidates(100, accelerated=True) == ["linear", "gbm", "mfcc_cnn", "cnn"]
    assert auto_candidates(5000, accelerated=False) == ["linear", "gbm", "mfcc_cnn", "cnn",
                                                        "short_chunk_resnet"]
    assert auto_params("short_chunk_resnet", accelerated=False) == {"channels": 32,
                                                                   "embed_dim": 256}
    assert auto_params("short_chunk_resnet", accelerated=True) is None
    assert auto_params("cnn", accelerated=False) is None
    assert auto_candidates(5000, accelerated=True)[-2:] == ["crnn", "short_chunk_resnet"]
