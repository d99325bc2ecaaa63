"""One way to get an engine for a config, whatever its placement.

`transport="local"` runs every worker in this process (`launch/inprocess.py`'s `Engine`); any
other transport runs one process per worker (`MultiProcessEngine`). Both implement
`EngineClient` (launch/client.py), so `LLM`, the server and tests start either through
`start_engine` and never ask which one they got.
"""

from __future__ import annotations

from pathlib import Path

from afdserve.config import EngineConfig
from afdserve.launch.client import EngineClient


def start_engine(cfg: EngineConfig) -> tuple[EngineClient, Path]:
    """The engine for `cfg`, started, and the model directory it serves."""
    if cfg.transport == "local":
        from afdserve.launch.local import build_engine

        engine, model = build_engine(cfg)
        return engine, Path(model.path)
    from afdserve.launch.multiproc import MultiProcessEngine

    mp = MultiProcessEngine(cfg)
    return mp, Path(mp.model_path)
