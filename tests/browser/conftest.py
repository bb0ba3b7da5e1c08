"""Fixtures of the browser tests: the session's real ComfyUI server (shared with tests/server) and a
fresh Chromium page on its UI per test."""
from __future__ import annotations

import pytest

import browser_ui
from loralab_testkit import server


@pytest.fixture(scope="session")
def srv(request, tmp_path_factory) -> server.ComfyServer:
    yield from server.session_server(request, tmp_path_factory)


@pytest.fixture
def page(srv, tmp_path):
    with browser_ui.open_page(srv, str(tmp_path / "chromium-profile")) as pg:
        yield pg
