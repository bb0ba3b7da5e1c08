"""Fixtures of the tiny models of every diffusion family (see tests/support/family_fixtures.py)."""
from support.family_fixtures import *  # noqa: F401,F403
