"""The official-checkpoint converter against a functional re-implementation of the official R-Transformer forward
(DSE-MSU/R-transformer, `models/RTransformer.py` and the char / word / image `model.py`), written here from its
semantics: windows gathered from the zero-left-padded sequence and run through `nn.GRU`/`nn.LSTM`/`nn.RNN`, the
official LayerNorm (unbiased std, eps on the std), a fixed 3000 x 3000 causal mask filled with -1e9."""

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

from tests.helpers import load_script

convert_rt = load_script("scripts/converters/convert_official_rtransformer.py")

GATES = {"gru": 3, "lstm": 4, "rnn": 1}
RNNS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


def official_state_dict(task, d, levels, n, rnn_type, vocab=50, classes=10, channels=1, tied=True, seed=0):
    """Random weights under the official module names (unused modules included, as in a real checkpoint)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    state = {}
    for i in range(levels):
        p = f"rt.forward_net.{i}."
        for j in range(n):
            q = f"{p}layers.{j}."
            state[q + "local_rnn.rnn.weight_ih_l0"] = rand(GATES[rnn_type] * d, d)
            state[q + "local_rnn.rnn.weight_hh_l0"] = rand(GATES[rnn_type] * d, d)
            state[q + "local_rnn.rnn.bias_ih_l0"] = rand(GATES[rnn_type] * d)
            state[q + "local_rnn.rnn.bias_hh_l0"] = rand(GATES[rnn_type] * d)
            state[q + "local_rnn.output.0.weight"] = rand(d, d)  # defined, never used
            state[q + "local_rnn.output.0.bias"] = rand(d)
            state[q + "connection.norm.a_2"] = rand(d, scale=0.2, offset=1.0)
            state[q + "connection.norm.b_2"] = rand(d, scale=0.2)
        for k in range(2):
            state[f"{p}connections.{k}.norm.a_2"] = rand(d, scale=0.2, offset=1.0)
            state[f"{p}connections.{k}.norm.b_2"] = rand(d, scale=0.2)
        for k in range(4):
            state[f"{p}pooling.linears.{k}.weight"] = rand(d, d, scale=d**-0.5)
            state[f"{p}pooling.linears.{k}.bias"] = rand(d, scale=0.1)
        state[p + "feed_forward.w_1.weight"] = rand(4 * d, d, scale=d**-0.5)
        state[p + "feed_forward.w_1.bias"] = rand(4 * d, scale=0.1)
        state[p + "feed_forward.w_2.weight"] = rand(d, 4 * d, scale=(4 * d) ** -0.5)
        state[p + "feed_forward.w_2.bias"] = rand(d, scale=0.1)
    state["rt.norm.a_2"], state["rt.norm.b_2"] = rand(d, offset=1.0), rand(d)  # defined, never used
    state["rt.feed_forward.w_1.weight"], state["rt.feed_forward.w_1.bias"] = rand(4 * d, d), rand(4 * d)
    state["rt.feed_forward.w_2.weight"], state["rt.feed_forward.w_2.bias"] = rand(d, 4 * d), rand(d)
    if task == "image":
        state["encoder.weight"], state["encoder.bias"] = rand(d, channels), rand(d)
        state["linear.weight"], state["linear.bias"] = rand(classes, d, scale=d**-0.5), rand(classes)
    else:
        state["encoder.weight"] = rand(vocab, d)
        state["decoder.weight"] = state["encoder.weight"] if tied else rand(vocab, d)
        state["decoder.bias"] = rand(vocab, scale=0.1)
    return state


# ---------------------------------------------------------------------- the official forward, functionally
def official_norm(x, state, prefix, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)  # unbiased
    return state[prefix + "a_2"] * (x - mean) / (std + eps) + state[prefix + "b_2"]


def official_local_rnn(x, state, prefix, rnn_type, ksize):
    """The official `get_K`: zero rows before the sequence, windows gathered by index, the RNN over (B L, M, d)."""
    batch, length, d = x.shape
    padded = torch.cat([torch.zeros(batch, ksize - 1, d), x], dim=1)
    index = torch.tensor([i for j in range(ksize - 1, ksize - 1 + length) for i in range(j - (ksize - 1), j + 1)])
    windows = torch.index_select(padded, 1, index).reshape(batch * length, ksize, d)
    rnn = RNNS[rnn_type](d, d, batch_first=True)
    rnn.load_state_dict({k: state[prefix + k] for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")})
    return rnn(windows)[0][:, -1, :].reshape(batch, length, d)


def official_attention(x, state, prefix, h):
    batch, length, d = x.shape
    d_k = d // h

    def linear(k, t):
        return t @ state[f"{prefix}linears.{k}.weight"].T + state[f"{prefix}linears.{k}.bias"]

    q, k, v = (linear(i, x).view(batch, -1, h, d_k).transpose(1, 2) for i in range(3))
    subsequent = torch.triu(torch.ones(1, 3000, 3000), diagonal=1)
    mask = (subsequent == 0).unsqueeze(1)[:, :, :length, :length]
    scores = (q @ k.transpose(-2, -1) / math.sqrt(d_k)).masked_fill(mask == 0, -1e9)
    out = torch.softmax(scores, dim=-1) @ v
    return linear(3, out.transpose(1, 2).contiguous().view(batch, -1, d))


def official_rtransformer(x, state, h, rnn_type, ksize, levels, n):
    for i in range(levels):
        p = f"rt.forward_net.{i}."
        for j in range(n):
            q = f"{p}layers.{j}."
            x = x + official_local_rnn(
                official_norm(x, state, q + "connection.norm."), state, q + "local_rnn.rnn.", rnn_type, ksize
            )
        x = x + official_attention(official_norm(x, state, p + "connections.0.norm."), state, p + "pooling.", h)
        y = official_norm(x, state, p + "connections.1.norm.")
        y = torch.relu(y @ state[p + "feed_forward.w_1.weight"].T + state[p + "feed_forward.w_1.bias"])
        x = x + y @ state[p + "feed_forward.w_2.weight"].T + state[p + "feed_forward.w_2.bias"]
    return x  # rt.norm and rt.feed_forward are never applied


def official_lm(ids, state, **kw):
    y = official_rtransformer(state["encoder.weight"][ids], state, **kw)
    return y @ state["decoder.weight"].T + state["decoder.bias"]


def official_image(pixels_ncl, state, **kw):
    """`RT.forward` of the image experiment: input (N, C, L), encoder per step, last position, log_softmax."""
    x = pixels_ncl.transpose(-2, -1) @ state["encoder.weight"].T + state["encoder.bias"]
    y = official_rtransformer(x, state, **kw)
    return torch.log_softmax(y[:, -1] @ state["linear.weight"].T + state["linear.bias"], dim=1)


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize(
    "task,rnn_type,d,h,ksize,levels,n,tied",
    [
        ("char", "gru", 32, 8, 7, 3, 1, True),
        ("word", "lstm", 24, 8, 9, 3, 1, True),
        ("word", "lstm", 24, 4, 4, 2, 1, False),
        ("char", "rnn", 16, 2, 3, 2, 2, True),
    ],
)
def test_language_model_matches_official_forward(task, rnn_type, d, h, ksize, levels, n, tied):
    state = official_state_dict(task, d, levels, n, rnn_type, tied=tied)
    model, dropped = convert_rt.convert(state, task, heads=h, window=ksize)
    assert model.config.rnn_type == rnn_type and model.config.num_rnn_layers == n
    assert model.config.tie_word_embeddings == tied
    assert len(dropped) == 2 * levels * n + 6  # LocalRNN outputs, rt.norm, rt.feed_forward
    ids = torch.randint(0, 50, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids, use_cache=False).logits
        official = official_lm(ids, state, h=h, rnn_type=rnn_type, ksize=ksize, levels=levels, n=n)
    error = (ours - official).abs().max().item()
    print(f"official parity {task}/{rnn_type}: max abs error {error:.2e}")
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-5)


def test_pixel_mnist_matches_official_forward():
    state = official_state_dict("image", 32, 3, 2, "gru", classes=10, channels=1)
    model, _ = convert_rt.convert(state, "image", heads=2, window=7, image_size=6)
    assert type(model).__name__ == "RTransformerForImageClassification" and model.config.num_labels == 10
    pixels = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = torch.log_softmax(model(pixel_values=pixels).logits, dim=-1)
        # the official experiment feeds data.view(-1, 1, 784): the row-major pixel sequence
        official = official_image(pixels.view(2, 1, 36), state, h=2, rnn_type="gru", ksize=7, levels=3, n=2)
    error = (ours - official).abs().max().item()
    print(f"official parity image/gru: max abs error {error:.2e}")
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-5)


def test_command_writes_a_folder_that_loads_with_auto_classes(tmp_path, capsys):
    state = official_state_dict("char", 16, 2, 1, "gru")
    torch.save(state, tmp_path / "official.pt")
    assert (
        convert_rt.main(
            ["--checkpoint", str(tmp_path / "official.pt"), "--task", "char", "--heads", "2"]
            + ["--window", "3", "--output-dir", str(tmp_path / "out")]
        )
        == 0
    )
    assert "Dropped 10 weights" in capsys.readouterr().out
    assert (tmp_path / "out" / "modeling_r_transformer.py").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        official = official_lm(ids, state, h=2, rnn_type="gru", ksize=3, levels=2, n=1)
        torch.testing.assert_close(model(ids).logits, official, rtol=0, atol=1e-5)

    image = official_state_dict("image", 16, 1, 1, "lstm", channels=3)
    torch.save(image, tmp_path / "image.pt")
    argv = ["--checkpoint", str(tmp_path / "image.pt"), "--task", "image", "--output-dir", str(tmp_path / "img")]
    assert convert_rt.main(argv) == 1  # no --image-size
    assert "--image-size" in capsys.readouterr().err
    assert convert_rt.main([*argv, "--image-size", "4"]) == 0
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "img")
    assert loaded.config.num_channels == 3 and loaded.config.rnn_type == "lstm"


def test_unexpected_key_is_an_error():
    state = official_state_dict("char", 16, 1, 1, "gru")
    state["rt.forward_net.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra"):
        convert_rt.convert(state, "char", heads=2, window=3)
    del state["rt.forward_net.0.extra.weight"]
    del state["rt.forward_net.0.feed_forward.w_2.bias"]
    with pytest.raises(ValueError, match="missing"):
        convert_rt.convert(state, "char", heads=2, window=3)
