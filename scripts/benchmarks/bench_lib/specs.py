"""Benchmark specs: which models to build, at which sizes, from `model_cards/benchmarks/<model_type>.json`.

Every registered architecture (`hf_efficient.ARCHITECTURES`) declares its benchmark entries in one JSON file next to
its presets; an architecture without a file is reported as "no benchmark config". The softmax baselines
(transformers' Llama with SDPA, GPT-2) are built-in entries in the same format.

Entry format (see CONTRIBUTING.md, "Benchmark configs"):

    {"model_type": "gmlp", "notes": ["..."], "entries": [
      {"name": "gmlp",                     # unique variant name (also the series name in results)
       "label": "gMLP",                    # display name
       "variant": {"tiny_attn_size": null},   # config overrides shared by every level
       "block": {...}, "model": {...}, "quality": {...},   # per-level config overrides
       "causal_head": "AutoModelForCausalLM",  # null: no causal LM head (decoding is skipped)
       "length_key": "max_position_embeddings",  # config key the benchmark sets to the sequence length (or null)
       "fixed_length": true,               # the model cannot run beyond `length_key` (e.g. gMLP's n x n SGU)
       "complexity": "O(L^2 d) by design", # the paper's claim, for the tables
       "expected_slope": {"time": 2.0, "memory": 2.0},  # log-log slopes the claim implies at long lengths
       "matmul_bound": true,               # hardware-efficiency mode reports the whole model as matmul-bound
       "ffn_module": "layers.0.mlp",       # submodule of the base model that is the FFN part (or null)
       "modality": "text",                 # optional: "text" or "vision" (default: inferred from the heads)
       "image": {...}}]}                   # optional: config overrides of the image classifier (`images` mode)

Config values may be templates: a string `"{expr}"` is evaluated over the level's sizes (`hidden_size`,
`num_hidden_layers`, `num_heads`, `intermediate_size`, `vocab_size`; at the `image` level `image_size`,
`patch_size`, `num_channels`, `num_labels` instead of `vocab_size`), e.g. `"{2 * intermediate_size}"`.
A vision-only entry needs only `name`, `label` and `image`: the text modes skip it with the reason recorded.

Dropout: a declaration never zeroes dropout; the training modes (`scaling`, `compile`, `hardware`) measure each config
class's own defaults (dropout as configured, in training mode) and, for an entry whose config has a nonzero dropout
field (a name with `dropout` or `drop_path`, or GPT-2's `*_pdrop`), a `<name>-dropout0` twin measured in the same run
(`with_dropout_zero`). Every result row records the dropout values it ran with.
"""

import copy
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BENCH_CONFIG_DIR = ROOT / "model_cards" / "benchmarks"
TEXT_LEVELS = ("block", "model", "quality")
LEVELS = (*TEXT_LEVELS, "image")
MODALITIES = ("text", "vision")

# Shared sizes per level: every architecture and the baselines get the same width, depth, heads and FFN size.
SIZES = {
    "default": {
        "block": dict(hidden_size=256, num_hidden_layers=1, num_heads=4, intermediate_size=1024, vocab_size=384),
        "model": dict(hidden_size=256, num_hidden_layers=2, num_heads=4, intermediate_size=1024, vocab_size=384),
        "quality": dict(hidden_size=128, num_hidden_layers=4, num_heads=4, intermediate_size=512, vocab_size=384),
        "recall": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, intermediate_size=256, vocab_size=384),
        "image": dict(
            hidden_size=192,
            num_hidden_layers=4,
            num_heads=3,
            intermediate_size=768,
            image_size=224,
            patch_size=16,
            num_channels=3,
            num_labels=1000,
        ),
    },
    "tiny": {
        "block": dict(hidden_size=32, num_hidden_layers=1, num_heads=2, intermediate_size=64, vocab_size=384),
        "model": dict(hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64, vocab_size=384),
        "quality": dict(hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64, vocab_size=384),
        "recall": dict(hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64, vocab_size=384),
        "image": dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            num_channels=3,
            num_labels=10,
        ),
    },
}

