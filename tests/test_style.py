"""Code says why; measurements live in ``benchmarks/RESULTS*.md``.

Comments and docstrings under the package, kernel and test trees must not quote timings,
bandwidths or speed ratios: such figures go stale with the next change of code or machine, and a
reader cannot tell them from fixed constraints. They belong in the RESULTS files, dated, beside
the command that measured them.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED_DIRS = ("lomt_kernels", "lomt_train", "csrc", "tests")
C_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")

_NUMBER = r"(?<![\w.])\d+(?:[.,]\d+)*(?:\s*[-–]\s*\d+(?:[.,]\d+)*)?"
#: A number with a unit of time or bandwidth.
_TIMING = _NUMBER + r"\s*(?:ms|us|µs|μs|GB/s|TB/s)(?![\w/])"
#: A number written as a speed ratio, but not a shape or kernel size, a hex literal or an
#: identifier ending in a digit (the cases below list both kinds).
_RATIO = _NUMBER + r"(?:[x×]|\s×)(?!\w)(?!\s*\d)"
TIMING_QUOTE = re.compile(f"{_TIMING}|{_RATIO}")


def _python_prose(source: str) -> list[tuple[int, str]]:
    """Every comment and docstring of a Python source, as (first line number, text)."""
    prose = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                prose.append((body[0].lineno, body[0].value.value))
    return prose


_C_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def _c_prose(source: str) -> list[tuple[int, str]]:
    """Every ``//`` and ``/* */`` comment of a C++/CUDA source, as (first line number, text)."""
    return [(source.count("\n", 0, m.start()) + 1, m.group()) for m in _C_COMMENT.finditer(source)]


def timing_quotes(path: Path, source: str) -> list[str]:
    """``"path:line: quote"`` for every timing, bandwidth or speed ratio in the file's comments and
    docstrings."""
    prose = _python_prose(source) if path.suffix == ".py" else _c_prose(source)
    found = []
    for first_line, text in prose:
        for match in TIMING_QUOTE.finditer(text):
            line = first_line + text.count("\n", 0, match.start())
            found.append(f"{path.relative_to(ROOT)}:{line}: {match.group()!r}")
    return found


def checked_files() -> list[Path]:
    return sorted(p for d in CHECKED_DIRS for p in (ROOT / d).rglob("*")
                  if p.suffix == ".py" or p.suffix in C_SUFFIXES)


def test_no_comment_or_docstring_quotes_a_timing():
    found = [q for path in checked_files() for q in timing_quotes(path, path.read_text(encoding="utf-8"))]
    assert not found, (
        "comments and docstrings say why, not how fast: move these figures to benchmarks/RESULTS*.md "
        "and point to the section there:\n" + "\n".join(found)
    )


@pytest.mark.parametrize("text", [
    "1.6 ms slower", "14.7 against 13.1 ms", "45-70 GB/s", "3.3 TB/s", "2 us", "5 µs",
    "3x slower", "1.25x fused Adam", "1.4-1.7x", "1.25× Adam", "2 × Adam",
])
def test_timing_quotes_are_found(text):
    assert TIMING_QUOTE.search(text)


@pytest.mark.parametrize("text", [
    "3x3 convs", "a 1x1 conv", "7x7", "3 × 3 kernel", "0x1f", "float2 x", "tol = 2**-18",
    "1e-5 atol", "rows x cols", "[B, K] x 4 bytes", "28 B/param", "2 msgs", "ns/param",
])
def test_legitimate_text_is_not_a_timing_quote(text):
    assert not TIMING_QUOTE.search(text)


def test_a_planted_timing_comment_is_reported_with_its_file_and_line():
    path = ROOT / "csrc" / "planted.cpp"
    found = timing_quotes(path, "int x;\n// this loop measured 1.6 ms slower\n")
    assert found == ["csrc/planted.cpp:2: '1.6 ms'"]
    found = timing_quotes(ROOT / "tests" / "planted.py", 'def f():\n    """Fast.\n\n    3x Adam."""\n    # ok\n')
    assert found == ["tests/planted.py:4: '3x'"]
