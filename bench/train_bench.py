"""Training benchmark: accuracy of every model on a labelled catalogue, and CPU throughput.

    .venv/bin/python bench/train_bench.py --source ../shared/datasets/philharmonia-dev \
        --labels ../shared/datasets/philharmonia-dev/labels.csv [--store DIR] [--models ...]

Ingests SOURCE into STORE if it holds no features yet, then, with one seeded track-level split
(test 20 %, validation 10 % of all tracks, the rest train), trains each model and prints its
test accuracy and macro-F1 at track level, training time and segments per second. Results go
to bench/results/train-*.json, with the machine facts. Deep models use CPU-sized settings
unless --full is given (short-chunk ResNet at 32 channels instead of 128); the table says which.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import benchenv  # first: the repository on sys.path, the CLI's environment defaults

benchenv.apply_cli_defaults(prefect_home=False)

from flows.train import CPU_AUTO_PARAMS as CPU_PARAMS  # noqa: E402  (the sizes auto uses on CPU)

VERSION_PACKAGES = ("mtag", "numpy", "scipy", "torch", "scikit-learn", "mlflow", "threadpoolctl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "mtag-bench-train"))
    ap.add_argument("--models", nargs="+", default=["linear", "gbm", "mfcc_cnn", "cnn", "crnn",
                                                    "short_chunk_resnet"])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="paper-sized models")
    ap.add_argument("--device")
    ap.add_argument("--balance", action="store_true", help="class-balanced loss")
    ap.add_argument("--specaugment", action="store_true")
    ap.add_argument("--mixup", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--params", help='JSON of model config overrides, e.g. {"cnn": {...}}')
    args = ap.parse_args()
    machine = benchenv.environment(VERSION_PACKAGES, code_paths=(*benchenv.PIPELINE_CODE,
                                                                 "training"))

    from featurestore.store import FeatureStore
    from flows.ingest import run_ingest
    from tasks.errors import StoreError
    from training.loop import TrainConfig
    from training.trainer import fit_candidate, prepare

    try:
        FeatureStore(args.store).default_feature_set()
    except StoreError:
        print(f"ingesting {args.source} into {args.store} ...")
        print(run_ingest(args.source, args.store, progress=False).render())
    prep = prepare(args.store, args.labels, valid_size=0.1, test_size=0.2, seed=args.seed)
    print(prep.labels.report())
    print(f"split (tracks): {prep.split_counts()}")
    rows: list[dict] = []
    work = tempfile.mkdtemp(prefix="mtag-train-bench-")
    import torch

    path = benchenv.result_path("train")

    def save() -> None:  # after every model: a run killed half-way keeps what it finished
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        benchenv.write_json({"rows": rows, "split": prep.split_counts(), "torch": torch.__version__,
                             "device": device, "threads": torch.get_num_threads(),
                             "source": args.source, "machine": machine}, "train", path)
    for model in args.models:
        params = None if args.full else CPU_PARAMS.get(model)
        if args.params:
            params = json.loads(args.params).get(model, params)
        tc = TrainConfig(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                         seed=args.seed, device=args.device, balance=args.balance,
                         specaugment=args.specaugment, mixup_alpha=args.mixup, lr=args.lr)
        t0 = time.perf_counter()
        out = fit_candidate(prep, model, work, train_config=tc, model_params=params)
        wall = time.perf_counter() - t0
        row = {"model": model, "params": params or {}, "train": tc.to_dict(),
               "test_accuracy": out.test_track["accuracy"],
               "per_class_f1": {r["class"]: r["f1"] for r in out.test_track["per_class"]},
               "test_macro_f1": out.test_track["macro_f1"],
               "test_segment_accuracy": out.test_segment["accuracy"],
               "valid_macro_f1": out.valid["macro_f1"], "epochs": len(out.history),
               "train_s": wall, "segments_per_s": out.segments_per_s,
               "data_wait_share": out.data_wait_share}
        rows.append(row)
        print(f"{model:20s} acc {row['test_accuracy']:.4f}  macro-F1 {row['test_macro_f1']:.4f}  "
              f"epochs {row['epochs']:3d}  {wall:7.1f} s  {row['segments_per_s']:8.1f} seg/s  "
              f"{'(' + json.dumps(params) + ')' if params else ''}", flush=True)
        save()
    print(f"\n{'model':20s} {'accuracy':>9s} {'macro-F1':>9s} {'seg/s':>8s} {'time s':>8s}")
    for r in rows:
        print(f"{r['model']:20s} {r['test_accuracy']:9.4f} {r['test_macro_f1']:9.4f} "
              f"{r['segments_per_s']:8.1f} {r['train_s']:8.1f}")
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
