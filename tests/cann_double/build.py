#!/usr/bin/env python3
"""Builds the CANN test double into a folder.

    python tests/cann_double/build.py DIR [--sanitize] [--jobs N] [--runtime-only]

DIR then holds libcann_double_core.so (the shared state), libascendcl.so,
libnnopbase.so, libhccl.so and libopapi.so (from every ops_*.cc here); point
JAX_MC2_CANN_LIBRARY_PATH at it. Objects are rebuilt only when a source or a
header here or in ffi/ (the element codecs the double shares with the CPU
kernels) is newer, or the flags changed.
"""

import argparse
import concurrent.futures
import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The sources include the shared codec headers by relative path ("../../ffi/...").
FFI_DIR = HERE.parent.parent / "ffi"
CORE_SOURCES = [
    "core_state.cc",
    "core_memory.cc",
    "core_stream.cc",
    "core_tensor.cc",
    "core_hccl.cc",
    "core_hooks.cc",
]
# Public library -> its sources; each links the core.
WRAPPERS = {
    "libascendcl.so": ["acl.cc"],
    "libnnopbase.so": ["nnopbase.cc"],
    "libhccl.so": ["hccl.cc"],
}
CORE_LIBRARY = "libcann_double_core.so"
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]


def compile_flags(sanitize):
    flags = [
        "-std=c++17",
        "-O2",
        "-g",
        "-fPIC",
        "-pthread",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-fvisibility=hidden",
        "-fvisibility-inlines-hidden",
        f"-I{HERE}",
    ]
    return flags + (SANITIZE_FLAGS if sanitize else [])


def link_flags(sanitize):
    flags = ["-shared", "-pthread", "-Wl,-rpath,$ORIGIN"]
    # With sanitizers the runtime is preloaded, so undefined symbols are expected.
    return flags + (SANITIZE_FLAGS if sanitize else ["-Wl,--no-undefined"])


def run(command):
    print(" ".join(shlex.quote(part) for part in command), flush=True)
    subprocess.run(command, check=True)


def newest_header_time():
    headers = [*HERE.glob("*.h"), *FFI_DIR.glob("*.h")]
    return max((path.stat().st_mtime for path in headers), default=0.0)


def compile_object(cxx, source, out_dir, flags, header_time, force):
    obj = out_dir / "obj" / (source.stem + ".o")
    if (
        not force
        and obj.exists()
        and obj.stat().st_mtime >= max(source.stat().st_mtime, header_time)
    ):
        return obj
    run([cxx, *flags, "-c", str(source), "-o", str(obj)])
    return obj


def link(cxx, objects, output, flags, libraries=()):
    """Links to a temporary name, then renames it over ``output``: a process
    that has the old library loaded, or loads it meanwhile, never sees a
    half-written file."""
    partial = output.with_name(output.name + ".partial")
    run(
        [
            cxx,
            *map(str, objects),
            "-o",
            str(partial),
            *flags,
            f"-Wl,-soname,{output.name}",
            f"-L{output.parent}",
            *(f"-l:{name}" for name in libraries),
        ]
    )
    os.replace(partial, output)


def build(out_dir, sanitize=False, jobs=None, runtime_only=False):
    out_dir = Path(out_dir).resolve()
    (out_dir / "obj").mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    flags = compile_flags(sanitize)
    stamp = out_dir / "obj" / "flags"
    force = not stamp.exists() or stamp.read_text() != " ".join([cxx, *flags])
    ops_sources = [] if runtime_only else sorted(HERE.glob("ops_*.cc"))
    sources = [HERE / name for name in CORE_SOURCES]
    sources += [HERE / name for names in WRAPPERS.values() for name in names]
    sources += ops_sources
    header_time = newest_header_time()
    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        objects = dict(
            zip(
                sources,
                pool.map(
                    lambda source: compile_object(cxx, source, out_dir, flags, header_time, force),
                    sources,
                ),
            )
        )
    stamp.write_text(" ".join([cxx, *flags]))

    lflags = link_flags(sanitize)
    link(cxx, [objects[HERE / name] for name in CORE_SOURCES], out_dir / CORE_LIBRARY, lflags)
    for library, names in WRAPPERS.items():
        link(
            cxx, [objects[HERE / name] for name in names], out_dir / library, lflags, [CORE_LIBRARY]
        )
    if ops_sources:
        link(
            cxx,
            [objects[source] for source in ops_sources],
            out_dir / "libopapi.so",
            lflags,
            [CORE_LIBRARY, "libnnopbase.so", "libascendcl.so", "libhccl.so"],
        )
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument(
        "--sanitize", action="store_true", help="build with -fsanitize=address,undefined"
    )
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument(
        "--runtime-only", action="store_true", help="skip libopapi.so (the operators)"
    )
    args = parser.parse_args()
    try:
        build(args.out_dir, args.sanitize, args.jobs, args.runtime_only)
    except subprocess.CalledProcessError as error:
        sys.exit(error.returncode or 1)


if __name__ == "__main__":
    main()
