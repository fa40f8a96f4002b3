"""The routing tests' fixtures: scripted upstreams (``sims``) and a gateway with a large and a small tier
on them (``routed``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.routing import routing_config


@pytest.fixture
def sims(start_sim: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Scripted upstreams for one test, stopped after it."""
    started: list[Any] = []

    def start(*args: str) -> Any:
        sim = start_sim(*args)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.process.kill()  # a scripted hang would hold a graceful shutdown for its whole sleep
    for sim in started:
        sim.process.wait(10)


@pytest.fixture
def routed(app_factory: Any, tmp_path: Path) -> Callable[..., Any]:
    def make(metric_reader: Any = None, **kwargs: Any) -> Any:
        return app_factory(config=routing_config(tmp_path / "routing.yaml", **kwargs), metric_reader=metric_reader)
    return make
