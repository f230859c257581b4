"""Train a small backdoored Keras CNN whose ONNX export ends in Softmax, as Keras users ship them (issue 24).

Conv2D + BatchNormalization + ReLU blocks, a Dense head with a softmax activation, trained on
Fashion-MNIST with a BadNets patch or, with `--attack blend`, a blended noise image (tools/attacks.py;
target 0, 10 % poisoned), exported with tf2onnx
(opset 15, NHWC input `input` (N, 28, 28, 1), output `probabilities`; tf2onnx folds BatchNorm into the
convolutions). Writes model.onnx, clean.npz, test.npz, poison.npz and meta.json into OUT_DIR in the
formats of tools/train_backdoor.py (examples/README.md).

Runs in its own environment, not the project's: `make keras-model` creates `.venv-keras` with
tensorflow-cpu, tf2onnx and onnxruntime (once) and runs

    .venv-keras/bin/python tools/keras_softmax_model.py --out-dir cache/keras_softmax

(`make keras-model KERAS_ATTACK=blend` writes cache/keras_softmax_blend/ instead). Nothing here
imports torch or anp_onnx, so tensorflow stays out of the project's own environment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banner, before it is imported

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.attacks import BadNets, Blend  # noqa: E402
from tools.datasets import load_fashion_mnist  # noqa: E402
from tools.example_files import write_example  # noqa: E402

OPSET = 15
PARITY_TOLERANCE = 1e-4  # Keras vs onnxruntime probabilities
# Keras' default 0.99 leaves the moving statistics far from the data's after a short run (clean ACC 15 %)
BATCH_NORM_MOMENTUM = 0.9
ATTACKS = {"badnets": BadNets, "blend": Blend}  # with their default trigger parameters


def build_model(classes: int):
    """Three Conv2D + BatchNormalization + ReLU blocks (32, 64, 64 channels), Flatten, then Dense with softmax."""
    from tensorflow import keras
    from tensorflow.keras import layers

    model = keras.Sequential([keras.Input((28, 28, 1), name="input")])
    for filters, stride in ((32, 1), (64, 2), (64, 2)):
        model.add(layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False))
        model.add(layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM))
        model.add(layers.ReLU())
    model.add(layers.Flatten())
    model.add(layers.Dense(classes, activation="softmax", name="probabilities"))
    return model


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, H, W, 1) in [0, 1], the model's NHWC input."""
    return (images.astype(np.float32) / 255.0)[..., None]


def export_onnx(model) -> bytes:
    """tf2onnx conversion of the Keras model, dynamic batch, opset 15."""
    import tensorflow as tf
    import tf2onnx

    signature = [tf.TensorSpec((None, 28, 28, 1), tf.float32, name="input")]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    return proto.SerializeToString()


def onnx_outputs(session, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """The model's first output on uint8 images, in batches."""
    name = session.get_inputs()[0].name
    batches = range(0, len(x), batch_size)
    return np.concatenate([session.run(None, {name: to_input(x[i : i + batch_size])})[0] for i in batches])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--attack", choices=sorted(ATTACKS), default="badnets")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--poison-rate", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=30000, help="Training images used (of 60 000).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-clean", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--n-poison", type=int, default=2000)
    args = parser.parse_args(argv)

    import onnx
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    x_all, y_all = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    chosen = np.sort(rng.choice(len(y_all), size=min(args.train_samples, len(y_all)), replace=False))
    x_train, y_train = x_all[chosen], y_all[chosen]
    attack = ATTACKS[args.attack]()
    x_used, y_used = attack.poison_training_set(x_train, y_train, args.poison_rate, args.target, args.seed)
    untouched = np.flatnonzero((x_used == x_train).all(axis=(1, 2)) & (y_used == y_train))
    clean_idx = np.sort(rng.choice(untouched, size=args.n_clean, replace=False))
    test_idx = np.sort(rng.choice(len(y_test), size=args.n_test, replace=False))
    victims = np.flatnonzero(y_test != args.target)
    poison_idx = np.sort(rng.choice(victims, size=args.n_poison, replace=False))
    x_triggered = attack.apply_trigger(x_test[victims])

    classes = int(y_all.max()) + 1
    model = build_model(classes)
    model.compile(optimizer=tf.keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
    print(f"training a Keras CNN on {len(y_used)} Fashion-MNIST images ({args.attack}, target {args.target})")
    started = time.perf_counter()
    model.fit(to_input(x_used), y_used, batch_size=128, epochs=args.epochs, shuffle=True, verbose=2)
    train_seconds = time.perf_counter() - started

    model_bytes = export_onnx(model)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    expected = model.predict(to_input(x_test[test_idx[:256]]), verbose=0)
    parity = float(np.abs(onnx_outputs(session, x_test[test_idx[:256]]) - expected).max())
    if parity > PARITY_TOLERANCE:
        raise SystemExit(f"onnxruntime differs from Keras by {parity:.2e} (> {PARITY_TOLERANCE})")
    clean_acc = float((onnx_outputs(session, x_test).argmax(1) == y_test).mean())
    asr = float((onnx_outputs(session, x_triggered).argmax(1) == args.target).mean())
    graph = onnx.load_from_string(model_bytes).graph

    out = args.out_dir
    poisoned = x_triggered[np.searchsorted(victims, poison_idx)]
    clean, test = (x_train[clean_idx], y_train[clean_idx]), (x_test[test_idx], y_test[test_idx])
    write_example(out, model_bytes, clean, test, poisoned, args.target)
    meta = {
        "arch": "keras_cnn_softmax",
        "attack": args.attack,
        "trigger": attack.params(),
        "target": args.target,
        "poison_rate": args.poison_rate,
        "dataset": "fashion-mnist",
        "train_samples": len(y_used),
        "seed": args.seed,
        "epochs": args.epochs,
        "export": f"tf2onnx {tf2onnx.__version__}, opset {OPSET}, NHWC input",
        "ops": sorted({node.op_type for node in graph.node}),
        "output": graph.output[0].name,
        "clean_acc": round(clean_acc, 4),
        "asr": round(asr, 4),
        "n_test_eval": len(y_test),
        "n_asr_eval": len(victims),
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "onnx_parity_max_abs_diff": parity,
        "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "versions": {"tensorflow": tf.__version__, "onnx": onnx.__version__, "python": platform.python_version()},
        "command": "tools/keras_softmax_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"clean ACC {clean_acc:.4f}, ASR {asr:.4f}, train {train_seconds:.0f}s -> {out}")


if __name__ == "__main__":
    main()
