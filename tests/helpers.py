"""What several test files share: the tiny configurations the architectures are tested at (and a tiny causal gMLP),
exact-length greedy decoding, the half-precision check, one training step's loss and gradients and their comparison,
a Trainer callback that interrupts training, recorders of the largest tensor an op returns and of the tensors
autograd saves for the backward, and loading a script of `scripts/` by its path."""

import contextlib
import importlib.util
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoConfig, TrainerCallback

import hf_efficient  # noqa: F401 (registers the model types with AutoConfig)

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------- configurations
# The sizes the text architectures are tested at, and smaller ones (on top of them) for compile / export.
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1)
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_dropout": 0.0, "embedding_dropout": 0.0}  # R-Transformer's

# Each architecture's tester configuration (tests/test_modeling_<model type>.py); other tests change parts of it.
TINY = {
    # a larger spatial init than the paper's 1e-6, so that tests see real token mixing
    "gmlp": dict(SIZES, max_position_embeddings=16, num_labels=3, sgu_init_std=0.1),
    # a larger position-bias init than the paper's 1e-2, so that tests see the bias at work
    "aft": dict(SIZES, max_position_embeddings=16, num_labels=3, num_heads=4, conv_kernel_size=3, local_window=3)
    | dict(position_bias_dim=8, position_bias_init_std=0.5),
    "combiner": dict(SIZES, intermediate_size=64, num_attention_heads=2, combiner_type="fixed", block_size=4)
    | dict(max_position_embeddings=48, num_labels=3),
    "r_transformer": dict(SIZES, num_attention_heads=2, local_window=3, num_rnn_layers=1, num_labels=3, **NO_DROPOUT),
    # small attention blocks: the blocked path runs at test lengths
    "ngram_transformer": dict(SIZES, intermediate_size=64, num_encoder_layers=2, num_attention_heads=2, ngram_size=3)
    | dict(attention_block_size=4, hidden_dropout_prob=0.0, is_encoder_decoder=False),
    # vision only, sizes all multiples of 8 so that grouped_mm also runs in bfloat16: 8x8 images, 2x2 patches -> S = 16
    # patches, C = 16 channels; sparse blocks re-represent to S' = 32, C' = 8.
    "sparse_mlp": dict(image_size=8, patch_size=2, num_channels=3, hidden_size=16, token_mixing_dim=16)
    | dict(channel_mixing_dim=32, num_hidden_layers=3, num_sparse_layers=2, num_token_experts=4)
    | dict(num_channel_experts=4, num_labels=3, initializer_range=0.2),
}


def sized_config(model_type: str, *updates: dict, **overrides):
    """The architecture's defaults at the test `SIZES`, then `updates` and `overrides` (later ones win)."""
    return AutoConfig.for_model(model_type, **_merged(SIZES, *updates, overrides))


def tiny_config(model_type: str, *updates: dict, **overrides):
    """The architecture's tester configuration (`TINY`), then `updates` and `overrides` (later ones win)."""
    return AutoConfig.for_model(model_type, **_merged(TINY[model_type], *updates, overrides))


def _merged(*dicts: dict) -> dict:
    return {key: value for d in dicts for key, value in d.items()}


def causal_gmlp(seed: int = 0, layers: int = 2, **overrides):
    """A seeded tiny causal gMLP language model in eval mode (`tiny_attn_size=8` in `overrides`: aMLP)."""
    from hf_efficient.models.gmlp import GMLPForCausalLM

    settings = dict(intermediate_size=64, num_hidden_layers=layers, max_position_embeddings=48, sgu_init_std=0.1)
    torch.manual_seed(seed)
    return GMLPForCausalLM(sized_config("gmlp", settings, causal=True, **overrides)).eval()


# ---------------------------------------------------------------------- outputs
def generate_exactly(model, ids, mask, new: int, **kwargs):
    """Greedy decoding of exactly `new` tokens after `ids` (`mask`: their attention mask); `kwargs` go to
    `generate` (e.g. `output_logits=True, return_dict_in_generate=True`)."""
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new, **kwargs)


def assert_half_precision_close(model, ids, dtype, atol: float, rtol: float = 0.05):
    """The language model cast to `dtype` gives finite logits on `ids`, close to its float32 logits."""
    with torch.no_grad():
        reference = model(ids).logits
        half = model.to(dtype)(ids).logits
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------- training
def loss_and_grads(model, step, seed: int | None = None):
    """One training step: `step()`'s loss and the gradient of every parameter it reaches (from fresh gradients;
    `seed`: torch's seed just before the step)."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss = step()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(got, want, atol: float = 1e-5):
    """Two `loss_and_grads` results agree: the losses (rtol 1e-5) and the same gradients (rtol 1e-4)."""
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=atol)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=atol, msg=name)


class InterruptAt(TrainerCallback):
    """Ctrl-C after a given step (the checkpoints of earlier steps are on disk)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


# ---------------------------------------------------------------------- memory
class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements (`numel`) of any tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@contextlib.contextmanager
def saved_for_backward():
    """A list that collects every tensor the autograd graph saves for the backward inside the block."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda t: t):
        yield saved


# ---------------------------------------------------------------------- scripts
def load_script(path: str):
    """The module of a script under the repository (`scripts/` is not a package), by its relative path."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