_LLAMA_LEVEL = {
    "hidden_size": "{hidden_size}",
    "num_hidden_layers": "{num_hidden_layers}",
    "num_attention_heads": "{num_heads}",
    "num_key_value_heads": "{num_heads}",
    "intermediate_size": "{intermediate_size}",
    "tie_word_embeddings": True,
}
_GPT2_LEVEL = {
    "n_embd": "{hidden_size}",
    "n_layer": "{num_hidden_layers}",
    "n_head": "{num_heads}",
    "n_inner": "{intermediate_size}",
}

# Built-in softmax-attention baselines (transformers' own models), in the same format as the JSON entries.
BASELINES = [
    {
        "model_type": "llama",
        "name": "llama-sdpa",
        "label": "Llama (SDPA)",
        "baseline": True,
        "attn_implementation": "sdpa",
        "variant": {"rms_norm_eps": 1e-6},
        "block": _LLAMA_LEVEL,
        "model": _LLAMA_LEVEL,
        # SwiGLU has 3 d x ffn weights where the other FFNs have 2: 2/3 of the FFN size gives the same parameters.
        "quality": {**_LLAMA_LEVEL, "intermediate_size": "{2 * intermediate_size // 3}"},
        "causal_head": "AutoModelForCausalLM",
        "decoding": True,  # part of the `decode` and `throughput` modes
        # `throughput`: generate() with transformers' default DynamicCache, and again with a StaticCache
        "generation_variants": [
            {
                "suffix": "-static",
                "label": "Llama (SDPA, static cache)",
                "generate": {"cache_implementation": "static"},
            }
        ],
        "length_key": "max_position_embeddings",
        "fixed_length": False,
        "complexity": "O(L^2 d) time, O(L d) memory (SDPA never materialises the L x L scores)",
        "expected_slope": {"time": 2.0, "memory": 1.0},
        "matmul_bound": False,
        "ffn_module": "layers.0.mlp",
    },
    {
        "model_type": "gpt2",
        "name": "gpt2",
        "label": "GPT-2 (SDPA)",
        "baseline": True,
        "attn_implementation": "sdpa",
        # dropout: GPT2Config's defaults (0.1), beside a dropout-0 twin (with_dropout_zero)
        "variant": {"bos_token_id": 1, "eos_token_id": 1},
        "block": _GPT2_LEVEL,
        "model": _GPT2_LEVEL,
        "quality": _GPT2_LEVEL,
        "causal_head": "AutoModelForCausalLM",
        "length_key": "n_positions",
        "fixed_length": True,
        # Without an attention mask transformers >= 5 takes SDPA's causal path (no L x L mask is built).
        "complexity": "O(L^2 d) time; O(L^2) memory only with an attention mask (materialised L x L mask)",
        "expected_slope": {"time": 2.0, "memory": 1.0},
        "matmul_bound": False,
        "ffn_module": "h.0.mlp",
    },
]
# Public peers users would pick instead (issue 23): transformers' own sub-quadratic language models at the same width,
# depth and vocabulary as every other entry, each config class's defaults otherwise, embeddings tied as Llama's and
# ours. Their CUDA kernels (mamba_ssm, causal_conv1d, the RWKV kernel) are absent on a CPU: what runs is transformers'
# reference torch path, which is what a CPU user gets. They have no dropout field (RecurrentGemma's attention_dropout
# is 0), hence no dropout-0 twin.
_MAMBA2_LEVEL = {
    "hidden_size": "{hidden_size}",
    "num_hidden_layers": "{num_hidden_layers}",
    "expand": 2,
    "head_dim": 64,
    "num_heads": "{2 * hidden_size // 64}",  # num_heads * head_dim == expand * hidden_size
    "n_groups": 1,
    "tie_word_embeddings": True,
}
_MAMBA_LEVEL = {
    "hidden_size": "{hidden_size}",
    "num_hidden_layers": "{num_hidden_layers}",
    "tie_word_embeddings": True,
}
_RWKV_LEVEL = {
    "hidden_size": "{hidden_size}",
    "num_hidden_layers": "{num_hidden_layers}",
    "attention_hidden_size": "{hidden_size}",
    "intermediate_size": "{intermediate_size}",
    "tie_word_embeddings": True,
}
_RECURRENT_GEMMA_LEVEL = {
    "hidden_size": "{hidden_size}",
    "num_hidden_layers": "{num_hidden_layers}",
    "num_attention_heads": "{num_heads}",
    "num_key_value_heads": "{num_heads}",
    # its GeGLU MLP is intermediate_size // 2 wide (3 matrices): 2 x the shared FFN size = Llama's SwiGLU parameters
    "intermediate_size": "{2 * intermediate_size}",
    "lru_width": "{hidden_size}",
    # Griffin's mix at 2 layers: one RG-LRU block, one local-attention block (window 2048, the default). The default
    # pattern (recurrent, recurrent, attention) cut to 2 layers has no attention block, and transformers 5.25's
    # generate() then fails (`get_mask_sizes` on a cache with no attention layer).
    "block_types": ["recurrent", "attention"],
}
_TRAINING_MODES = ("scaling", "compile", "hardware")
_MAMBA_TRAINING = (
    "transformers' CPU path (no mamba_ssm kernel) runs Mamba's selective scan as a Python loop over the tokens, and "
    "the backward of each step's slice of the discretised A / B x materialises a gradient of the full (B, d_inner, L, "
    "N) tensor, so a training step costs O(L^2) memory traffic: one forward + backward of the 2-layer d 256 LM takes "
    "4.3 s at 256 tokens, 13 s at 512 and 254 s at 1024 on the 2-core EPYC under load (Llama: 0.25-0.35 s at "
    "1024); its inference "
    "(decode, throughput) is measured"
)
BASELINES += [
    {
        "model_type": "mamba2",
        "name": "mamba2",
        "label": "Mamba2 (transformers, torch path)",
        "baseline": True,
        "peer": True,
        "variant": {},
        "block": _MAMBA2_LEVEL,
        "model": _MAMBA2_LEVEL,
        "quality": _MAMBA2_LEVEL,
        "causal_head": "AutoModelForCausalLM",
        "decoding": True,
        "length_key": None,
        "fixed_length": False,
        "complexity": "O(L d N) time and memory (chunked SSD, chunks of 256; state N = 128, the default)",
        "expected_slope": {"time": 1.0, "memory": 1.0},
        "matmul_bound": False,
        "ffn_module": None,
        "mixer_is_block": True,  # no FFN: the block is norm + mixer + residual, so the token-mixer level is the block
    },
    {
        "model_type": "mamba",
        "name": "mamba",
        "label": "Mamba (transformers, torch path)",
        "baseline": True,
        "peer": True,
        "variant": {},
        "block": _MAMBA_LEVEL,
        "model": _MAMBA_LEVEL,
        "quality": _MAMBA_LEVEL,
        "causal_head": "AutoModelForCausalLM",
        "decoding": True,
        "skip_modes": {mode: _MAMBA_TRAINING for mode in _TRAINING_MODES},
        "length_key": None,
        "fixed_length": False,
        "complexity": "O(L d N) (selective scan, N = 16; the torch path loops over tokens in Python)",
        "expected_slope": {"time": 1.0, "memory": 1.0},
        "matmul_bound": False,
        "ffn_module": None,
        "mixer_is_block": True,
    },
    {
        "model_type": "rwkv",
        "name": "rwkv",
        "label": "RWKV-4 (transformers, CPU path)",
        "baseline": True,
        "peer": True,
        "variant": {},
        "block": _RWKV_LEVEL,
        "model": _RWKV_LEVEL,
        "quality": _RWKV_LEVEL,
        "causal_head": "AutoModelForCausalLM",
        "decoding": True,
        "length_key": "context_length",
        "fixed_length": False,
        "complexity": "O(L d) (WKV recurrence; the CPU path loops over tokens in Python, its backward is O(L^2))",
        "expected_slope": {"time": 1.0, "memory": 1.0},
        "matmul_bound": False,
        # its channel mix returns (output, state): the harness cannot zero it, so there is no token-mixer level
        "ffn_module": None,
        "skip_levels": {
            "block": "transformers' RWKV weight init divides by num_hidden_layers - 1: a 1-layer RWKV cannot be built"
        },
    },
    {
        "model_type": "recurrent_gemma",
        "name": "recurrent-gemma",
        "label": "RecurrentGemma (transformers, torch path)",
        "baseline": True,
        "peer": True,
        "variant": {},
        "block": _RECURRENT_GEMMA_LEVEL,
        "model": _RECURRENT_GEMMA_LEVEL,
        "quality": _RECURRENT_GEMMA_LEVEL,
        "causal_head": "AutoModelForCausalLM",
        "decoding": True,
        "skip_modes": {
            "decode": "its forward returns no cache (it fills the one generate() hands it): its decoding is "
            "measured through generate() by the `throughput` mode"
        },
        "length_key": None,
        "fixed_length": False,
        "complexity": "O(L d + L w d) (RG-LRU block + local attention, window w = 2048; the torch path loops over "
        "tokens in Python in training)",
        "expected_slope": {"time": 1.0, "memory": 1.0},
        "matmul_bound": False,
        "ffn_module": "layers.0.mlp_block",
    },
]
# The image-classification reference (`images` mode): transformers' ViT with SDPA, same width, depth, heads, FFN.
BASELINES.append(
    {
        "model_type": "vit",
        "name": "vit-sdpa",
        "label": "ViT (SDPA)",
        "baseline": True,
        "modality": "vision",
        "attn_implementation": "sdpa",
        "image": {
            "hidden_size": "{hidden_size}",
            "num_hidden_layers": "{num_hidden_layers}",
            "num_attention_heads": "{num_heads}",
            "intermediate_size": "{intermediate_size}",
            "image_size": "{image_size}",
            "patch_size": "{patch_size}",
            "num_channels": "{num_channels}",
            "num_labels": "{num_labels}",
        },
        "complexity": "O(N^2 d) time over N = (image / patch)^2 patches",
    }
)
BASELINE_NAMES = [b["name"] for b in BASELINES]
REFERENCE = "llama-sdpa"  # every ratio is "ours / Llama SDPA", measured side by side in one run
IMAGE_REFERENCE = "vit-sdpa"  # the `images` mode's ratios are "ours / ViT SDPA"
TEXT_MODES = ("scaling", "compile", "decode", "throughput", "hardware", "quality", "recall")
DROPOUT_ZERO_SUFFIX = "-dropout0"
# Dropout fields of heads the benchmark never builds (GPT-2's double-heads summary, classifiers): not part of a twin.
HEAD_ONLY_DROPOUT = ("summary_first_dropout", "classifier_dropout")


