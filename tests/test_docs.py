"""The README's and the docs' Python code blocks run, and what they state about versions holds.

Each page's ``python`` blocks run in order in one fresh process (a page reads as one script), on the CPU, with a
time limit. A block preceded by a line ``<!-- skip: REASON -->`` needs what this machine may not have (a CUDA GPU,
several processes); it is reported as a skipped test with its reason, and on a CUDA machine a block whose reason
names a GPU runs after the page's other blocks.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*skip:\s*(.+?)\s*-->\s*$")
PAGE_TIME_LIMIT_S = 900


def code_blocks(page: Path) -> list:
    """``(first line number, language, code, skip reason or None)`` of each fenced block of ``page``."""
    blocks, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        skip = SKIP.match(lines[j]) if j >= 0 else None
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        blocks.append((i + 2, m.group(1), "\n".join(lines[i + 1:end]), skip.group(1) if skip else None))
        i = end + 1
    return blocks


RUNNER = r"""
import sys, traceback, types
page, blocks = sys.argv[1], eval(sys.stdin.read())
module = types.ModuleType("docs_page")          # a real module: torch.compile looks globals up through it
sys.modules[module.__name__] = module
for line, code in blocks:
    try:
        exec(compile(code, f"{page}:{line}", "exec"), module.__dict__)
    except BaseException:
        traceback.print_exc()
        print(f"the block at {page}:{line} failed", file=sys.stderr)
        sys.exit(1)
"""


def _run(page: Path, blocks: list, tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)       # the docs show what a user sees: the exact path on the CPU
    res = subprocess.run([sys.executable, "-c", RUNNER, str(page.relative_to(ROOT))], input=repr(blocks),
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=PAGE_TIME_LIMIT_S)
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-6000:]}"


def _python(page: Path) -> list:
    return [b for b in code_blocks(page) if b[1] == "python"]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_code_runs(page, tmp_path):
    blocks = [(line, code) for line, _, code, skip in _python(page) if skip is None]
    if not blocks:
        pytest.skip(f"{page.name} has no Python block to run here")
    _run(page, blocks, tmp_path)


MARKED = [(page, line, reason) for page in PAGES for line, _, _, reason in _python(page) if reason]


@pytest.mark.parametrize("page,line,reason", MARKED, ids=[f"{p.name}:{line}" for p, line, _ in MARKED])
def test_marked_block(page, line, reason, tmp_path):
    if "GPU" not in reason or not torch.cuda.is_available():
        pytest.skip(f"{page.name}:{line}: {reason}")
    blocks = [(ln, code) for ln, _, code, skip in _python(page) if skip is None and ln < line]
    blocks += [(ln, code) for ln, _, code, _ in _python(page) if ln == line]
    _run(page, blocks, tmp_path)


def test_code_blocks_are_found():
    """The parser sees the README's quick start and a marked block (a parser that finds nothing passes nothing)."""
    readme = _python(ROOT / "README.md")
    assert any("backend=\"dilated\"" in code for _, _, code, _ in readme)
    assert MARKED, "no block is marked <!-- skip: ... --> anywhere"
    assert code_blocks(ROOT / "docs" / "results.md"), "results.md has its commands in code blocks"


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


def _version(text: str) -> tuple:
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", text).groups())


def test_supported_versions_agree_and_hold_here():
    """pyproject's Python and torch bounds are the ones the README states, and this environment is inside them."""
    toml = _pyproject()
    python_min = re.search(r'requires-python = ">=(\d+\.\d+)"', toml).group(1)
    torch_min, torch_below = re.search(r'"torch>=(\d+\.\d+),<(\d+\.\d+)"', toml).groups()
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"Python (\d+\.\d+)\+, torch (\d+\.\d+) to (\d+\.\d+)", readme)
    assert stated, "README states the supported versions as 'Python X.Y+, torch A.B to C.D'"
    assert stated.group(1) == python_min and stated.group(2) == torch_min
    assert _version(stated.group(3)) < _version(torch_below)
    assert sys.version_info[:2] >= _version(python_min)
    assert _version(torch_min) <= _version(torch.__version__) < _version(torch_below)
    classifiers = set(re.findall(r'"Programming Language :: Python :: (3\.\d+)"', toml))
    assert python_min in classifiers


def test_runtime_imports_are_declared_dependencies():
    """Every third-party module the package imports is a dependency in pyproject.toml (``dc.hf``, loaded on first
    use, may import what its ``hf`` extra declares)."""
    deps = re.search(r"dependencies = \[(.*?)\]", _pyproject(), re.S).group(1)
    declared = {name.lower() for name in re.findall(r'"([A-Za-z0-9_-]+)', deps)}
    extra = re.search(r"^hf = \[(.*?)\]", _pyproject(), re.M | re.S).group(1)
    hf_declared = declared | {name.lower() for name in re.findall(r'"([A-Za-z0-9_-]+)', extra)}
    stdlib = set(sys.stdlib_module_names)
    imported = set()
    hf_text = (ROOT / "dilate_compiler" / "hf.py").read_text()
    hf_imports = {m.group(1) for m in re.finditer(r"^\s*from\s+([A-Za-z_]\w*)[\w.]*\s+import\s", hf_text, re.M)}
    assert hf_imports - stdlib - {"dilate_compiler"} <= hf_declared
    for path in (ROOT / "dilate_compiler").rglob("*.py"):
        if path.name == "hf.py" and path.parent.name == "dilate_compiler":
            continue
        text = path.read_text()
        for pattern in (r"^\s*from\s+([A-Za-z_]\w*)[\w.]*\s+import\s", r"^\s*import\s+([A-Za-z_]\w*)"):
            imported |= {m.group(1) for m in re.finditer(pattern, text, re.M)}
    third_party = {name for name in imported if name not in stdlib and name != "dilate_compiler"}
    assert third_party, "found no imports at all"
    assert third_party <= declared, f"imported but not declared: {sorted(third_party - declared)}"
