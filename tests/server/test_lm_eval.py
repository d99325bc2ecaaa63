"""lm-eval's `local-completions` model against a live AFD (2A1F) server, through lm-eval's
Python API (`lm_eval.simple_evaluate`), on four tiny local tasks written into tmp_path: a
loglikelihood task, a multiple-choice task, a loglikelihood_rolling (perplexity) task and a
generate_until task. Every loglikelihood lm-eval reports equals HF transformers' on the same
weights and the same tokens (fp32, within HF_TOL); the generations equal HF's greedy ones.

lm-eval tokenizes with the model directory's tokenizer (`tokenizer_backend=huggingface`,
`tokenizer=` the directory), or through the server (`tokenizer_backend=remote`: /tokenizer_info,
/tokenize, /detokenize, as against vLLM), and sends token ids; its loglikelihood requests are
`echo: true, logprobs: 1, max_tokens: 1`, read back from the echoed prompt's logprobs. To know
which tokens lm-eval scored, the oracle asks lm-eval's own encoding code
(`_encode_pair`, `tok_encode`, the rolling windows) on a second model object.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from tests.server.conftest import SERVED, live_server

# nothing but local files: the datasets library must not try a hub (set before it is imported)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

HF_TOL = 1e-4
MAX_LENGTH = 40
"""lm-eval's max_length: short enough that the rolling task is cut into several windows."""
GEN_TOKENS = 6

LOGLIKELIHOOD = [
    {"context": "The capital of France is", "continuation": " Paris"},
    {"context": "One, two, three,", "continuation": " four, five"},
    {"context": "def add(a, b):", "continuation": "\n    return a + b"},
]
MULTIPLE_CHOICE = [
    {"question": "Water is", "choices": ["wet", "dry", "loud"], "label": 0},
    {"question": "The sky is", "choices": ["green", "blue"], "label": 1},
    {"question": "Two plus two is", "choices": ["three", "four", "five"], "label": 1},
]
ROLLING = [
    {
        "text": "It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
        "incredulity, it was the season of Light, it was the season of Darkness."
    },
    {"text": "Hello world"},
]
GENERATE = [{"q": "Once upon a time", "a": " there"}, {"q": "Hello", "a": " world"}]

TASKS = {
    "afd_ll": (
        LOGLIKELIHOOD,
        {
            "output_type": "loglikelihood",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{continuation}}",
            "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}],
        },
    ),
    "afd_mc": (
        MULTIPLE_CHOICE,
        {
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        },
    ),
    "afd_rolling": (
        ROLLING,
        {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
        },
    ),
    "afd_gen": (
        GENERATE,
        {
            "output_type": "generate_until",
            "doc_to_text": "{{q}}",
            "doc_to_target": "{{a}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": GEN_TOKENS},
            "metric_list": [{"metric": "exact_match"}],
        },
    ),
}


def _write_tasks(root: Path) -> None:
    """One YAML task per entry, over a local JSONL file (`dataset_path: json`)."""
    for name, (docs, spec) in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        config = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {
                "data_files": {"test": str(data)},
                "cache_dir": str(root / "datasets-cache"),  # not ~/.cache
            },
            "test_split": "test",
            **spec,
        }
        # JSON is YAML: no YAML writer needed
        (root / f"{name}.yaml").write_text(json.dumps(config, indent=1))


