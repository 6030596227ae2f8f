"""Parametrises the generic tester's fixtures from each test class's attributes; one thread per test worker."""

import os

# `pytest -n 2` runs two workers on two cores: with torch's default of one OpenMP thread per core each, the workers
# oversubscribe the machine and tiny ops slow down ~5x. One thread per worker (and per subprocess it starts).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

import pytest


def _is_vision(cls, head) -> bool:
    """Image heads, and every head of a vision-only architecture (`vision_only = True`: no `input_ids` at all)."""
    return head.__name__.endswith("ForImageClassification") or getattr(cls, "vision_only", False)


FIXTURE_SOURCES = {
    "variant": lambda cls: list(cls.variants),
    "head": lambda cls: list(cls.all_heads),
    "loss_head": lambda cls: [h for h in cls.all_heads if not h.__name__.endswith("Model")],
    "text_head": lambda cls: [h for h in cls.all_heads if not _is_vision(cls, h)],
    "vision_head": lambda cls: [h for h in cls.all_heads if _is_vision(cls, h)],
    "lm_head": lambda cls: [h for h in cls.all_heads if h.__name__.endswith(("ForCausalLM", "ForMaskedLM"))],
    "causal_head": lambda cls: [h for h in cls.all_heads if h.__name__.endswith("ForCausalLM")],
}


def pytest_generate_tests(metafunc):
    cls = metafunc.cls
    if cls is None or not hasattr(cls, "all_heads"):
        return
    for fixture, source in FIXTURE_SOURCES.items():
        if fixture in metafunc.fixturenames:
            values = source(cls)
            ids = [getattr(v, "__name__", str(v)) for v in values]
            if not values:  # e.g. an architecture without a vision head: the test does not apply (deselected below)
                metafunc.parametrize(fixture, [pytest.param(None, marks=pytest.mark.not_applicable)])
            else:
                metafunc.parametrize(fixture, values, ids=ids)


def pytest_configure(config):
    config.addinivalue_line("markers", "not_applicable: a generic test for a head kind the architecture lacks")


def pytest_collection_modifyitems(config, items):
    """Generic tests for head kinds an architecture does not have, or that its class's `not_applicable` rules out
    (no length limit, no attention window), are deselected (not skipped): they do not apply."""

    def applies(item) -> bool:
        if item.get_closest_marker("not_applicable") is not None:
            return False
        cls = getattr(item, "cls", None)
        if cls is None or not hasattr(cls, "not_applicable") or not hasattr(item, "callspec"):
            return True
        return cls().not_applicable(item.originalname, item.callspec.params) is None

    kept = [item for item in items if applies(item)]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