def evaluate_templates(value, sizes: dict):
    """Replace `"{expr}"` strings (recursively) by `expr` evaluated over `sizes` (ints only, no builtins)."""
    if isinstance(value, dict):
        return {k: evaluate_templates(v, sizes) for k, v in value.items()}
    if isinstance(value, list):
        return [evaluate_templates(v, sizes) for v in value]
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        try:
            return eval(value[1:-1], {"__builtins__": {}}, dict(sizes))  # project-owned JSON, no builtins
        except Exception as error:
            raise ValueError(f"Bad template {value!r} in a benchmark config: {error}") from error
    return value


def validate_file(data: dict, path: Path) -> None:
    """Raise ValueError on a malformed benchmark-config file (named field, named file)."""
    if not isinstance(data, dict) or "entries" not in data or not isinstance(data["entries"], list):
        raise ValueError(f"{path}: expected an object with a list `entries`.")
    names = set()
    for i, entry in enumerate(data["entries"]):
        image_only = "image" in entry and not any(level in entry for level in TEXT_LEVELS)
        modality = entry.get("modality", "vision" if image_only else "text")
        if modality not in MODALITIES:
            raise ValueError(f"{path}: entry {i}: `modality` is {modality!r}; expected one of {MODALITIES}.")
        required = ("name", "label", "image") if modality == "vision" else ("name", "label", *TEXT_LEVELS)
        for key in required:
            if key not in entry:
                hint = " (a vision-only entry declares an `image` level instead)" if key in TEXT_LEVELS else ""
                raise ValueError(f"{path}: entry {i} has no `{key}`{hint}.")
        if entry["name"] in names:
            raise ValueError(f"{path}: duplicate entry name {entry['name']!r}.")
        names.add(entry["name"])
        unknown = set(entry.get("expected_slope", {})) - {"time", "memory"}
        if unknown:
            raise ValueError(f"{path}: entry {entry['name']!r}: unknown expected_slope keys {sorted(unknown)}.")