class _HF:
    """HF transformers on the served weights: logprob sums and greedy generations (fp32)."""

    def __init__(self, model_dir: str) -> None:
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32
        ).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    def loglikelihood(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = context + continuation
        with torch.no_grad():
            lp = self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        rows = lp[len(context) - 1 : len(ids) - 1]  # the distributions of the continuation
        target = torch.tensor(continuation)
        total = rows.gather(1, target.unsqueeze(1)).sum().item()
        return total, bool((rows.argmax(-1) == target).all())

    def greedy(self, ids: list[int], until: list[str]) -> str:
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=GEN_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
        text = self.tokenizer.decode(out[0, len(ids) :].tolist())
        for stop in until:
            text = text.split(stop)[0]
        return text


@pytest.fixture(scope="module")
def served():
    from afdserve.server.state import FrontOptions

    # /tokenizer_info on: lm-eval's remote tokenizer needs it (as vLLM's server)
    front = FrontOptions(enable_tokenizer_info_endpoint=True)
    with live_server(mode="afd", attention_workers=2, microbatches=2, front=front) as s:
        yield s


def _args(base_url: str, model_dir: str) -> dict:
    return {
        "model": SERVED,
        "base_url": f"{base_url}/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": model_dir,
        "max_length": MAX_LENGTH,
        "num_concurrent": 1,
        "max_retries": 1,
        "timeout": 60,
    }


def test_lm_eval_local_completions_equals_hf(served, tmp_path):
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    model_dir = served.serving.model_root
    _write_tasks(tmp_path)
    args = _args(served.base_url, model_dir)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = results["samples"]
    assert {k: len(v) for k, v in samples.items()} == {k: len(v[0]) for k, v in TASKS.items()}
    hf = _HF(model_dir)
    encoder = get_model("local-completions")(**args)  # lm-eval's own tokenization, for the oracle
    worst = 0.0

    def check(got: tuple[float, bool], context: list[int], continuation: list[int]) -> None:
        nonlocal worst
        want = hf.loglikelihood(context, continuation)
        worst = max(worst, abs(got[0] - want[0]))
        assert got[0] == pytest.approx(want[0], abs=HF_TOL), (got, want)
        assert got[1] == want[1]

    # loglikelihood and multiple choice: one (context, continuation) per request
    for task in ("afd_ll", "afd_mc"):
        for sample in samples[task]:
            for (context, continuation), resp in zip(
                sample["arguments"], sample["resps"], strict=True
            ):
                check(tuple(resp[0]), *encoder._encode_pair(context, continuation))
    # loglikelihood_rolling: a document's sum over lm-eval's windows
    for sample in samples["afd_rolling"]:
        (text,) = sample["arguments"][0]
        windows = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(
                token_list=encoder.tok_encode(text),
                prefix_token=encoder.prefix_token_id,
                max_seq_len=encoder.max_length - 1,
                context_len=1,
            )
        ]
        want = sum(hf.loglikelihood(c, t)[0] for c, t in windows)
        got = sample["resps"][0][0]
        worst = max(worst, abs(got - want))
        assert got == pytest.approx(want, abs=HF_TOL * len(windows))
        if len(text) > 60:
            assert len(windows) > 1, "the long document was meant to need several windows"
    # generate_until: HF's greedy tokens on the same context, cut at the stop string
    for sample in samples["afd_gen"]:
        context, gen_kwargs = sample["arguments"][0]
        want = hf.greedy(encoder.tok_encode(context), gen_kwargs["until"])
        assert sample["resps"][0][0] == want
    print(f"lm-eval: max |loglikelihood - HF| = {worst:.3g}")
    # and the metrics were computed from them
    metrics = results["results"]
    assert 0.0 <= metrics["afd_mc"]["acc,none"] <= 1.0
    assert math.isfinite(metrics["afd_rolling"]["word_perplexity,none"])
    assert math.isfinite(metrics["afd_ll"]["perplexity,none"])


def test_lm_eval_remote_tokenizer_equals_hf(served, tmp_path):
    """tokenizer_backend="remote": lm-eval has no tokenizer of its own and tokenises through
    the server's /tokenizer_info, /tokenize and /detokenize; it encodes exactly as HF's
    tokenizer does and gets HF's loglikelihoods and generations."""
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    model_dir = served.serving.model_root
    _write_tasks(tmp_path)
    args = _args(served.base_url, model_dir) | {"tokenizer_backend": "remote"}
    del args["tokenizer"]
    tasks = ["afd_ll", "afd_gen"]
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = results["samples"]
    remote = get_model("local-completions")(**args)
    local = get_model("local-completions")(**_args(served.base_url, model_dir))
    assert type(remote.tokenizer).__name__ == "RemoteTokenizer"
    assert remote.eot_token_id == local.eot_token_id == served.serving.tokenizer.eos_token_id
    hf = _HF(model_dir)
    for sample in samples["afd_ll"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            pair = remote._encode_pair(context, continuation)
            assert pair == local._encode_pair(context, continuation)
            want = hf.loglikelihood(*pair)
            assert resp[0][0] == pytest.approx(want[0], abs=HF_TOL) and resp[0][1] == want[1]
    for sample in samples["afd_gen"]:
        context, gen_kwargs = sample["arguments"][0]
        assert remote.tok_encode(context) == local.tok_encode(context)
        assert sample["resps"][0][0] == hf.greedy(local.tok_encode(context), gen_kwargs["until"])
    assert remote.tokenizer.decode(local.tok_encode("Hello there")) == "Hello there"
