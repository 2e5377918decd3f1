"""Tests of the TF Serving stand-in."""

import os

# Before the test modules import TensorFlow: keep its C++ start-up chatter out of the test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