def discover(include_baselines: bool = True, names: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """All benchmark entries of the registered architectures (plus baselines), and the skipped architectures.

    Returns `(entries, skipped)`; each entry carries its `model_type`; `skipped` lists `{"model_type", "reason"}`.
    `names` keeps only entries (or model types) whose name is listed.
    """
    import hf_efficient

    entries, skipped = [], []
    for model_type in sorted(hf_efficient.ARCHITECTURES):
        path = BENCH_CONFIG_DIR / f"{model_type}.json"
        if not path.exists():
            skipped.append({"model_type": model_type, "reason": f"no benchmark config ({path.relative_to(ROOT)})"})
            continue
        data = json.loads(path.read_text())
        validate_file(data, path)
        for entry in data["entries"]:
            entry = {"model_type": model_type, "baseline": False, **entry}
            entry.setdefault("modality", infer_modality(model_type, entry))
            entries.append(entry)
    if include_baselines:
        entries.extend({"modality": "text", **copy.deepcopy(b)} for b in BASELINES)
    if names:
        # a dropout-0 twin or a generation variant is derived from its entry: naming it keeps the entry
        wanted = set(names) | {n.removesuffix(DROPOUT_ZERO_SUFFIX) for n in names}
        for entry in entries:
            for variant in entry.get("generation_variants", []):
                if entry["name"] + variant["suffix"] in wanted:
                    wanted.add(entry["name"])
        entries = [e for e in entries if e["name"] in wanted or e["model_type"] in wanted]
    return entries, skipped


def infer_modality(model_type: str, entry: dict) -> str:
    """ "text" when the architecture registers a text head (causal or masked LM) and the entry declares the text
    levels, else "vision" (e.g. an image-only classifier)."""
    import transformers

    import hf_efficient

    if any(level not in entry for level in TEXT_LEVELS):
        return "vision"
    try:
        config_class = hf_efficient.get_config_class(model_type)
    except Exception:
        return "text"
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM):
        if config_class in auto._model_mapping:
            return "text"
    return "vision"


