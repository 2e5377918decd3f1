"""Local stand-in for TensorFlow Serving: the same gRPC API over the same `<model>/<version>/` SavedModel tree.

Containers (compose, Kubernetes) run the real `tensorflow/serving` image; this package serves
`tensorflow.serving.PredictionService` (Predict, GetModelMetadata) and
`tensorflow.serving.ModelService` (GetModelStatus) where that binary is not available, so the
`lipsync` stage's client code is the same in both. Start it with `python -m services.tfserving`.
"""

import os

# TensorFlow reads this when its C++ library loads: set it before any submodule imports TensorFlow.
# `setdefault` keeps a value the operator chose (e.g. 0 to debug loading).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
