"""Shared runtime of every audio2video service: config, server, clients, errors, blob store, logs."""
