"""Fixtures shared by the tests of campaign/ on real services."""

from __future__ import annotations

import pytest

from tests.integration import factories as f


@pytest.fixture
def world(clean_db):
    ws, cols = f.workspace("acme")
    ibx = f.inbox(ws, "sales-1")
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], name="first-touch")
    return ws, cols, ibx, cfg
