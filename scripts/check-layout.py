#!/usr/bin/env python3
"""The layout rules of docs/architecture.md that the compiler does not check.

1. No module cycle, in any crate of the workspace. For each file of a
   crate, the module it defines (daemon/src/backend/multipath/library.rs
   is backend::multipath::library) and every path it names that starts
   with crate::, super:: or self:: (in use lines, use groups such as
   crate::{a, b::c}, and paths in code; inline modules such as
   `mod tests { ... }` count as their file's, one level deeper) resolved to
   the deepest module of the crate it reaches. Declaring a child module
   (`mod x;`) is not a dependency. A cycle is a strongly connected
   component of more than one module, between files or between top-level
   modules (the folders).
2. reservd-proto is pure: no dependencies in its Cargo.toml, and its
   sources use no I/O or system modules of std (fs, io, net, os, process,
   env, thread), no libc, nix or mio, no `unsafe`, no `extern`.

Prints each crate's module graph with -v. Exit status 1 on a violation.
"""
import os
import re
import sys
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CRATES = ["src", "proto/src", "daemon/src", "client/src", "testkit/src",
          "mpath-sys/src", "tests/prshim/src"]


def strip(src):
    """The source without comments, string and char literals."""
    src = re.sub(r'\bb?r(#*)".*?"\1', '""', src, flags=re.S)
    src = re.sub(r'"(\\.|[^"\\])*"', '""', src, flags=re.S)
    src = re.sub(r"'(\\.|[^'\\])'", "' '", src)
    src = re.sub(r"//[^\n]*", "", src)
    return re.sub(r"/\*.*?\*/", "", src, flags=re.S)


def block_end(src, i):
    """The index after the brace closing the block that starts before i."""
    depth = 1
    while depth:
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        i += 1
    return i


def group(prefix, body):
    """crate::{a, b::{c, d}} -> crate::a, crate::b::c, crate::b::d"""
    items, depth, cur = [], 0, ""
    for ch in body:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = []
    for it in (i.strip() for i in items):
        m = re.match(r"([\w:]*?)::\{(.*)\}$", it, re.S)
        if m:
            out += group(prefix + "::" + m.group(1), m.group(2))
        elif it:
            out.append(prefix + "::" + it.split(" as ")[0].strip())
    return out


def paths(src):
    found = []
    for m in re.finditer(r"\b(crate|super|self)((?:::super)*)::\{", src):
        end = block_end(src, m.end())
        found += group(m.group(1) + m.group(2), src[m.end():end - 1])
    for m in re.finditer(r"\b(crate|super|self)((?:::super)*)((?:::\w+)+)", src):
        found.append(m.group(1) + m.group(2) + m.group(3))
    return found


def module_of(root, f):
    parts = os.path.relpath(f, root)[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def sccs(nodes, edges):
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def name(m):
    return "::".join(m) or "(crate root)"


def check_cycles(root, verbose):
    files = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            if f.endswith(".rs"):
                p = os.path.join(d, f)
                files[module_of(root, p)] = p
    mods = set(files)
    edges = defaultdict(set)
    for m, f in files.items():
        src = strip(open(f).read())
        blocks = [(x.start(), block_end(src, x.end()), x.group(1))
                  for x in re.finditer(r"\bmod\s+(\w+)\s*\{", src)]
        outer = src
        for a, b, _ in reversed(blocks):
            outer = outer[:a] + outer[b:]
        texts = [(outer, m)] + [(src[a:b], m + (n,)) for a, b, n in blocks]
        for text, base_m in texts:
            for p in paths(text):
                parts = p.split("::")
                if parts[0] == "crate":
                    base = ()
                else:
                    base = base_m if parts[0] == "self" else base_m[:-1]
                rest = parts[1:]
                while rest and rest[0] == "super":
                    base, rest = base[:-1], rest[1:]
                target = base
                for r in rest:
                    if target + (r,) not in mods:
                        break
                    target += (r,)
                if target not in (m, ()) and target in mods:
                    edges[m].add(target)
    top = defaultdict(set)
    for a, bs in edges.items():
        for b in bs:
            if a[:1] != b[:1]:
                top[a[:1]].add(b[:1])
    if verbose:
        print(f"{root}:")
        for a in sorted(edges):
            print(f"  {name(a)} -> {', '.join(sorted(name(b) for b in edges[a]))}")
    bad = 0
    for c in sccs(mods, edges):
        print(f"{root}: module cycle: {', '.join(sorted(name(m) for m in c))}")
        bad += 1
    for c in sccs({m[:1] for m in mods}, top):
        print(f"{root}: cycle between top-level modules: {', '.join(sorted(name(m) for m in c))}")
        bad += 1
    return bad


def check_pure(verbose):
    bad = 0
    toml = open(os.path.join(ROOT, "proto/Cargo.toml")).read()
    if re.search(r"^\[(dependencies|build-dependencies)\]", toml, re.M):
        print("proto/Cargo.toml: reservd-proto has dependencies")
        bad += 1
    io = re.compile(r"\bstd::(fs|io|net|os|process|env|thread)\b|\b(libc|nix|mio)::"
                    r"|\bunsafe\b|\bextern\b")
    src_dir = os.path.join(ROOT, "proto/src")
    for f in sorted(os.listdir(src_dir)):
        text = strip(open(os.path.join(src_dir, f)).read())
        text = text.replace("forbid(unsafe_code)", "")
        for m in io.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            print(f"proto/src/{f}:{line}: {m.group(0)} in the pure crate")
            bad += 1
    if verbose and not bad:
        print("reservd-proto: no dependencies, no I/O, no unsafe")
    return bad


def main():
    verbose = "-v" in sys.argv[1:]
    bad = sum(check_cycles(os.path.join(ROOT, c), verbose) for c in CRATES)
    bad += check_pure(verbose)
    if bad:
        sys.exit(1)
    print(f"layout: no module cycle in {len(CRATES)} crates; reservd-proto is pure")


if __name__ == "__main__":
    main()
