"""Benchmarks (print numbers, assert nothing): `end_to_end` (`a2v bench`, `make bench`), one module per stage core.

python -m deploy.bench [--quick]                 the end-to-end benchmark through a private local stack
python -m deploy.bench.audio | face | texture | teeth | retiming | composite    one stage's core, one CPU
python -m deploy.bench.texture_replicas          texture with 1 and 2 replicas (needs `make up`)
python -m deploy.bench.face_memory | texture_memory   peak memory of face analysis / texture on long videos
python -m deploy.bench.micro NAME --json OUT     a fast core against its naive reference, one process
"""
