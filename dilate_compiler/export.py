"""Ahead-of-time: ``dc.export`` (a rewritten ``torch.export.ExportedProgram``) and ``dc.aot_compile``
(an AOTInductor ``.pt2`` package).

``export`` traces with ``torch.export`` (non-strict, ``nn.MultiheadAttention``'s fast path off), runs the same
pass pipeline as ``rewrite`` and the backend on the exported graph, and keeps the graph signature pointing at
the rewritten nodes. The program saves and loads with ``torch.export.save``/``load``; loading needs only
``import dilate_compiler`` (which registers the ops). On CUDA the dilated op is a ``triton_op``, so AOTInductor
embeds its Triton kernels in the package; where eager mode would run a warp-specialised Hopper forward, the package
calls it through an opaque op instead (built with ``DILATE_COMPILER_WARP_SPECIALISED=0``, it embeds the Triton
forward there too); on the CPU the package calls the exact path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Optional

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from .api import check_strategy, export_program
from .passes.pipeline import run_pipeline
from .passes.rewrite_attention import CONSTANT_PREFIX, Where
from .passes.site import Report
from .passes.sources import mark_state

log = logging.getLogger(__name__)


def _retarget_outputs(ep: ExportedProgram) -> None:
    """Output specs name output nodes; a rewritten site that was an output now has a new node."""
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    for spec, node in zip(ep.graph_signature.output_specs, out_node.args[0]):
        if isinstance(spec.arg, TensorArgument) and isinstance(node, torch.fx.Node) and spec.arg.name != node.name:
            spec.arg = TensorArgument(name=node.name)


def _lift_constants(ep: ExportedProgram) -> None:
    """Compile-time tensors the rewrite added as module buffers (block layouts) become lifted constants of the
    program: placeholders before the user inputs, with CONSTANT_TENSOR input specs."""
    gm = ep.graph_module
    getattrs = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith(CONSTANT_PREFIX)]
    if not getattrs:
        return
    specs = list(ep.graph_signature.input_specs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first_user = next((i for i, sp in enumerate(specs) if sp.kind == InputKind.USER_INPUT), len(specs))
    anchor = placeholders[first_user] if first_user < len(placeholders) else None
    new_specs = []
    for n in getattrs:
        name = str(n.target)
        tensor = getattr(gm, name)
        ctx = gm.graph.inserting_before(anchor) if anchor is not None else gm.graph.inserting_after(placeholders[-1])
        with ctx:
            ph = gm.graph.placeholder(name.lstrip("_"))
        ph.meta = dict(n.meta)
        n.replace_all_uses_with(ph)
        gm.graph.erase_node(n)
        delattr(gm, name)
        ep.constants[name] = tensor
        new_specs.append(InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(ph.name), target=name))
    ep.graph_signature.input_specs[:] = specs[:first_user] + new_specs + specs[first_user:]


def export(model: torch.nn.Module, args: tuple, strategy=None, *, kwargs: Optional[dict] = None,
           dynamic_shapes: Any = None, where: Where = None, strict: bool = False) -> ExportedProgram:
    """``torch.export`` ``model`` with its attention rewritten into ``strategy``'s op.

    The returned program carries the rewrite report as ``ep.dilate_report`` (not saved with the program).
    ``dynamic_shapes`` is passed to ``torch.export``; a dynamic sequence length stays symbolic (the op plans
    its segments from the run-time length).
    """
    strategy = check_strategy(strategy)
    ep = export_program(model, args, kwargs, dynamic_shapes)
    user_inputs = set(ep.graph_signature.user_inputs)
    mark_state(ep.graph_module, [n.name for n in ep.graph.nodes if n.op == "placeholder" and n.name not in user_inputs])
    report: Report = run_pipeline(ep.graph_module, strategy, where=where, strict=strict)
    _retarget_outputs(ep)
    _lift_constants(ep)
    ep.graph_module.recompile()
    ep.validate()
    ep.dilate_report = report
    return ep


def aot_compile(ep: ExportedProgram, package_path: str, **inductor_configs) -> str:
    """Compile ``ep`` with AOTInductor into the package ``package_path`` (a ``.pt2`` file); returns its path.

    Load it in any process with ``import dilate_compiler`` then ``torch._inductor.aoti_load_package(path)``.
    """
    if not isinstance(ep, ExportedProgram):
        raise TypeError(f"ep must be a torch.export.ExportedProgram (from dc.export), got {type(ep).__name__}")
    if not str(package_path).endswith(".pt2"):
        raise ValueError(f"package_path must end with '.pt2', got {package_path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(package_path)), exist_ok=True)
    with shared_cxx_runtime():
        return torch._inductor.aoti_compile_and_package(ep, package_path=str(package_path),
                                                        inductor_configs=inductor_configs or None)


def _inductor_cxx() -> str:
    """The C++ compiler Inductor builds packages with (``torch._inductor.config.cpp.cxx``)."""
    from torch._inductor import config

    return config.cpp.cxx[1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx


def cxx_runtime_link_dir(cxx: Optional[str] = None) -> Optional[str]:
    """A directory holding ``libstdc++.so`` (a link to the C++ runtime this process has loaded) when the C++
    compiler Inductor calls cannot find a shared ``libstdc++.so`` itself; None when it can (or off Linux).

    Why: such a compiler links its static ``libstdc++.a`` into the package's wrapper library. The process that
    loads the package already runs the shared C++ runtime (libtorch uses it), so the wrapper then mixes two
    runtimes: its own facet ids index the process's locale, and the first ``std::regex`` the loader builds
    (``parse_device_str``, in the model's constructor) calls a wrong virtual function and segfaults, for any
    package (``experiments/aoti_load_repro.py`` shows it with ``torch.sin``)."""
    if not sys.platform.startswith("linux"):
        return None
    cxx = cxx or _inductor_cxx()
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=120).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None   # no compiler here: AOTInductor reports that itself
    if os.path.isabs(found) and os.path.exists(found):
        return None
    with open("/proc/self/maps") as f:
        loaded = next((line.split()[-1] for line in f if "/libstdc++.so" in line), None)
    if loaded is None:
        return None
    link_dir = tempfile.mkdtemp(prefix="dilate_compiler_cxx_runtime_")
    os.symlink(loaded, os.path.join(link_dir, "libstdc++.so"))
    return link_dir


@contextlib.contextmanager
def shared_cxx_runtime():
    """While building a package, make the C++ compiler link the shared C++ runtime (``cxx_runtime_link_dir``);
    a no-op where the compiler finds it itself. The compiler runs through a two-line wrapper that puts the link
    directory first on its library path (``-L``): ``LIBRARY_PATH`` is not enough, as the directories of a
    toolchain's own ``-B`` prefixes, which hold ``libstdc++.a``, are searched before it."""
    from torch._inductor import config

    link_dir = cxx_runtime_link_dir()
    if link_dir is None:
        yield
        return
    cxx = _inductor_cxx()
    real = shutil.which(cxx) or cxx
    wrapper = os.path.join(link_dir, os.path.basename(real))   # keeps the name Inductor reads (g++, clang++)
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec "{real}" -L"{link_dir}" "$@"\n')
    os.chmod(wrapper, 0o755)
    log.info("%s finds no shared libstdc++.so; linking the package against %s (the runtime this process uses) "
             "instead of the static archive", real, os.path.realpath(os.path.join(link_dir, "libstdc++.so")))
    try:
        with config.patch({"cpp.cxx": (None, wrapper)}):
            yield
    finally:
        shutil.rmtree(link_dir, ignore_errors=True)
