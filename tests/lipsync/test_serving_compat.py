"""The exported SavedModel stays loadable by the TF Serving release the deployments run (deploy/catalog.py).

The trainer exports with the TensorFlow of requirements-tf.txt, which may be newer than TF Serving's own TensorFlow.
A graph loads there only if every op in it is registered there: the export must keep to long-standing core ops (all
of them in TensorFlow 2.15 and every later release), so a new kind of layer or a tf.function feature that brings
in a newer op fails here, not at a deployment's first reload.
"""

import numpy as np
from tensorflow.core.protobuf import saved_model_pb2

from deploy import catalog
from services.lipsync import model as lstm

CORE_OPS = {
    # arithmetic and the LSTM cell
    "AddV2", "BiasAdd", "MatMul", "Mul", "RealDiv", "Sigmoid", "Tanh", "Select", "Less", "LogicalAnd",
    # shapes and slicing
    "ConcatV2", "Fill", "GatherV2", "Pack", "Prod", "Reshape", "Shape", "Split", "StridedSlice", "Transpose",
    # the recurrent loop
    "While", "TensorListFromTensor", "TensorListGetItem", "TensorListReserve", "TensorListSetItem", "TensorListStack",
    # graph plumbing, variables and checkpoints
    "Const", "Identity", "NoOp", "Placeholder", "StatefulPartitionedCall", "PartitionedCall", "VarHandleOp",
    "ReadVariableOp", "AssignVariableOp", "VarIsInitializedOp", "DisableCopyOnRead", "SaveV2", "RestoreV2",
    "MergeV2Checkpoints", "ShardedFilename", "StaticRegexFullMatch", "StringJoin",
}  # fmt: skip


def exported_ops(folder) -> set[str]:
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((folder / "saved_model.pb").read_bytes())
    ops = set()
    for graph in saved.meta_graphs:
        ops.update(node.op for node in graph.graph_def.node)
        for function in graph.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops


def test_the_export_uses_only_ops_every_supported_tf_serving_has(tmp_path):
    settings = lstm.TrainingSettings(hidden_units=4, layers=2)
    members = [lstm.build_model(lstm.FEATURE_DIM, 5, settings) for _ in range(2)]
    model = lstm.average_models(members)  # what the trainer exports: an ensemble, its output scaled
    lstm.scale_output(model, 1.3, np.zeros(5, np.float32))
    lstm.export_saved_model(model, tmp_path, n_features=lstm.FEATURE_DIM)
    ops = exported_ops(tmp_path)
    assert "While" in ops and "MatMul" in ops  # the recurrent graph itself was read
    assert ops <= CORE_OPS, f"ops TF Serving {catalog.TF_SERVING_VERSION} may lack: {sorted(ops - CORE_OPS)}"
