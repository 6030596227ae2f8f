"""The generic model tester every hf-efficient architecture runs, for every head class, on tiny configs.

An architecture's test file subclasses `GenericModelTests` and sets:

    model_type = "gmlp"
    all_heads = [GMLPModel, GMLPForCausalLM, ...]      # every head class (base model included)
    variants = {"gmlp": {}, "amlp": {"tiny_attn_size": 8}}   # config overrides, each tested separately
    max_seq_length = 16                                 # longest supported input (None: unlimited)
    invalid_configs = [({"hidden_size": -1}, "hidden_size"), ...]   # kwargs -> text the ValueError must name
    def get_config(self, variant, head) -> PreTrainedConfig   # tiny config for that head

    vision_only = True          # optional: no `input_ids`, every head (the base model too) takes `pixel_values`

Architectures with more properties also inherit the matching mixins below (no skipped tests for the others):
`AttentionTests` (softmax attention: `output_attentions`, eager vs SDPA agreement), `WindowedAttentionTests`
(defines `attention_window(variant, config)`: k layers of window N have receptive field k(N-1), checked on both
sides of the boundary) and `MixtureOfExpertsTests` (`aux_loss` in the loss, `router_logits`).

`conftest.py` parametrises the fixtures `variant`, `head` (every head), `loss_head` (heads with a loss: all but the
base model), `text_head`, `vision_head`, `lm_head` (causal and masked LM) and `causal_head` over those lists.
"""

import inspect
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    GenerationConfig,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_efficient
from hf_efficient import hub
from hf_efficient.models.shared.heads import sequence_length_limit
from tests.helpers import generate_exactly

AUTO_CLASS_BY_SUFFIX = {
    "ForCausalLM": AutoModelForCausalLM,
    "ForMaskedLM": AutoModelForMaskedLM,
    "ForSequenceClassification": AutoModelForSequenceClassification,
    "ForTokenClassification": AutoModelForTokenClassification,
    "ForImageClassification": AutoModelForImageClassification,
    "Model": AutoModel,
}

ATOL = 1e-5


def head_kind(head: type) -> str:
    """'ForCausalLM', 'ForMaskedLM', ..., or 'Model' for the base model."""
    for suffix in AUTO_CLASS_BY_SUFFIX:
        if suffix != "Model" and head.__name__.endswith(suffix):
            return suffix
    return "Model"


def main_output(outputs) -> torch.Tensor:
    """The tensor a head is judged by: logits, or the last hidden state of a base model."""
    return outputs.logits if hasattr(outputs, "logits") and outputs.logits is not None else outputs.last_hidden_state


