"""FSDP2 (`fully_shard`, accelerate's FSDP plugin, version 2) in two CPU processes over gloo: the same final weights
as one process at the same global batch, the full state dict saved and reloadable; `_no_split_modules` of every
architecture names its block class."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import hf_efficient
from tests.helpers import SIZES
from tests.model_tester import free_port

ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: false
main_training_function: main
"""

# A plain Accelerate loop: `python train.py OUT GLOBAL_BATCH STEPS CONFIG_JSON` alone, or under `accelerate launch`.
TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, set_seed
    from transformers import AutoConfig, AutoModelForCausalLM
    import hf_efficient  # registers the architectures

    out, global_batch, steps, overrides = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    distributed = "WORLD_SIZE" in __import__("os").environ
    plugin = FullyShardedDataParallelPlugin() if distributed else None  # from the launch config: FSDP_VERSION=2, ...
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    if distributed and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate turns FSDP on only for accelerator devices (CPU processes get DDP); FSDP2's `fully_shard`
        # itself runs on CPU over gloo, so select it explicitly.
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    set_seed(0)
    config = AutoConfig.for_model(**overrides)
    model = AutoModelForCausalLM.from_config(config)
    data = torch.randint(3, config.vocab_size, (steps * global_batch, 16), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(data, batch_size=global_batch // accelerator.num_processes, shuffle=False)
    # SGD, not Adam: Adam rescales gradients that are zero up to rounding (AFT's key bias: a softmax over keys is
    # blind to a shift shared by every key) into full-size steps, whose signs then differ between runs.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        accelerator.backward(model(input_ids=batch, labels=batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    state = accelerator.get_state_dict(model)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}  # every rank
    if accelerator.is_main_process:
        full = AutoModelForCausalLM.from_config(config)  # unsharded copy that saves the gathered full state dict
        missing, unexpected = full.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        full.tie_weights()
        full.save_pretrained(out)
        sharded = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP")})
        run = {"num_processes": accelerator.num_processes, "sharded": sharded}
        run["fsdp_version"] = plugin.fsdp_version if plugin is not None else None
        with open(f"{out}/run.json", "w") as f:
            json.dump(run, f)
    accelerator.wait_for_everyone()
    """
)

SETTINGS = {
    "gmlp": {},
    "aft": {"aft_type": "local", "local_window": 4},
    "combiner": {"num_attention_heads": 2, "block_size": 4, "combiner_type": "fixed"},
}


@pytest.mark.parametrize("model_type", list(SETTINGS))
def test_fsdp2_two_processes_match_one_process(model_type, tmp_path):
    overrides = dict(SIZES, model_type=model_type, intermediate_size=64, max_position_embeddings=16, causal=True)
    overrides.update(SETTINGS[model_type])
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    config = tmp_path / "fsdp.yaml"
    config.write_text(ACCELERATE_CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["8", "3", json.dumps(overrides)]  # global batch 8, 3 steps
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launch += ["--num_processes", "2", "--main_process_port", str(free_port())]
    fsdp = subprocess.run(
        [*launch, str(script), str(tmp_path / "fsdp"), *args], env=env, capture_output=True, text=True, timeout=400
    )
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    run = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert run["num_processes"] == 2 and run["fsdp_version"] == 2
    (block,) = AutoModelForCausalLM.from_config(AutoConfig.for_model(**overrides))._no_split_modules
    assert f"FSDP{block}" in run["sharded"], run  # each block is its own FSDP2 unit (TRANSFORMER_BASED_WRAP)

    sharded, single = (
        load_file(tmp_path / "fsdp" / "model.safetensors"),
        load_file(tmp_path / "one" / "model.safetensors"),
    )
    assert sharded.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-4, atol=2e-5, msg=key)
    initial = AutoModelForCausalLM.from_config(AutoConfig.for_model(**overrides))
    assert any(not torch.allclose(p, sharded[n]) for n, p in initial.state_dict().items() if n in sharded)  # trained

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp").eval()
    for name, tensor in reloaded.state_dict().items():
        if name in sharded:
            torch.testing.assert_close(tensor, sharded[name], rtol=0, atol=0)
    ids = torch.randint(3, 64, (1, 8))
    assert torch.isfinite(reloaded(ids).logits).all()


@pytest.mark.parametrize("model_type", sorted(hf_efficient.ARCHITECTURES))
def test_no_split_modules_name_existing_block_classes(model_type):
    """FSDP's TRANSFORMER_BASED_WRAP and `device_map="auto"` read `_no_split_modules`: every name must be a class of
    the model (one that holds the repeated blocks), for every head."""
    import importlib

    package = importlib.import_module(f"hf_efficient.models.{hf_efficient.ARCHITECTURES[model_type]}")
    config = AutoConfig.for_model(model_type)
    for head in package.AUTO_MAPPING.values():
        try:
            with torch.device("meta"):
                model = head(config)
        except ValueError:  # a head the default config cannot build (e.g. vision heads need image settings)
            continue
        names = model._no_split_modules
        assert names, f"{head.__name__} has no _no_split_modules"
        modeling = importlib.import_module(type(model).__module__)
        for name in names:  # a class of the architecture (some name only one configuration builds, e.g. an encoder)
            assert isinstance(getattr(modeling, name, None), type), f"{head.__name__}: no block class {name!r}"
        classes = {type(m).__name__ for m in model.modules()}
        assert classes & set(names), f"{head.__name__}: none of {sorted(names)} is in the model"
