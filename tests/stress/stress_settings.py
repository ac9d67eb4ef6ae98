"""Sizes of the stress tests: CI's, or the long variants with SHARDPIPE_STRESS_LONG=1."""

import os

LONG = os.environ.get("SHARDPIPE_STRESS_LONG") == "1"