def split_for_mode(entries: list[dict], mode: str) -> tuple[list[dict], list[dict]]:
    """`(runnable, skipped)` entries of `mode`; each skipped one as `{"model_type", "name", "reason"}`.

    Text modes skip vision-only entries; the `images` mode runs the entries that declare an `image` level. The
    baselines of the other modality are left out silently."""
    runnable, skipped = [], []
    for entry in entries:
        reason = None
        if mode in TEXT_MODES and entry.get("modality", "text") != "text":
            reason = f"{entry.get('modality')}-only architecture: no text input for the `{mode}` mode"
        elif mode == "images" and "image" not in entry:
            reason = "no `image` level declared (text only)"
        elif mode in entry.get("skip_modes", {}):
            reason = entry["skip_modes"][mode]
        if reason is None:
            runnable.append(entry)
        elif not entry.get("baseline") or mode in entry.get("skip_modes", {}):
            # a baseline of the other modality is simply not part of the mode; a peer that cannot run one says why
            skipped.append({"model_type": entry["model_type"], "name": entry["name"], "reason": reason})
    return runnable, skipped


def level_config(
    entry: dict, level: str, sizes: dict, length: int | None = None, sizes_level: str | None = None, **overrides
) -> dict:
    """The config kwargs of `entry` at `level` (templates evaluated over `sizes[sizes_level or level]`), with the
    length key set to `length`."""
    level_sizes = sizes[sizes_level or level]
    config = {}
    config.update(evaluate_templates(entry.get("variant", {}), level_sizes))
    config.update(evaluate_templates(entry[level], level_sizes))
    if "vocab_size" in level_sizes and entry["model_type"] != "gpt2":
        config.setdefault("vocab_size", level_sizes["vocab_size"])
    if entry["model_type"] == "gpt2":
        config["vocab_size"] = level_sizes["vocab_size"]
    if length is not None and entry.get("length_key"):
        config[entry["length_key"]] = max(int(length), int(config.get(entry["length_key"], 0) or 0))
    config.update(overrides)
    return config