def run_without_package(script: str, tmp_path, marker: str = "REMOTE-OK") -> None:
    """Run `script` in a fresh interpreter (offline, its own remote-code cache under `tmp_path`, no PYTHONPATH); the
    script blocks `import hf_efficient` itself and prints `marker` at its end, which is asserted here."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules_cache")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert marker in result.stdout, result.stderr[-3000:]


def free_port() -> int:
    """A free TCP port on localhost (for a launched process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_launch(tmp_path) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes 2` (DDP; gloo on CPU) with its config written under `tmp_path`:
    the command up to, not including, the script or `-m module` to run. (`--cpu --num_processes 2` would silently
    start one process.)"""
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 2\n"
        "machine_rank: 0\nmixed_precision: 'no'\ndynamo_config: {}\nuse_cpu: false\nmain_training_function: main\n"
    )
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return launch + ["--main_process_port", str(free_port())]


class GenericModelTests:
    model_type: str = None
    all_heads: list = []
    variants: dict = {"default": {}}
    max_seq_length: int | None = None
    invalid_configs: list = []
    seq_length: int = 12
    batch_size: int = 3
    vision_only: bool = False
    # Config values under which one training step does not depend on how its batch is split (no batch-level routing
    # statistics, expert capacity or random noise): the gradient-accumulation test sets them (dropout is zeroed too).
    batch_split_invariant_overrides: dict = {}

    # ----------------------------------------------------------------- hooks
    def not_applicable(self, test_name: str, params: dict) -> str | None:
        """Why the generic test `test_name` with these parameters does not apply to this architecture (conftest then
        deselects it at collection: never a skip), or None."""
        if test_name == "test_too_long_sequence_raises" and self.max_seq_length is None:
            return "no maximum length"
        if test_name == "test_generate_stops_at_the_length_limit":
            if sequence_length_limit(self.get_config(params["variant"], params["causal_head"])) is None:
                return "no length limit in this variant"
        if test_name == "test_receptive_field_of_windowed_attention":
            config = self.get_config(params["variant"], params["causal_head"])
            if self.attention_window(params["variant"], config) is None:
                return "this variant attends to the whole prefix (no window)"
        return None

    def get_config(self, variant: str, head: type):
        raise NotImplementedError("Each architecture's test class defines get_config(variant, head).")

    def is_causal(self, head: type, model=None) -> bool:
        if head_kind(head) == "ForCausalLM":
            return True
        inner = getattr(model, "model", model)
        return bool(getattr(inner, "causal", False))

    def is_vision(self, head: type) -> bool:
        return head_kind(head) == "ForImageClassification" or self.vision_only

    def make_model(self, variant: str, head: type, seed: int = 0, **overrides):
        config = self.get_config(variant, head)
        for key, value in overrides.items():
            setattr(config, key, value)
        set_seed(seed)
        return head(config).eval()

    def make_inputs(self, config, head: type, batch_size: int | None = None, seq_length: int | None = None, seed=1):
        batch_size = batch_size or self.batch_size
        seq_length = seq_length or self.seq_length
        generator = torch.Generator().manual_seed(seed)
        if self.is_vision(head):
            shape = (batch_size, config.num_channels, config.image_size, config.image_size)
            return {"pixel_values": torch.randn(shape, generator=generator)}
        # Avoid the pad/eos/special ids so that generation and padding tests are about the model only.
        low = 3
        return {"input_ids": torch.randint(low, config.vocab_size, (batch_size, seq_length), generator=generator)}

    def make_labels(self, config, head: type, inputs: dict, seed=2):
        generator = torch.Generator().manual_seed(seed)
        kind = head_kind(head)
        batch_size = next(iter(inputs.values())).shape[0]
        if kind in ("ForCausalLM", "ForMaskedLM"):
            return inputs["input_ids"].clone()
        if kind in ("ForSequenceClassification", "ForImageClassification"):
            return torch.randint(0, config.num_labels, (batch_size,), generator=generator)
        if kind == "ForTokenClassification":
            return torch.randint(0, config.num_labels, inputs["input_ids"].shape, generator=generator)
        return None

    def forward(self, model, inputs, **kwargs):
        with torch.no_grad():
            return main_output(model(**inputs, **kwargs))

    # ----------------------------------------------------------------- config and Auto classes
    def test_config_roundtrip(self, variant, tmp_path):
        config = self.get_config(variant, self.all_heads[0])
        assert isinstance(AutoConfig.for_model(self.model_type), hf_efficient.get_config_class(self.model_type))
        config.save_pretrained(tmp_path)
        loaded = AutoConfig.from_pretrained(tmp_path)
        assert type(loaded) is type(config)
        expected, got = config.to_dict(), loaded.to_dict()
        for d in (expected, got):
            d.pop("_name_or_path", None)  # records where it was loaded from
        assert got == expected

    def test_registration_is_idempotent(self):
        hf_efficient.register()
        hf_efficient.register()
        assert type(AutoConfig.for_model(self.model_type)).model_type == self.model_type

    def test_auto_class_loads_right_class(self, variant, head, tmp_path):
        model = self.make_model(variant, head)
        model.save_pretrained(tmp_path)
        auto = AUTO_CLASS_BY_SUFFIX[head_kind(head)]
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is head
        assert type(auto.from_config(model.config)) is head

    def test_head_from_base_and_base_from_head(self, variant, loss_head, tmp_path):
        head = loss_head
        base_class = self.all_heads[0]
        assert head_kind(base_class) == "Model", "all_heads[0] must be the base model"
        config = self.get_config(variant, head)
        set_seed(0)
        base = base_class(config).eval()
        base.save_pretrained(tmp_path / "base")
        from_base = head.from_pretrained(tmp_path / "base").eval()
        for name, param in base.state_dict().items():
            assert torch.equal(from_base.model.state_dict()[name], param), name

        model = self.make_model(variant, head, seed=3)
        model.save_pretrained(tmp_path / "head")
        base_from_head = base_class.from_pretrained(tmp_path / "head").eval()
        for name, param in base_from_head.state_dict().items():
            assert torch.equal(model.model.state_dict()[name], param), name

    # ----------------------------------------------------------------- save / load
    def test_save_load_roundtrip_safetensors(self, variant, head, tmp_path):
        model = self.make_model(variant, head)
        inputs = self.make_inputs(model.config, head)
        expected = self.forward(model, inputs)
        model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
        assert not (tmp_path / "pytorch_model.bin").exists()
        loaded = head.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(self.forward(loaded, inputs), expected, rtol=0, atol=0)
        is_generative = head_kind(head) == "ForCausalLM"
        assert (tmp_path / "generation_config.json").is_file() == is_generative
        if is_generative:
            GenerationConfig.from_pretrained(tmp_path)

    def test_remote_code_without_package(self, variant, tmp_path):
        """Save every head with its code, then load each in a fresh interpreter where hf_efficient can't import."""
        expected = {}
        heads = {}
        for head in self.all_heads:
            model = self.make_model(variant, head)
            inputs = self.make_inputs(model.config, head)
            folder = tmp_path / head.__name__
            hf_efficient.save_pretrained_with_code(model, folder)
            # the folder carries exactly the flat bundle of the package's current source (no stale or extra code)
            carried = {path.name: path.read_text() for path in folder.glob("*.py")}
            assert carried == hub.bundle_files(hub.architecture_folder(model))
            config = json.loads((folder / "config.json").read_text())
            auto_map = config["auto_map"]
            assert "AutoConfig" in auto_map and "AutoModel" in auto_map
            for other in self.all_heads:
                assert AUTO_CLASS_BY_SUFFIX[head_kind(other)].__name__ in auto_map, other
            torch.save(inputs, folder / "inputs.pt")
            expected[head.__name__] = self.forward(model, inputs)
            heads[head.__name__] = AUTO_CLASS_BY_SUFFIX[head_kind(head)].__name__

        script = textwrap.dedent(
            f"""
            import sys
            sys.modules["hf_efficient"] = None  # any `import hf_efficient` now fails
            import torch, transformers
            heads = {heads!r}
            for name, auto_name in heads.items():
                folder = {str(tmp_path)!r} + "/" + name
                model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
                assert type(model).__name__ == name, (type(model), name)
                assert not type(model).__module__.startswith("hf_efficient"), type(model).__module__
                inputs = torch.load(folder + "/inputs.pt")
                with torch.no_grad():
                    out = model(**inputs)
                out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
                torch.save(out, folder + "/remote_out.pt")
            print("REMOTE-OK")
            """
        )
        run_without_package(script, tmp_path)
        for name, value in expected.items():
            remote = torch.load(tmp_path / name / "remote_out.pt")
            torch.testing.assert_close(remote, value, rtol=0, atol=0)

    # ----------------------------------------------------------------- training
    def test_loss_is_scalar_and_backward_reaches_every_parameter(self, variant, loss_head):
        head = loss_head
        model = self.make_model(variant, head).train()
        inputs = self.make_inputs(model.config, head)
        outputs = model(**inputs, labels=self.make_labels(model.config, head, inputs))
        assert outputs.loss.ndim == 0 and torch.isfinite(outputs.loss)
        outputs.loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"no gradient reached: {missing}"
        nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not nonfinite, nonfinite

    def test_trainer_lowers_loss(self, variant, loss_head, tmp_path):
        head = loss_head
        model = self.make_model(variant, head)
        rows = []
        for seed in range(4):
            inputs = self.make_inputs(model.config, head, batch_size=2, seed=10 + seed)
            labels = self.make_labels(model.config, head, inputs, seed=20 + seed)
            for i in range(2):
                row = {k: v[i].tolist() for k, v in inputs.items()}
                row["labels"] = labels[i].tolist()
                rows.append(row)
        dataset = Dataset.from_list(rows).with_format("torch")

        def mean_loss():
            model.eval()
            with torch.no_grad():
                batch = dataset[:]
                return float(model(**batch).loss)

        before = mean_loss()
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=25,
            per_device_train_batch_size=4,
            learning_rate=3e-3,
            warmup_steps=0,
            report_to=[],
            save_strategy="no",
            logging_steps=5,
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=dataset).train()
        after = mean_loss()
        assert after < 0.9 * before, (before, after)

    def _batch_split_invariant_config(self, variant, head):
        config = self.get_config(variant, head)
        for key, value in config.to_dict().items():
            if ("dropout" in key or "drop_path" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
        for key, value in self.batch_split_invariant_overrides.items():
            setattr(config, key, value)
        return config

    def _one_trainer_step(self, config, head, dataset, output_dir, batch_size, accumulation):
        """One SGD step (lr 1, no clipping, no decay) of `Trainer`: its logged loss and the parameter change, which is
        minus the gradient it applied."""
        set_seed(0)
        model = head(config)
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        args = TrainingArguments(
            output_dir=str(output_dir),
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
            warmup_steps=0,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        loss = Trainer(model=model, args=args, train_dataset=dataset).train().training_loss
        return loss, {name: before[name] - param.detach() for name, param in model.named_parameters()}

    def test_trainer_gradient_accumulation_equals_one_batch(self, variant, loss_head, tmp_path):
        """`Trainer` on 4 samples, as one batch of 4 or as 4 accumulated batches of 1: the same logged loss and the
        same gradient. (A loss that claims to normalise by `num_items_in_batch` but does not is multiplied by the
        accumulation steps: Trainer then stops dividing by them.)"""
        head = loss_head
        config = self._batch_split_invariant_config(variant, head)
        inputs = self.make_inputs(config, head, batch_size=4, seed=10)
        labels = self.make_labels(config, head, inputs, seed=20)
        rows = [{**{k: v[i].tolist() for k, v in inputs.items()}, "labels": labels[i].tolist()} for i in range(4)]
        dataset = Dataset.from_list(rows).with_format("torch")
        one_loss, one_grads = self._one_trainer_step(config, head, dataset, tmp_path / "one", 4, 1)
        acc_loss, acc_grads = self._one_trainer_step(config, head, dataset, tmp_path / "acc", 1, 4)
        assert acc_loss == pytest.approx(one_loss, rel=1e-5, abs=1e-6)
        moved = [name for name, grad in one_grads.items() if grad.abs().max() > 0]
        assert moved, "the step changed no parameter"
        for name, grad in one_grads.items():
            torch.testing.assert_close(acc_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    @pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
    def test_gradient_checkpointing_same_gradients(self, variant, loss_head, use_reentrant):
        """Both checkpointing modes give the gradients of no checkpointing (reentrant checkpointing fails on tensors
        passed to a checkpointed layer by keyword: they get no gradient, or are backpropagated twice)."""
        head = loss_head
        grads = []
        for checkpointing in (False, True):
            model = self.make_model(variant, head).train()
            model.config.hidden_dropout_prob = 0.0
            if checkpointing:
                if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
                    kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": use_reentrant}}
                    model.activation_checkpointing_enable(**kwargs)
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
                assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
            inputs = self.make_inputs(model.config, head)
            torch.manual_seed(0)
            model(**inputs, labels=self.make_labels(model.config, head, inputs)).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)

    # ----------------------------------------------------------------- causality, batching, padding
    def test_causality(self, variant, text_head):
        head = text_head
        model = self.make_model(variant, head)
        if not self.is_causal(head, model) or head_kind(head) == "ForSequenceClassification":
            # Bidirectional heads: the opposite property, future tokens change earlier outputs, is checked instead.
            inputs = self.make_inputs(model.config, head)
            changed = inputs["input_ids"].clone()
            changed[:, -1] = (changed[:, -1] + 1 - 3) % (model.config.vocab_size - 3) + 3
            out, full = self.forward(model, {"input_ids": changed}), self.forward(model, inputs)
            first = out[:, 0] if out.ndim > 2 else out
            assert not torch.allclose(first, full[:, 0] if full.ndim > 2 else full), (
                "bidirectional: the future must matter"
            )
            return
        inputs = self.make_inputs(model.config, head)
        full = self.forward(model, inputs)
        for t in (0, self.seq_length // 2, self.seq_length - 2):
            changed = inputs["input_ids"].clone()
            changed[:, t + 1 :] = torch.randint(3, model.config.vocab_size, changed[:, t + 1 :].shape)
            out = self.forward(model, {"input_ids": changed})
            torch.testing.assert_close(out[:, : t + 1], full[:, : t + 1], rtol=0, atol=ATOL)
            assert not torch.allclose(out[:, t + 1 :], full[:, t + 1 :]), "later tokens must matter"

    def test_sample_in_batch_equals_alone(self, variant, head):
        model = self.make_model(variant, head)
        inputs = self.make_inputs(model.config, head)
        batched = self.forward(model, inputs)
        for i in range(self.batch_size):
            alone = self.forward(model, {k: v[i : i + 1] for k, v in inputs.items()})
            torch.testing.assert_close(alone[0], batched[i], rtol=0, atol=ATOL)

    def _padded(self, ids: torch.Tensor, total: int, left: bool, filler: torch.Tensor):
        """Pad a (L,) sequence to `total` with `filler` tokens on one side; returns ids and mask rows."""
        pad = filler[: total - len(ids)]
        mask = torch.cat([torch.ones(len(ids), dtype=torch.long), torch.zeros(len(pad), dtype=torch.long)])
        if left:
            return torch.cat([pad, ids]), mask.flip(0)
        return torch.cat([ids, pad]), mask

    def test_right_padding_leaves_real_positions_unchanged(self, variant, text_head):
        head = text_head
        model = self.make_model(variant, head)
        inputs = self.make_inputs(model.config, head, batch_size=2)
        ids = inputs["input_ids"]
        lengths = [self.seq_length - 4, self.seq_length - 1]
        kind = head_kind(head)
        for junk_seed in (5, 6):
            filler = torch.randint(
                3, model.config.vocab_size, (self.seq_length,), generator=torch.Generator().manual_seed(junk_seed)
            )
            rows = [self._padded(ids[i, : lengths[i]], self.seq_length, left=False, filler=filler) for i in range(2)]
            batch = {
                "input_ids": torch.stack([r[0] for r in rows]),
                "attention_mask": torch.stack([r[1] for r in rows]),
            }
            out = self.forward(model, batch)
            for i in range(2):
                alone = self.forward(model, {"input_ids": ids[i : i + 1, : lengths[i]]})[0]
                got = out[i] if kind == "ForSequenceClassification" else out[i, : lengths[i]]
                # Two different fillers (seeds 5 and 6) both match the unpadded sample: pad content is irrelevant.
                torch.testing.assert_close(got, alone, rtol=0, atol=ATOL)

    def test_left_padding_leaves_real_positions_unchanged(self, variant, causal_head):
        head = causal_head
        model = self.make_model(variant, head)
        inputs = self.make_inputs(model.config, head, batch_size=2)
        ids = inputs["input_ids"]
        lengths = [self.seq_length - 5, self.seq_length]
        filler = torch.full((self.seq_length,), model.config.pad_token_id)
        rows = [self._padded(ids[i, : lengths[i]], self.seq_length, left=True, filler=filler) for i in range(2)]
        batch = {"input_ids": torch.stack([r[0] for r in rows]), "attention_mask": torch.stack([r[1] for r in rows])}
        out = self.forward(model, batch)
        for i in range(2):
            alone = self.forward(model, {"input_ids": ids[i : i + 1, : lengths[i]]})[0]
            torch.testing.assert_close(out[i, self.seq_length - lengths[i] :], alone, rtol=0, atol=ATOL)

    # ----------------------------------------------------------------- generation
    def _prompt(self, model, batch_size=2, length=5, left_pad=0):
        ids = self.make_inputs(model.config, AutoModelForCausalLM, batch_size=batch_size, seq_length=length)[
            "input_ids"
        ]
        mask = torch.ones_like(ids)
        if left_pad:
            ids[0, :left_pad] = model.config.pad_token_id
            mask[0, :left_pad] = 0
        return ids, mask

    def _new_tokens(self, prompt_len):
        limit = self.max_seq_length or 10**9
        return min(6, limit - prompt_len)

    def test_generate_greedy_sampling_beam(self, variant, causal_head):
        model = self.make_model(variant, causal_head)
        model.generation_config.pad_token_id = model.config.pad_token_id
        ids, mask = self._prompt(model)
        new = self._new_tokens(ids.shape[1])
        common = {"max_new_tokens": new, "min_new_tokens": new, "attention_mask": mask}
        greedy = model.generate(ids, do_sample=False, **common)
        no_cache = model.generate(ids, do_sample=False, use_cache=False, **common)
        assert greedy.shape == (2, ids.shape[1] + new)
        assert torch.equal(greedy, no_cache), "greedy decoding with and without the cache must agree"
        samples = []
        for _ in range(2):
            set_seed(123)
            samples.append(model.generate(ids, do_sample=True, top_k=0, temperature=1.0, **common))
        assert torch.equal(samples[0], samples[1]), "seeded sampling must be reproducible"
        beams = model.generate(ids, do_sample=False, num_beams=3, num_return_sequences=2, **common)
        assert beams.shape == (4, ids.shape[1] + new)
        beams_no_cache = model.generate(
            ids, do_sample=False, num_beams=3, num_return_sequences=2, use_cache=False, **common
        )
        assert torch.equal(beams, beams_no_cache), "beam search must reorder the cache correctly"

    def test_generate_stops_at_the_length_limit(self, variant, causal_head):
        """A fixed-length model stops at its limit instead of failing partway; a full prompt is a clear error."""
        model = self.make_model(variant, causal_head)
        limit = sequence_length_limit(model.config)
        assert limit is not None  # variants without a limit are deselected (`not_applicable`)
        model.generation_config.pad_token_id = model.config.pad_token_id
        ids, mask = self._prompt(model, length=min(5, limit - 1))
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=limit + 10)
        assert out.shape[-1] == limit
        full = self.make_inputs(model.config, causal_head, batch_size=1, seq_length=limit)["input_ids"]
        with pytest.raises(ValueError, match=f"at most {limit}"):
            model.generate(full, max_new_tokens=2)

    def test_cached_logits_equal_full_forward(self, variant, causal_head):
        model = self.make_model(variant, causal_head)
        model.generation_config.pad_token_id = model.config.pad_token_id
        ids, mask = self._prompt(model, left_pad=2)
        new = self._new_tokens(ids.shape[1])
        out = generate_exactly(model, ids, mask, new, output_logits=True, return_dict_in_generate=True)
        sequences = out.sequences
        full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
        for step, step_logits in enumerate(out.logits):
            prefix = ids.shape[1] + step
            with torch.no_grad():
                reference = model(
                    input_ids=sequences[:, :prefix], attention_mask=full_mask[:, :prefix], use_cache=False
                ).logits[:, -1]
            torch.testing.assert_close(step_logits, reference, rtol=1e-4, atol=1e-4, msg=f"step {step}")

    def test_generation_continues_from_returned_cache(self, variant, causal_head):
        model = self.make_model(variant, causal_head)
        model.generation_config.pad_token_id = model.config.pad_token_id
        ids, mask = self._prompt(model)
        new = self._new_tokens(ids.shape[1])
        first_n = new // 2
        first = generate_exactly(model, ids, mask, first_n, return_dict_in_generate=True)
        cache = first.cache
        assert cache is not None and cache.get_seq_length() == ids.shape[1] + first_n - 1
        rest = new - first_n
        continued = generate_exactly(model, first.sequences, torch.ones_like(first.sequences), rest, cache=cache)
        once = generate_exactly(model, ids, mask, new)
        assert torch.equal(continued, once)

    # ----------------------------------------------------------------- API surface
    def test_output_hidden_states(self, variant, head):
        model = self.make_model(variant, head)
        inputs = self.make_inputs(model.config, head)
        with torch.no_grad():
            outputs = model(**inputs, output_hidden_states=True)
        assert len(outputs.hidden_states) == model.config.num_hidden_layers + 1
        for hidden in outputs.hidden_states:
            assert hidden.shape[-1] == model.config.hidden_size

    def test_return_dict_false_gives_tuple(self, variant, head):
        model = self.make_model(variant, head)
        inputs = self.make_inputs(model.config, head)
        with torch.no_grad():
            as_dict = model(**inputs, use_cache=False) if head_kind(head) == "ForCausalLM" else model(**inputs)
            as_tuple = (
                model(**inputs, use_cache=False, return_dict=False)
                if head_kind(head) == "ForCausalLM"
                else model(**inputs, return_dict=False)
            )
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], main_output(as_dict), rtol=0, atol=0)

    def test_inputs_embeds_equal_input_ids(self, variant, text_head):
        head = text_head
        model = self.make_model(variant, head)
        inputs = self.make_inputs(model.config, head)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        torch.testing.assert_close(
            self.forward(model, {"inputs_embeds": embeds}), self.forward(model, inputs), rtol=0, atol=0
        )

    def test_resize_token_embeddings(self, variant, text_head):
        head = text_head
        model = self.make_model(variant, head)
        old = model.config.vocab_size
        model.resize_token_embeddings(old + 7)
        assert model.config.vocab_size == old + 7
        assert model.get_input_embeddings().weight.shape[0] == old + 7
        inputs = {"input_ids": torch.full((1, 4), old + 6)}
        out = self.forward(model, inputs)
        assert torch.isfinite(out).all()
        if head_kind(head) in ("ForCausalLM", "ForMaskedLM"):
            assert out.shape[-1] == old + 7

    def test_tied_embeddings(self, variant, lm_head, tmp_path):
        head = lm_head
        model = self.make_model(variant, head)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        model.save_pretrained(tmp_path)
        loaded = head.from_pretrained(tmp_path)
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
        config = self.get_config(variant, head)
        config.tie_word_embeddings = False
        untied = head(config)
        assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight

    def test_use_cache_is_a_config_field(self, variant, causal_head):
        assert AutoConfig.for_model(self.model_type, use_cache=False).use_cache is False
        model = self.make_model(variant, causal_head)
        assert model.config.use_cache is True
        ids, mask = self._prompt(model)
        with torch.no_grad():
            assert model(input_ids=ids, attention_mask=mask).cache is not None
            model.config.use_cache = False
            assert model(input_ids=ids, attention_mask=mask).cache is None

    def test_vision_input_embeddings_are_the_patch_embedding(self, variant, vision_head):
        model = self.make_model(variant, vision_head)
        embedding = model.get_input_embeddings()
        assert isinstance(embedding, torch.nn.Module) and any(p.requires_grad for p in embedding.parameters())

    # ----------------------------------------------------------------- numerics
    def test_bfloat16_forward_backward_finite(self, variant, head):
        model = self.make_model(variant, head).to(torch.bfloat16).train()
        inputs = self.make_inputs(model.config, head)
        inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
        if head_kind(head) == "Model":
            out = model(**inputs).last_hidden_state
            loss = out.float().pow(2).mean()
        else:
            out = model(**inputs, labels=self.make_labels(model.config, head, inputs))
            loss = out.loss
        assert torch.isfinite(loss)
        loss.backward()
        for name, param in model.named_parameters():
            if param.grad is not None:
                assert torch.isfinite(param.grad).all(), name

    def test_fixed_seed_is_deterministic(self, variant, head):
        first = self.make_model(variant, head, seed=42)
        second = self.make_model(variant, head, seed=42)
        for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
            assert torch.equal(a, b), name
        inputs = self.make_inputs(first.config, head)
        torch.testing.assert_close(self.forward(first, inputs), self.forward(second, inputs), rtol=0, atol=0)

    def test_output_hidden_states_from_config(self, variant, head):
        """`config.output_hidden_states` is the default of the forward argument (transformers' convention)."""
        model = self.make_model(variant, head)
        inputs = self.make_inputs(model.config, head)
        model.config.output_hidden_states = True
        with torch.no_grad():
            outputs = model(**inputs)
            assert len(outputs.hidden_states) == model.config.num_hidden_layers + 1
            assert model(**inputs, output_hidden_states=False).hidden_states is None

    def test_use_cache_argument_is_accepted_by_every_head(self, variant, text_head):
        """`use_cache=False` is what evaluation loops pass to any model: no head may fail on it."""
        model = self.make_model(variant, text_head)
        inputs = self.make_inputs(model.config, text_head, batch_size=2)
        torch.testing.assert_close(self.forward(model, inputs, use_cache=False), self.forward(model, inputs))

    def test_past_key_values_is_the_cache_argument(self, variant, causal_head):
        """transformers 5.24 renamed `past_key_values` to `cache` and keeps the old name as a deprecated alias: a cache
        passed under the old name is used (with a FutureWarning), never silently dropped; both names at once are an
        error."""
        model = self.make_model(variant, causal_head)
        ids = self.make_inputs(model.config, causal_head, batch_size=2, seq_length=6)["input_ids"]
        with torch.no_grad():
            full = model(ids, use_cache=False).logits[:, -1]
            cache = model(ids[:, :-1], use_cache=True).cache
            with pytest.warns(FutureWarning, match="past_key_values"):
                continued = model(ids[:, -1:], past_key_values=cache).logits[:, -1]
            torch.testing.assert_close(continued, full, rtol=1e-4, atol=1e-4)
            cache = model(ids[:, :-1], use_cache=True).cache
            with pytest.raises(ValueError, match="past_key_values"):
                model(ids[:, -1:], past_key_values=cache, cache=cache)

    # ----------------------------------------------------------------- bad input
    def test_attention_mask_of_another_batch_is_rejected(self, variant, text_head):
        """A `(1, L)` mask is not broadcast over a batch of 2 (that would give every row row 0's padding)."""
        model = self.make_model(variant, text_head)
        inputs = self.make_inputs(model.config, text_head, batch_size=2)
        mask = torch.ones_like(inputs["input_ids"][:1])
        mask[0, -2:] = 0
        with pytest.raises(ValueError, match=r"attention_mask has shape \(1, \d+\), expected \(2, "):
            model(**inputs, attention_mask=mask)

    def test_negative_position_ids_are_rejected(self, variant, text_head):
        """Where the base model takes `position_ids`, a negative one is an error naming it (never clamped or wrapped
        around silently)."""
        model = self.make_model(variant, text_head)
        base = getattr(model, "model", model)
        if "position_ids" not in inspect.signature(base.forward).parameters:
            return  # positions come from the mask only (AFT refuses `position_ids` with its own error)
        inputs = self.make_inputs(model.config, text_head, batch_size=2)
        length = inputs["input_ids"].shape[1]
        negative = torch.arange(length)[None].expand(2, length) - 2
        with pytest.raises(ValueError, match="position_ids"):
            model(**inputs, position_ids=negative)

    def test_cache_of_another_batch_is_rejected(self, variant, causal_head):
        model = self.make_model(variant, causal_head)
        ids = self.make_inputs(model.config, causal_head, batch_size=2, seq_length=6)["input_ids"]
        with torch.no_grad():
            cache = model(ids[:1, :-1], use_cache=True).cache
            with pytest.raises(ValueError, match="batch of 1.*batch of 2"):
                model(ids[:, -1:], cache=cache)

    def test_labels_of_the_wrong_shape_name_labels(self, variant, loss_head):
        model = self.make_model(variant, loss_head)
        inputs = self.make_inputs(model.config, loss_head, batch_size=2)
        labels = self.make_labels(model.config, loss_head, inputs)
        for wrong in (labels[..., None, None], labels[:1]):
            with pytest.raises(ValueError, match="`labels` must have shape"):
                model(**inputs, labels=wrong)

    def test_config_task_fields_are_checked(self):
        """`num_labels` below 1 and special token ids outside the vocabulary are rejected at config creation (a
        `pad_token_id` equal to `vocab_size` would otherwise fail inside `nn.Embedding` when the model is built)."""
        config_class = hf_efficient.get_config_class(self.model_type)
        with pytest.raises(ValueError, match="num_labels"):
            config_class(num_labels=0)
        vocab_size = getattr(config_class(), "vocab_size", None)
        if vocab_size is not None:
            for field in ("pad_token_id", "eos_token_id"):
                with pytest.raises(
                    ValueError, match=rf"`{field}` must be None or a token id in \[0, {vocab_size - 1}\]"
                ):
                    config_class(**{field: vocab_size})

    def test_invalid_config_raises(self):
        config_class = hf_efficient.get_config_class(self.model_type)
        assert self.invalid_configs, "list some invalid configurations"
        for kwargs, named in self.invalid_configs:
            with pytest.raises(ValueError, match=named):
                config_class(**kwargs)

    def test_bad_configs_name_the_field(self):
        """Values that would only fail when the model is built are rejected at config creation."""
        config_class = hf_efficient.get_config_class(self.model_type)
        defaults = config_class()
        if hasattr(defaults, "hidden_act"):
            with pytest.raises(ValueError, match="hidden_act"):
                config_class(hidden_act="nope")
        if hasattr(defaults, "initializer_range"):
            with pytest.raises(ValueError, match="initializer_range"):
                config_class(initializer_range=-0.02)

    def test_attention_masks_of_any_dtype_with_0_1_values(self, variant, text_head):
        model = self.make_model(variant, text_head)
        inputs = self.make_inputs(model.config, text_head, batch_size=2)
        mask = torch.ones_like(inputs["input_ids"])
        mask[0, -3:] = 0  # right padding: valid for every head
        expected = self.forward(model, {**inputs, "attention_mask": mask})
        for as_dtype in (torch.bool, torch.int32, torch.float32):
            got = self.forward(model, {**inputs, "attention_mask": mask.to(as_dtype)})
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=str(as_dtype))

    def test_additive_float_mask_is_rejected(self, variant, text_head):
        """An additive mask (0 = keep, -inf = pad) would silently be read inverted: it must be an error."""
        model = self.make_model(variant, text_head)
        inputs = self.make_inputs(model.config, text_head, batch_size=2)
        additive = torch.zeros(inputs["input_ids"].shape)
        additive[0, -3:] = float("-inf")
        with pytest.raises(ValueError, match="attention_mask must hold 1 for real tokens and 0 for padding"):
            model(**inputs, attention_mask=additive)
        additive[0, -3:] = -10000.0
        with pytest.raises(ValueError, match="-10000"):
            model(**inputs, attention_mask=additive)

    def test_bad_input_ids_name_the_value(self, variant, text_head):
        model = self.make_model(variant, text_head)
        vocab = model.get_input_embeddings().num_embeddings
        ids = self.make_inputs(model.config, text_head, batch_size=2)["input_ids"]
        for bad in (vocab, -1):
            wrong = ids.clone()
            wrong[1, 2] = bad
            with pytest.raises(ValueError, match=rf"id {bad}, outside the vocabulary \[0, {vocab - 1}\]"):
                model(input_ids=wrong)
        with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
            model(input_ids=ids[0])
        with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
            model(input_ids=ids[..., None])
        for empty in (ids[:, :0], ids[:0]):
            with pytest.raises(ValueError, match="empty"):
                model(input_ids=empty)

    def test_bad_inputs_embeds_name_the_problem(self, variant, text_head):
        model = self.make_model(variant, text_head)
        width = model.config.hidden_size
        embeds = torch.randn(2, self.seq_length, width)
        with pytest.raises(ValueError, match=rf"\(batch, length, {width}\)"):
            model(inputs_embeds=torch.randn(2, self.seq_length, width + 1))
        with pytest.raises(ValueError, match="torch.float64"):
            model(inputs_embeds=embeds.double())

    def test_wrong_image_size_raises(self, variant, vision_head):
        head = vision_head
        model = self.make_model(variant, head)
        size = model.config.image_size
        with pytest.raises(ValueError, match=str(size)):
            model(pixel_values=torch.randn(1, model.config.num_channels, size + 2, size + 2))

    def test_too_long_sequence_raises(self, variant, text_head):
        head = text_head
        assert self.max_seq_length is not None  # deselected otherwise (`not_applicable`)
        model = self.make_model(variant, head)
        too_long = self.make_inputs(model.config, head, batch_size=1, seq_length=self.max_seq_length + 1)
        with pytest.raises(ValueError, match=str(self.max_seq_length)):
            model(**too_long)


class WindowedAttentionTests:
    """Mixin for architectures whose (causal) attention sees only the last N tokens."""

    def attention_window(self, variant: str, config) -> int | None:
        """N of the windowed attention (token i sees i-N+1..i) for this variant's config; None for a variant with
        full attention (e.g. a baseline)."""
        raise NotImplementedError

    def test_receptive_field_of_windowed_attention(self, variant, causal_head):
        """k layers of window N: a token more than k(N-1) positions back changes no logit, one exactly k(N-1) back
        changes the logit there (so the window is neither narrower nor wider than claimed)."""
        # A larger init: with std 0.02 a token k(N-1) back moves the logits by only ~1e-5 through k layers.
        model = self.make_model(variant, causal_head, initializer_range=0.2)
        window = self.attention_window(variant, model.config)
        assert window is not None and window >= 1  # variants without a window are deselected (`not_applicable`)
        reach = model.config.num_hidden_layers * (window - 1)
        length = reach + 4
        inputs = self.make_inputs(model.config, causal_head, batch_size=2, seq_length=length)
        changed = inputs["input_ids"].clone()
        position = 1
        changed[:, position] = (changed[:, position] + 1 - 3) % (model.config.vocab_size - 3) + 3
        full, out = self.forward(model, inputs), self.forward(model, {"input_ids": changed})
        torch.testing.assert_close(out[:, position + reach + 1 :], full[:, position + reach + 1 :], rtol=0, atol=0)
        assert not torch.allclose(out[:, position + reach], full[:, position + reach], rtol=0, atol=1e-4), (
            f"a token exactly k(N-1) = {reach} positions back must still change the logit"
        )


class AttentionTests:
    """Mixin for architectures with softmax attention through transformers' attention interface."""

    def _attention_inputs(self, model, head):
        inputs = self.make_inputs(model.config, head, batch_size=2)
        if not self.is_vision(head):
            mask = torch.ones_like(inputs["input_ids"])
            mask[0, : self.seq_length // 3] = 0  # left padding in the first sample
            inputs["attention_mask"] = mask
        return inputs

    def test_output_attentions(self, variant, head):
        model = self.make_model(variant, head, _attn_implementation="eager")
        inputs = self._attention_inputs(model, head)
        with torch.no_grad():
            outputs = model(**inputs, output_attentions=True)
        attentions = outputs.attentions
        assert attentions is not None and len(attentions) == model.config.num_hidden_layers
        for weights in attentions:
            assert weights.ndim == 4 and weights.shape[0] == 2 and weights.shape[1] == model.config.num_attention_heads
            assert torch.isfinite(weights).all()
            # every real query's attention is a distribution over the keys
            sums = weights[1].sum(dim=-1)
            torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)

    def test_output_attentions_from_config(self, variant, head):
        """`config.output_attentions` is the default of the forward argument (transformers' convention)."""
        model = self.make_model(variant, head, _attn_implementation="eager")
        inputs = self._attention_inputs(model, head)
        model.config.output_attentions = True
        with torch.no_grad():
            attentions = model(**inputs).attentions
            assert attentions is not None and len(attentions) == model.config.num_hidden_layers
            assert model(**inputs, output_attentions=False).attentions is None

    def test_eager_and_sdpa_agree(self, variant, head):
        eager = self.make_model(variant, head, _attn_implementation="eager")
        sdpa = self.make_model(variant, head, _attn_implementation="sdpa")
        inputs = self._attention_inputs(eager, head)
        out_eager, out_sdpa = self.forward(eager, inputs), self.forward(sdpa, inputs)
        if not self.is_vision(head) and out_eager.ndim == 3:
            real = inputs["attention_mask"].bool()  # padded positions may differ: compare the real ones
            out_eager, out_sdpa = out_eager[real], out_sdpa[real]
        torch.testing.assert_close(out_sdpa, out_eager, rtol=1e-5, atol=1e-5)


class MixtureOfExpertsTests:
    """Mixin for mixture-of-experts architectures: the router's auxiliary loss is in the loss and reported."""

    def test_router_outputs_and_aux_loss(self, variant, loss_head):
        head = loss_head
        model = self.make_model(variant, head).train()
        inputs = self.make_inputs(model.config, head)
        labels = self.make_labels(model.config, head, inputs)
        torch.manual_seed(0)
        outputs = model(**inputs, labels=labels, output_router_logits=True)
        assert outputs.router_logits is not None and len(outputs.router_logits) > 0
        assert outputs.aux_loss is not None and outputs.aux_loss.ndim == 0 and torch.isfinite(outputs.aux_loss)
        assert float(outputs.aux_loss) >= 0.0
        logits = outputs.logits
        task = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        expected = task + model.config.router_aux_loss_coef * outputs.aux_loss
        torch.testing.assert_close(outputs.loss, expected.to(outputs.loss.dtype), rtol=1e-5, atol=1e-6)
        # the router learns from the auxiliary loss alone too
        model.zero_grad()
        outputs.aux_loss.backward()
        router_grads = [p.grad for n, p in model.named_parameters() if "router" in n or "gate" in n]
        assert router_grads and any(g is not None and g.abs().sum() > 0 for g in router_grads)
