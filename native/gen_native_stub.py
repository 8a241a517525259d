"""Write shmcache/_native.pyi, the types of the cffi module, from shmcache.h.

cffi builds ``lib`` at run time, so without a stub every call into C is
``Any`` to mypy: a misspelt function, a missing argument or a float where C
takes an integer would pass the type check.  The stub is derived from the
header (the cdef cffi compiles), so it cannot drift from the C; the test suite
checks it is current (``--check``).  Run after changing shmcache.h:

    python native/gen_native_stub.py
"""

from __future__ import annotations

import keyword
import re
import sys
from pathlib import Path

from pycparser import c_ast, c_parser

HERE = Path(__file__).resolve().parent
HEADER = HERE / "shmcache.h"
STUB = HERE.parent / "shmcache" / "_native.pyi"

# cffi knows these; a plain C parser needs them declared
_PRELUDE = "".join(f"typedef int {t};\n" for t in (
    "uint8_t", "uint32_t", "uint64_t", "int64_t", "size_t"))
_DEFINE = re.compile(r"^#define\s+(\w+)\s+(\S+)", re.MULTILINE)


def _py_type(node: c_ast.Node) -> str:
    """int for C integers, None for void, CData for pointers and structs."""
    if isinstance(node, c_ast.TypeDecl) and isinstance(node.type, c_ast.IdentifierType):
        return "None" if node.type.names == ["void"] else "int"
    return "CData"


def render(header: str) -> str:
    constants = [name for name, _ in _DEFINE.findall(header)]
    source = _PRELUDE + re.sub(r"/\*.*?\*/", "", _DEFINE.sub("", header), flags=re.DOTALL)
    ast = c_parser.CParser().parse(source, HEADER.name)
    functions = []
    for decl in ast.ext:
        if isinstance(decl, c_ast.Decl) and isinstance(decl.type, c_ast.FuncDecl):
            params = [p for p in (decl.type.args.params if decl.type.args else [])
                      if not (isinstance(p, c_ast.Typename) and _py_type(p.type) == "None")]  # (void)
            # positional-only, as cffi calls them: a parameter named like a
            # Python keyword (from) only needs to be valid syntax
            args = ["self", *(f"{p.name}{'_' * keyword.iskeyword(p.name)}: {_py_type(p.type)}"
                              for p in params), "/"]
            returns = _py_type(decl.type.type)
            line = f"    def {decl.name}({', '.join(args)}) -> {returns}: ..."
            if len(line) > 100:
                line = f"    def {decl.name}(\n" + "".join(f"        {a},\n" for a in args) + f"    ) -> {returns}: ..."
            functions.append(line + "\n")
    return (
        "# Generated from native/shmcache.h by native/gen_native_stub.py: do not edit.\n"
        "from typing import Any, Final, TypeAlias\n\n"
        "# cffi's pointers and structs (ffi.new, ffi.from_buffer, bytes for a const\n"
        "# uint8_t *): cffi ships no types, so the stub checks names, arity and integers.\n"
        "CData: TypeAlias = Any\n\n"
        "class _Lib:\n"
        + "".join(f"    {name}: Final[int]\n" for name in constants)
        + "".join(functions)
        + "\nlib: _Lib\nffi: Any\n"
    )


def main() -> int:
    text = render(HEADER.read_text())
    if sys.argv[1:] == ["--check"]:
        if STUB.exists() and STUB.read_text() == text:
            return 0
        print(f"{STUB} is not current: run python native/gen_native_stub.py", file=sys.stderr)
        return 1
    STUB.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
