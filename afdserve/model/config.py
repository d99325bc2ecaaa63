"""ModelConfig: the subset of an HF config.json that the runtime needs, parsed and validated.

One dataclass covers the five supported architectures; the differences between them are flags
(q/k/v bias, q/k norm, MoE shape, routing renormalisation). Both the classic HF spelling
(`rope_theta`, `rope_scaling`) and the transformers-v5 one (`rope_parameters`) are accepted.

A directory is read as HF reads it: a config.json without `architectures` is identified by its
`model_type` (HF's AutoModelForCausalLM mapping, as vLLM does), and generation_config.json, when
it names `eos_token_id`, supplies the stop ids (HF's GenerationConfig.from_pretrained wins over
config.json) and the sampling defaults vLLM's `--generation-config auto` takes from it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from afdserve.errors import ModelLoadError, UserInputError
from afdserve.types import SamplingParams

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
)
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
MODEL_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "mixtral": "MixtralForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
    }
)
"""config.json `model_type` -> architecture, for configs without `architectures` (the entries
of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES for the supported architectures)."""
GENERATION_CONFIG = "generation_config.json"
SAMPLING_DEFAULT_KEYS: tuple[str, ...] = ("temperature", "top_p", "top_k", "max_new_tokens")
"""generation_config.json fields that become default sampling parameters (vLLM's
get_diff_sampling_param also takes repetition_penalty and min_p, which afdserve lacks)."""
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    """rope_type plus its parameters; None means plain RoPE."""
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False
    """Bias on q/k/v projections (Qwen2; Llama with attention_bias)."""
    o_bias: bool = False
    """Bias on o_proj (Llama with attention_bias only)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before RoPE (Qwen3, Qwen3-MoE)."""
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    """Renormalise the top-k routing weights to sum to 1 (Mixtral always; Qwen3-MoE per config)."""
    moe_layers: tuple[bool, ...] = ()
    """Per layer: True where the FFN is a MoE block, False where it is a dense MLP."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    """The checkpoint's dtype (config.json `torch_dtype` / `dtype`)."""
    sampling_defaults: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """generation_config.json's temperature, top_p, top_k and max_new_tokens, where it sets them
    (only these keys; `max_new_tokens` is HF's name for max_tokens)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ModelLoadError(f"config.json: {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ModelLoadError(
                f"config.json: hidden_act {self.hidden_act!r} is not supported (only 'silu')"
            )
        if self.dtype not in DTYPES:
            raise ModelLoadError(
                f"config.json: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}"
            )
        n_moe = sum(self.moe_layers)
        if n_moe < self.num_hidden_layers and not (
            isinstance(self.intermediate_size, int) and self.intermediate_size >= 1
        ):
            raise ModelLoadError(
                f"config.json: intermediate_size must be a positive integer, got {self.intermediate_size!r}"
            )
        if n_moe and not (
            isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size >= 1
        ):
            raise ModelLoadError(
                f"config.json: the MoE intermediate size must be a positive integer, got {self.moe_intermediate_size!r}"
            )
        if self.is_moe:
            if not (1 <= self.num_experts_per_tok <= self.num_experts):
                raise ModelLoadError(
                    f"config.json: need 1 <= num_experts_per_tok ({self.num_experts_per_tok}) <= "
                    f"num_experts ({self.num_experts})"
                )
            if len(self.moe_layers) != self.num_hidden_layers:
                raise ModelLoadError("internal: moe_layers must have one entry per layer")
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("rope_type", "default")
            if rtype not in SUPPORTED_ROPE_TYPES:
                raise ModelLoadError(
                    f"config.json: rope_scaling type {rtype!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}"
                )

    @property
    def is_moe(self) -> bool:
        return self.architecture in MOE_ARCHITECTURES

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers and self.moe_layers[layer])

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        if not p.is_dir():
            raise ModelLoadError(f"model directory {str(p)!r} does not exist or is not a directory")
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ModelLoadError(
                f"{str(p)!r} has no config.json; is it an HF-format model directory?"
            )
        try:
            data = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{cfg}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ModelLoadError(f"{cfg}: expected a JSON object")
        return cls.from_hf_dict(data, generation=read_generation_config(p))

    @classmethod
    def from_hf_dict(
        cls, d: dict[str, Any], generation: dict[str, Any] | None = None
    ) -> ModelConfig:
        """`d` is config.json; `generation` generation_config.json (None: the directory has none)."""
        arch = _architecture(d)

        def need(key: str) -> Any:
            if key not in d:
                raise ModelLoadError(f"config.json: missing required field {key!r} for {arch}")
            return d[key]

        n_layers = need("num_hidden_layers")
        n_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = d.get("head_dim") or (
            hidden // n_heads
            if isinstance(hidden, int) and isinstance(n_heads, int) and n_heads
            else 0
        )
        rope_theta, rope_scaling = _parse_rope(d)
        # HF generate reads eos from generation_config.json when there is one (vLLM likewise)
        gen = generation or {}
        eos_source, eos = (
            (GENERATION_CONFIG, gen["eos_token_id"])
            if gen.get("eos_token_id") is not None
            else ("config.json", d.get("eos_token_id"))
        )
        eos_ids = _token_ids(eos, eos_source, "eos_token_id")
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"

        moe: dict[str, Any] = {}
        if arch == "MixtralForCausalLM":
            moe = dict(
                num_experts=need("num_local_experts"),
                num_experts_per_tok=need("num_experts_per_tok"),
                moe_intermediate_size=need("intermediate_size"),
                norm_topk_prob=True,
                moe_layers=tuple(True for _ in range(n_layers)),
            )
        elif arch == "Qwen3MoeForCausalLM":
            step = d.get("decoder_sparse_step", 1) or 1
            dense_only = set(d.get("mlp_only_layers") or [])
            # published Qwen3-MoE configs say num_experts; transformers v5 writes num_local_experts
            n_exp = d["num_experts"] if "num_experts" in d else need("num_local_experts")
            moe = dict(
                num_experts=n_exp,
                num_experts_per_tok=need("num_experts_per_tok"),
                moe_intermediate_size=need("moe_intermediate_size"),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                moe_layers=tuple(
                    (i not in dense_only) and n_exp > 0 and (i + 1) % step == 0
                    for i in range(n_layers)
                ),
            )
        if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM") and d.get(
            "use_sliding_window"
        ):
            raise ModelLoadError("config.json: use_sliding_window=true is not supported")
        window = d.get("sliding_window")
        if (
            arch == "MixtralForCausalLM"
            and isinstance(window, int)
            and window < d.get("max_position_embeddings", 2048)
        ):
            raise ModelLoadError(
                f"config.json: sliding_window={window} (sliding-window attention) is not supported"
            )
        if d.get("mlp_bias"):
            raise ModelLoadError("config.json: mlp_bias=true is not supported")
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=d.get("intermediate_size", 0) or 0,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            rms_norm_eps=_number(d, "rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            hidden_act=d.get("hidden_act", "silu"),
            qkv_bias=arch == "Qwen2ForCausalLM"
            or (attention_bias and arch != "MixtralForCausalLM"),
            o_bias=attention_bias and arch not in ("Qwen2ForCausalLM", "MixtralForCausalLM"),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=str(dtype).replace("torch.", ""),
            sampling_defaults=_sampling_defaults(gen),
            extra={k: v for k, v in d.items()},
            **moe,
        )


def _architecture(d: dict[str, Any]) -> str:
    """config.json's first `architectures` entry, or, when it has none, the one its `model_type`
    names (as HF's AutoModelForCausalLM and vLLM do)."""
    archs = d.get("architectures")
    if archs:
        if not isinstance(archs, list) or not isinstance(archs[0], str):
            raise ModelLoadError(
                f"config.json: architectures must be a list of class names, got {archs!r}"
            )
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return arch
    model_type = d.get("model_type")
    if isinstance(model_type, str) and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    what = (
        f"its model_type {model_type!r} is not a supported one"
        if model_type is not None
        else "no 'model_type' either"
    )
    raise ModelLoadError(
        f"config.json has no 'architectures' entry and {what}; supported model types: "
        f"{', '.join(MODEL_TYPES)} (architectures {', '.join(SUPPORTED_ARCHITECTURES)})"
    )


def read_generation_config(model_dir: str | Path) -> dict[str, Any] | None:
    """generation_config.json of `model_dir` as a dict, or None when there is none."""
    path = Path(model_dir) / GENERATION_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _token_ids(value: Any, source: str, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ModelLoadError(f"{source}: {key} must be a token id or a list of them, got {value!r}")
    return tuple(dict.fromkeys(values))


def _sampling_defaults(gen: dict[str, Any]) -> dict[str, Any]:
    """The sampling defaults a generation_config.json sets, checked as SamplingParams checks them
    (a bad value fails the load, not the first request)."""
    out = {k: gen[k] for k in SAMPLING_DEFAULT_KEYS if gen.get(k) is not None}
    try:
        sampling_params_with(SamplingParams(), out)
    except UserInputError as exc:
        raise ModelLoadError(f"{GENERATION_CONFIG}: {exc}") from None
    return out


def sampling_params_with(params: SamplingParams, defaults: dict[str, Any]) -> SamplingParams:
    """`params` with `defaults` (ModelConfig.sampling_defaults) applied."""
    fields = {("max_tokens" if k == "max_new_tokens" else k): v for k, v in defaults.items()}
    return dataclasses.replace(params, **fields)


def _number(d: dict[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ModelLoadError(f"config.json: {key} must be a positive number, got {value!r}")
    return float(value)


def _parse_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = d.get("rope_parameters")
    if isinstance(params, dict):  # transformers v5 spelling
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(d.get("rope_theta", 10000.0))
        scaling = dict(d["rope_scaling"]) if isinstance(d.get("rope_scaling"), dict) else {}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if not scaling or scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling
