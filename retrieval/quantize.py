"""The local embedder's query model: the packaged all-MiniLM-L6-v2 with int8 matrix products.

The packaged model stores its weights as int8 but computes in float32 (onnxruntime folds each ``Cast`` and
``Mul`` into a float weight when it loads). This derives a model whose ``MatMul``s and embedding lookups run
on int8 weights, one scale per output channel, the activations quantised per call
(``onnxruntime.quantization.quantize_dynamic``): a short query in about 3.5 ms on one core instead of 8 ms
(6.5 ms on two), at a cosine of 0.98 or more to the packaged model's vector on every text measured
(bench/RESULTS.md). Only queries use it: what is stored in a collection is the packaged model's, so an index
is unchanged and its version with it.

Run in a process of its own (``python -m tollway.retrieval.quantize SOURCE TARGET``) so that the gateway
never imports ``onnx`` and the quantiser's memory goes back when it ends; the target is written whole or not
at all (a temporary file renamed over it), so processes building it at once leave one good file.
``python -m tollway.retrieval.quantize --prepare [FOLDER]`` builds it where the embedder looks
(``$TOLLWAY_MODELS_DIR``, else the user's cache folder), as an image's build step does for a read-only image.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

MIN_COSINE = 0.98  # the built model's vector against the packaged model's, for every probe text
PROBES = (
    "How do I reset my password?",
    "Which payment methods are accepted for international transfers, and what do they cost?",
    "PostgreSQL uses multiversion concurrency control: each statement sees a snapshot of the data as it was "
    "some time ago, regardless of the current state of the underlying data.",
    "Der Vertrag kann mit einer Frist von drei Monaten zum Monatsende gekündigt werden.",
    "error: failed to push some refs to 'origin' (non-fast-forward); pull first, then push again",
)


def check(source: Path, built: Path) -> float:
    """The lowest cosine between the two models' vectors over the probe texts; raises under MIN_COSINE."""
    import numpy as np

    from tollway.retrieval.embedders import LocalEmbedder

    exact, fast = LocalEmbedder(query_model=False), LocalEmbedder(query_model=False)
    exact.__dict__["_session"] = exact._new_session(source, 1)
    fast.__dict__["_session"] = fast._new_session(built, 1)
    a, _ = exact.embed_sync(PROBES)
    b, _ = fast.embed_sync(PROBES)
    low = float(np.min(np.sum(a * b, axis=1)))
    if low < MIN_COSINE:
        raise ValueError(f"the query model's vectors are too far from the packaged model's (cosine {low:.3f})")
    return low


def build(source: Path, target: Path) -> None:
    """The recipe that ``embedders.QUERY_RECIPE`` names (a change here is a new name there)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tollway-quantize-", dir=target.parent) as tmp:
        folded = Path(tmp) / "folded.onnx"
        options = ort.SessionOptions()
        # constant folding only: the int8 weights become the float32 ones the packaged model computes with,
        # and the file stays portable (no layout chosen for this machine's CPU)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        options.log_severity_level = 3
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        built = Path(tmp) / "query.onnx"
        quantize_dynamic(str(folded), str(built), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gather"])
        check(source, built)
        os.replace(built, target)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--prepare"] and len(argv) <= 2:
        from tollway.retrieval.embedders import default_models_dir, prepare_query_model

        print(prepare_query_model(Path(argv[1]) if len(argv) == 2 else default_models_dir()))
        return 0
    if len(argv) != 2:
        print("usage: python -m tollway.retrieval.quantize SOURCE TARGET | --prepare [FOLDER]", file=sys.stderr)
        return 2
    import logging

    logging.disable(logging.WARNING)  # the quantiser's advice to pre-process the model first
    build(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
