"""Clients of the stack: `environment` (where it is), `jobs` (the orchestrator's job API: connect, submit, watch)."""
