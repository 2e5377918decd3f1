"""Who may import whom: the imports of every module (parsed, not run) against the repository's rules.

Units are the top-level packages, with each stage (`services/<stage>`) and the runtime a unit of its own:
- no cycle between units;
- a stage imports only its own package, the shared runtime and the generated stubs (and third-party libraries);
- the runtime imports no other unit;
- nothing imports the `a2v` command (`orchestrator.cli`): what others need is in `client`;
- TensorFlow is imported only where the LSTM is trained or served;
- the tools (`evaluation`) reach into a stage only through the modules listed in TOOL_STAGE_IMPORTS.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("services", "orchestrator", "client", "deploy", "evaluation")
FIRST_PARTY = (*PACKAGES, "audio2video", "tests")
STAGES = ("audio", "face", "lipsync", "texture", "teeth", "retiming", "composite", "tfserving")
TENSORFLOW_MODULES = {
    # where the LSTM is trained (lazily, in the functions that train, export or run a Keras model)
    "services.lipsync.model",
    "services.lipsync.trainer",
    # where it is served: the lipsync stage's TF Serving client and the TF Serving stand-in
    "services.lipsync.serving",
    "services.tfserving.models",
    "services.tfserving.servicer",
}
TOOL_STAGE_IMPORTS = {
    # The tools measure with the stages' own algorithms on local files, without a running stack. Each entry is a
    # stage module they may import; everything else goes through the runtime or the stages' gRPC contracts.
    "services.audio.core": "decoding, loudness and features as the audio stage computes them",
    "services.face.core": "landmarks of any video (outputs, held-out clips) as the face stage finds them",
    "services.face.landmarks": "the landmark detector the face core runs",
    "services.face.dataset": "the speaker dataset the LSTM is trained on (quality, learning curve, eval shape)",
    "services.lipsync.model": "training and running the LSTM (quality, learning curve, eval shape)",
    "services.lipsync.trainer": "the learning curve trains as `a2v train` does (fit_speaker)",
    "services.lipsync.core": "resampling predicted rows to frames as the lipsync stage does",
    "services.lipsync.versions": "where a model's files live in the store (eval resynth reads the model's rows)",
    "services.composite.core": "reading target frames as the composite stage does (artifact measure)",
    "services.composite.artifacts": "the blend's own foreign colour and edge measure (artifact measure)",
    "services.composite.render": "the jaw correction and face outline the blend uses (artifact measure)",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "services" and len(parts) > 1 else parts[0]


def imports(path: Path) -> set[str]:
    """Absolute module names a file imports (`from a.b import c` gives a.b and a.b.c), at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def modules(*roots: str) -> dict[str, set[str]]:
    return {
        module_name(path): imports(path)
        for root in roots
        for path in sorted((REPO / root).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return modules(*PACKAGES)


def first_party(name: str) -> bool:
    return name.split(".")[0] in FIRST_PARTY


def test_every_package_is_parsed(graph):
    for stage in STAGES:
        assert f"services.{stage}" in graph
    assert {"orchestrator.cli", "client.jobs", "deploy.local", "evaluation.cli"} <= graph.keys()


def test_no_cycle_between_units(graph):
    edges = defaultdict(set)
    for module, names in graph.items():
        for name in filter(first_party, names):
            if unit(name) != unit(module) and not name.startswith("audio2video"):
                edges[unit(module)].add(unit(name))
    seen: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(edges[node]):
            if seen.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle between units: " + " -> ".join(cycle))
            if nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for node in sorted(edges):
        if node not in seen:
            visit(node, [node])


def test_stages_import_only_the_runtime_their_own_package_and_stubs(graph):
    bad = []
    for module, names in graph.items():
        if unit(module) not in {f"services.{s}" for s in STAGES}:
            continue
        for name in filter(first_party, names):
            if name == "services" or unit(name) in (unit(module), "services.runtime", "audio2video"):
                continue
            bad.append(f"{module} imports {name}")
    assert not bad, "a stage imports outside its own package and the runtime:\n" + "\n".join(bad)


def test_the_runtime_imports_no_other_unit(graph):
    bad = [
        f"{module} imports {name}"
        for module, names in graph.items()
        if unit(module) == "services.runtime"
        for name in filter(first_party, names)
        if unit(name) not in ("services.runtime", "audio2video") and name != "services"
    ]
    assert not bad, "\n".join(bad)


COMMAND_TESTS = {"tests.test_cli"}
"""The command's own tests, which read its argument parser (every argument has a help text)."""


def test_nothing_imports_the_command():
    everything = modules(*PACKAGES, "tests")
    bad = [
        f"{module} imports {name}"
        for module, names in everything.items()
        for name in names
        if module not in {"orchestrator.cli", *COMMAND_TESTS}
        and (name == "orchestrator.cli" or name.startswith("orchestrator.cli."))
    ]
    assert not bad, "use client.jobs instead of the a2v command:\n" + "\n".join(bad)


def test_tensorflow_only_where_the_model_is_trained_or_served(graph):
    bad = [
        module
        for module, names in graph.items()
        if any(n.split(".")[0] == "tensorflow" for n in names) and module not in TENSORFLOW_MODULES
    ]
    assert not bad, f"TensorFlow imported by {bad}"


def test_tools_reach_into_stages_only_where_listed(graph):
    bad = []
    for module, names in graph.items():
        if unit(module) != "evaluation":
            continue
        for name in filter(first_party, names):
            if unit(name).removeprefix("services.") not in STAGES or name == unit(name):
                continue
            if ".".join(name.split(".")[:3]) not in TOOL_STAGE_IMPORTS:
                bad.append(f"{module} imports {name}")
    assert not bad, "the tools import a stage's internals (use its gRPC contract or the runtime):\n" + "\n".join(bad)
