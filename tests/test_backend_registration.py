"""``backend="dilated"`` with and without the ``torch_dynamo_backends`` entry point.

An installed package declares the entry point and Dynamo loads it on first use; on ``PYTHONPATH`` alone there is
none, and ``import dilate_compiler`` registers the name itself. Registering both ways is Dynamo's "duplicate name"
error. Each case runs in a fresh process whose entry points are made to have or lack the declaration, whatever
this environment has installed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib.metadata as md
import json
import sys

PRESENT = sys.argv[1] == "present"
GROUP = "torch_dynamo_backends"
_entry_points = md.entry_points


def entry_points(**kwargs):
    eps = _entry_points(**kwargs)
    if kwargs.get("group") != GROUP:
        return eps
    kept = [ep for ep in eps if ep.name != "dilated"]
    if PRESENT:
        kept.append(md.EntryPoint("dilated", "dilate_compiler.backend:dilated_backend", GROUP))
    return md.EntryPoints(kept)


md.entry_points = entry_points

import torch
from torch._dynamo.backends.registry import lookup_backend

import dilate_compiler
from dilate_compiler import backend

registered_on_import = "dilated" in torch._dynamo.backends.registry._COMPILER_FNS
compiled = torch.compile(torch.nn.Linear(2, 2), backend="dilated")      # looks the name up
result = {
    "registered_on_import": registered_on_import,
    "looked_up": lookup_backend("dilated") is backend.dilated_backend,
    "listed": "dilated" in torch._dynamo.list_backends(),
    "register_again": backend.register(),
}
try:        # what the guard avoids: a second registration of the name
    torch._dynamo.backends.registry.register_backend(backend.dilated_backend, name="dilated")
    result["second_registration"] = "accepted"
except AssertionError as e:
    result["second_registration"] = str(e)
print(json.dumps(result))
"""


def _run(mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["present", "absent"])
def test_backend_name_resolves_once_with_or_without_the_entry_point(mode):
    res = _run(mode)
    # Without the entry point the import registers the name; with it, Dynamo's lookup loads the entry point.
    assert res["registered_on_import"] is (mode == "absent")
    assert res["looked_up"] and res["listed"]
    assert res["register_again"] is False
    assert res["second_registration"] == "duplicate name: dilated"
