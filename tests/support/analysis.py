"""A target analysis manifest made from given arrays (for stages that read only some of it)."""

import numpy as np

from audio2video.common.v1 import common_pb2
from audio2video.face.v1 import face_pb2
from services.runtime.protos import array_ref, object_ref, store_result


def store_analysis(store, prefix, *, fps=(30, 1), **arrays) -> common_pb2.ObjectRef:
    """Store `arrays` (field name of face.v1.VideoAnalysis -> numpy array) and a manifest naming them."""
    frames = len(next(iter(arrays.values())))
    manifest = face_pb2.VideoAnalysis(
        format_version=1,
        info=face_pb2.VideoInfo(
            frame_count=frames,
            width=256,
            height=256,
            frame_rate=common_pb2.FrameRate(numerator=fps[0], denominator=fps[1]),
        ),
    )
    for field, array in arrays.items():
        blob, info = store.put_array(f"{prefix}/{field}.npy", np.asarray(array), fps=fps[0] / fps[1])
        getattr(manifest, field).CopyFrom(array_ref(blob, info))
    return object_ref(store_result(store, f"{prefix}/manifest.json", manifest))
