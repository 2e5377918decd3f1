"""Local stand-in for TensorFlow Serving: the same gRPC API over the same `<model>/<version>/` SavedModel tree.

Containers (compose, Kubernetes) run the real `tensorflow/serving` image; this package serves
`tensorflow.serving.PredictionService` (Predict, GetModelMetadata) and
`tensorflow.serving.ModelService` (GetModelStatus, HandleReloadConfigRequest) where that binary is not available,
so the `lipsync` stage's client code is the same in both, and behaves as it does: only the models of its list
are served, only the versions their policy wants are loaded, anything else is NOT_FOUND, and it turns SERVING only
once every listed model has a version loaded. Start it with `python -m services.tfserving`; what still differs
from the real server is listed in deploy/README.md.
"""

import os

# TensorFlow reads this when its C++ library loads: set it before any submodule imports TensorFlow.
# `setdefault` keeps a value the operator chose (e.g. 0 to debug loading).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
