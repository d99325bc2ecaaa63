"""afdserve: Attention-FFN Disaggregated LLM serving on PyTorch.

`from afdserve import LLM, SamplingParams` is the Python entry point. The import is lazy so that
torch-free parts (the planner and the simulator) load in milliseconds without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutput", "RequestOutput", "__version__"]

if TYPE_CHECKING:
    from afdserve.llm import LLM, RequestOutput
    from afdserve.types import SamplingParams, StructuredOutput


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput"):
        from afdserve import llm

        return getattr(llm, name)
    if name in ("SamplingParams", "StructuredOutput"):
        from afdserve import types

        return getattr(types, name)
    raise AttributeError(f"module 'afdserve' has no attribute {name!r}")
