"""Deployment: the local process stack, compose and container files."""
