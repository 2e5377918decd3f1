"""The orchestrator: sequences the stages of a job and serves the public job API."""