def build_model(entry: dict, config_kwargs: dict, head: str):
    """Instantiate `head` (an Auto class name, e.g. "AutoModelForCausalLM") for `entry` from `config_kwargs`."""
    import transformers

    import hf_efficient  # noqa: F401  (registers the architectures)

    config = transformers.AutoConfig.for_model(entry["model_type"], **config_kwargs)
    kwargs = {}
    if entry.get("attn_implementation"):
        kwargs["attn_implementation"] = entry["attn_implementation"]
    model = getattr(transformers, head).from_config(config, **kwargs)
    return model


def model_head(entry: dict, level: str) -> str:
    """Auto class used at `level`: the base model for a block, the causal head (or a fallback) otherwise."""
    if level == "block":
        return "AutoModel"
    return entry.get("causal_head") or entry.get("fallback_head") or "AutoModelForMaskedLM"


def get_submodule(model, path: str | None):
    """`path` (dotted, relative to the base model) inside `model` or its `base_model`, or None if absent."""
    if not path:
        return None
    for root in (getattr(model, "base_model", None), model):
        if root is None:
            continue
        try:
            return root.get_submodule(path)
        except AttributeError:
            continue
    return None


def count_parameters(model, exclude_embeddings: bool = False) -> int:
    seen, total = set(), 0
    skip = set()
    if exclude_embeddings:
        for module in model.modules():
            if type(module).__name__ == "Embedding":
                skip.update(id(p) for p in module.parameters())
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


# ---------------------------------------------------------------------------------------------------------- dropout
def is_dropout_field(name: str) -> bool:
    """A config field that sets a dropout / stochastic-depth rate (`*dropout*`, `*drop_path*`, GPT-2's `*_pdrop`)."""
    return ("dropout" in name or "drop_path" in name or name.endswith("pdrop")) and name not in HEAD_ONLY_DROPOUT


def dropout_of(config) -> dict:
    """`{field: rate}` of every dropout field of a config (object or kwargs dict), at the top level."""
    items = config.items() if isinstance(config, dict) else config.to_dict().items()
    return {
        k: float(v)
        for k, v in sorted(items)
        if is_dropout_field(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def config_dropout(entry: dict, sizes: dict, level: str = "model") -> dict:
    """The dropout fields of `entry`'s config at `level`: its config class's defaults under the entry's overrides."""
    import transformers

    import hf_efficient  # noqa: F401  (registers the architectures)

    kwargs = level_config(entry, level, sizes)
    return dropout_of(transformers.AutoConfig.for_model(entry["model_type"], **kwargs))


def with_dropout_zero(entries: list[dict], sizes: dict, level: str = "model") -> list[dict]:
    """`entries`, each followed by its dropout-0 twin where its config (the class's defaults under its overrides) has a
    nonzero dropout field: same entry, name `<name>-dropout0`, those fields set to 0 in `variant`. Every returned entry
    carries `dropout` (its nonzero rates, {} for none); a twin also `dropout_zero_of` (its entry's name) and
    `dropout_zeroed` (the fields it sets to 0)."""
    out = []
    for entry in entries:
        if entry.get("modality", "text") != "text" or level not in entry:
            out.append(entry)
            continue
        nonzero = {k: v for k, v in config_dropout(entry, sizes, level).items() if v}
        out.append({**entry, "dropout": nonzero})
        if nonzero:
            out.append(
                {
                    **copy.deepcopy(entry),
                    "name": entry["name"] + DROPOUT_ZERO_SUFFIX,
                    "label": f"{entry['label']}, dropout 0",
                    "variant": {**entry.get("variant", {}), **{k: 0.0 for k in nonzero}},
                    "dropout": {},
                    "dropout_zero_of": entry["name"],
                    "dropout_zeroed": sorted(nonzero),
                }
            )
    return out


def with_generation_variants(entries: list[dict]) -> list[dict]:
    """`entries`, each followed by its `generation_variants` (the same model, other `generate()` arguments: Llama with a
    static cache), each named `<name><suffix>` and carrying `generate` (the extra `generate()` keyword arguments)."""
    out = []
    for entry in entries:
        out.append({**entry, "generate": {}})
        for variant in entry.get("generation_variants", []):
            out.append(
                {
                    **copy.deepcopy(entry),
                    "name": entry["name"] + variant["suffix"],
                    "label": variant["label"],
                    "generate": dict(variant["generate"]),
                    "generation_variant_of": entry["name"],
                }
            )
    return out
