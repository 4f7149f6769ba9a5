"""Minimal reproduction: an AOTInductor package of ``torch.sin`` on CUDA, loaded in fresh processes.

    python experiments/aoti_load_repro.py OUT_DIR [--shared-runtime]

Cause found on the benchmark H100: its C++ compiler finds no shared ``libstdc++.so`` and links the static archive
into the package's wrapper library (``ldd`` lists no libstdc++), so the loading process runs two C++ runtimes;
the wrapper's first ``std::regex`` (``parse_device_str``) calls a wrong locale-facet virtual and segfaults.
``--shared-runtime`` builds the package the way ``dc.aot_compile`` does (linking the process's libstdc++.so).

Prints, for each way of loading, the exit status and the last lines of stderr (with faulthandler's stack),
then ``ldd`` of the package's wrapper library and, with ``--gdb``, a native backtrace (cuda-gdb).
"""

import os
import shutil
import subprocess
import sys
import zipfile

import torch


class Sin(torch.nn.Module):
    def forward(self, x):
        return torch.sin(x)


def run(title, code, env=None):
    res = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    print(f"--- {title}: exit {res.returncode}\n{res.stdout[-400:]}{res.stderr[-1500:]}", flush=True)
    return res.returncode


def toolchain():
    from torch._inductor import config

    cxx = config.cpp.cxx[1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    for flag in ("--version", "-print-file-name=libstdc++.so", "-print-file-name=libstdc++.a"):
        res = subprocess.run([cxx, flag], capture_output=True, text=True)
        print(f"{cxx} {flag}: {res.stdout.strip().splitlines()[0] if res.stdout.strip() else res.stderr[-300:]}")
    with open("/proc/self/maps") as f:
        print("C++ runtime loaded by this process:", sorted({ln.split()[-1] for ln in f if "libstdc++" in ln}))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    toolchain()
    x = torch.randn(64, device="cuda")
    if "--shared-runtime" in sys.argv:   # the fix dc.aot_compile applies: link the loaded libstdc++.so
        from dilate_compiler.export import shared_cxx_runtime
        ctx = shared_cxx_runtime()
    else:
        import contextlib
        ctx = contextlib.nullcontext()
    with ctx:
        pkg = torch._inductor.aoti_compile_and_package(torch.export.export(Sin(), (x,)),
                                                       package_path=os.path.join(out, "sin.pt2"))
    print("package:", pkg, zipfile.ZipFile(pkg).namelist())
    load = f"import torch\nf = torch._inductor.aoti_load_package({pkg!r})\nprint('loaded', flush=True)\n"
    runit = "x = torch.randn(64, device='cuda')\nprint('max err', (f(x) - torch.sin(x)).abs().max().item())\n"
    run("load on CPU-only import, then run", load + runit)
    run("CUDA initialised before load", "import torch\ntorch.zeros(1, device='cuda')\n" + load[13:] + runit)
    run("load only", load)
    with zipfile.ZipFile(pkg) as z:
        so = [n for n in z.namelist() if n.endswith(".so")]
        z.extractall(os.path.join(out, "unzipped"))
    for name in so:
        path = os.path.join(out, "unzipped", name)
        print("ldd", name, subprocess.run(["ldd", path], capture_output=True, text=True).stdout[-2000:], flush=True)
    gdb = shutil.which("cuda-gdb")
    if gdb and "--gdb" in sys.argv:
        script = os.path.join(out, "load.py")
        with open(script, "w") as f:
            f.write(load + runit)
        cmds = ["set pagination off", "set print thread-events off", "run", "bt 40", "info registers rip",
                "x/8i $pc"]
        args = [gdb, "-batch"] + [a for c in cmds for a in ("-ex", c)] + ["--args", sys.executable, script]
        res = subprocess.run(args, capture_output=True, text=True, timeout=300)
        print("--- cuda-gdb backtrace\n", res.stdout[-12000:], res.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
