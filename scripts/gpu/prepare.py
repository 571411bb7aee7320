#!/usr/bin/env python3
"""Build carry folders that bring real vLLM 0.24.0 + LMCache 0.5.6 + a Redis server onto the GPU machine.

The GPU machine has no package registry, and one `run` call carries at most 64 MiB. This script downloads
what the GPU image lacks (the image already has torch 2.11.0+cu130, transformers, numpy, httpx, ...),
slims the vLLM wheel (drops the sm80 FlashAttention-2 kernels, the Rust frontend and JIT headers, none of
which an H200 needs), and splits everything into folders .gpu1 .. .gpuN of at most ~38 MB each, in the
current directory (the project root). They are added to .git/info/exclude so git never sees them.

Usage (from the project root):  python3 scripts/gpu/prepare.py [--extra "kopf kubernetes ..."]
Then see scripts/gpu/README.md for the run calls.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
# each call carries the checkout too and at most 64 MiB in all, counted as the files take on disk:
# the checkout was ~17 MB on 2026-12-05 and ~22 MB on 2026-12-06 (benchmark results grow it), so
# 52 MB and then 47 MB parts stopped fitting; 38 MB leaves room for the checkout and the wheel
CAP = 38_000_000
# Python packages on the GPU image ('cuda'), as listed for it on 2026-11-17.
ON_DEVICE = [
    "absl-py",
    "accelerate",
    "aiofiles",
    "aiohappyeyeballs",
    "aiohttp",
    "aiosignal",
    "annotated-doc",
    "anyio",
    "attrs",
    "botorch",
    "build",
    "certifi",
    "charset-normalizer",
    "chex",
    "click",
    "cloudpickle",
    "cmake",
    "colorama",
    "contourpy",
    "coverage",
    "cuda-bindings",
    "cuda-core",
    "cuda-pathfinder",
    "cuda-toolkit",
    "cupy-cuda13x",
    "cycler",
    "cython",
    "diffrax",
    "e3nn",
    "einops",
    "equinox",
    "etils",
    "execnet",
    "filelock",
    "flatbuffers",
    "flax",
    "fonttools",
    "formulaic",
    "frozenlist",
    "fsspec",
    "gpytorch",
    "grpcio",
    "h11",
    "h5py",
    "hf-xet",
    "httpcore",
    "httpx",
    "huggingface-hub",
    "humanize",
    "hypothesis",
    "idna",
    "imageio",
    "iniconfig",
    "interface-meta",
    "jax",
    "jax-cuda13-pjrt",
    "jax-cuda13-plugin",
    "jaxlib",
    "jaxtyping",
    "jinja2",
    "joblib",
    "kiwisolver",
    "lazy-loader",
    "lightning",
    "lightning-utilities",
    "linear-operator",
    "lineax",
    "llvmlite",
    "lxml",
    "markdown",
    "markdown-it-py",
    "markupsafe",
    "matplotlib",
    "mdurl",
    "meson",
    "ml-dtypes",
    "mpi4py",
    "mpmath",
    "msgpack",
    "multidict",
    "multipledispatch",
    "mypy-extensions",
    "nanobind",
    "narwhals",
    "networkx",
    "ninja",
    "numba",
    "numba-cuda",
    "numpy",
    "numpyro",
    "nvidia-cublas",
    "nvidia-cuda-cupti",
    "nvidia-cuda-nvrtc",
    "nvidia-cuda-runtime",
    "nvidia-cudnn-cu13",
    "nvidia-cufft",
    "nvidia-cufile",
    "nvidia-curand",
    "nvidia-cusolver",
    "nvidia-cusparse",
    "nvidia-cusparselt-cu13",
    "nvidia-ml-py",
    "nvidia-nccl-cu13",
    "nvidia-nvjitlink",
    "nvidia-nvshmem-cu13",
    "nvidia-nvtx",
    "onnx",
    "onnx-ir",
    "onnxruntime",
    "onnxscript",
    "opencv-python-headless",
    "optax",
    "opt-einsum",
    "opt-einsum-fx",
    "optimistix",
    "orbax-checkpoint",
    "packaging",
    "pandas",
    "pathspec",
    "patsy",
    "peft",
    "pillow",
    "pip",
    "pluggy",
    "portalocker",
    "prometheus-client",
    "propcache",
    "protobuf",
    "psutil",
    "pyarrow",
    "pybind11",
    "py-cpuinfo",
    "pygments",
    "pyparsing",
    "pyproject-hooks",
    "pyre-extensions",
    "pytest",
    "pytest-benchmark",
    "pytest-cov",
    "pytest-mock",
    "pytest-timeout",
    "pytest-xdist",
    "python-dateutil",
    "pytorch-lightning",
    "pyyaml",
    "regex",
    "requests",
    "rich",
    "sacrebleu",
    "safetensors",
    "scikit-build-core",
    "scikit-image",
    "scikit-learn",
    "scipy",
    "seaborn",
    "sentencepiece",
    "sentence-transformers",
    "setuptools",
    "shellingham",
    "simplejson",
    "six",
    "sortedcontainers",
    "statsmodels",
    "sympy",
    "tabulate",
    "tensorboard",
    "tensorboard-data-server",
    "tensorstore",
    "threadpoolctl",
    "tifffile",
    "tiktoken",
    "timm",
    "tokenizers",
    "toolz",
    "torch",
    "torchaudio",
    "torchdiffeq",
    "torch-geometric",
    "torchmetrics",
    "torchvision",
    "tqdm",
    "transformers",
    "treescope",
    "triton",
    "typer",
    "typing-extensions",
    "typing-inspect",
    "urllib3",
    "uvloop",
    "wadler-lindig",
    "werkzeug",
    "wheel",
    "wrapt",
    "xarray",
    "xxhash",
    "yarl",
    "zipp",
]
# Heavy optional kernels vLLM lists but does not need for a plain Llama on an H200.
SKIP = [
    "flashinfer-python",
    "flashinfer-cubin",
    "tilelang",
    "nvidia-cudnn-frontend",
    "fastsafetensors",
    "nvidia-cutlass-dsl",
    "quack-kernels",
    "tokenspeed-mla",
    "humming-kernels",
    "torchcodec",
    "google-cloud-bigtable",
    "grpcio-observability",
]
VLLM_RUNTIME = (
    "fastapi[standard]>=0.133.0,<0.137.0;;starlette>=1.0.1;;openai>=2.0.0;;pydantic>=2.12.0;;"
    "prometheus-fastapi-instrumentator>=8.0.0;;lm-format-enforcer==0.11.3;;llguidance>=1.7.0,<1.8.0;;"
    "outlines_core==0.2.14;;diskcache==5.6.3;;lark==1.2.2;;xgrammar>=0.2.1,<1.0.0;;partial-json-parser;;"
    "jsonschema>=4.23.0;;pyzmq>=25.0.0;;msgspec;;mistral_common[image]>=1.11.3;;compressed-tensors==0.17.0;;"
    "depyf==0.20.0;;watchfiles;;python-json-logger;;pybase64;;cbor2;;ijson;;setproctitle;;openai-harmony>=0.0.3;;"
    "anthropic>=0.71.0;;model-hosting-container-standards>=0.1.14,<1.0.0;;mcp;;opentelemetry-sdk>=1.27.0;;"
    "opentelemetry-api>=1.27.0;;opentelemetry-exporter-otlp>=1.27.0;;opentelemetry-semantic-conventions-ai>=0.4.1;;"
    "blake3;;cachetools"
)
LMCACHE = (
    "lmcache==0.5.3;;aiofile;;awscrt;;cufile-python;;nvtx;;opentelemetry-exporter-prometheus>=0.50b0,<=0.61b0;;"
    "redis;;cuda-python>=13,<14;;httptools;;setuptools_scm>=8;;google-api-core"
)
PLAT = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + sum(
    (
        ["--platform", p]
        for p in [
            "manylinux_2_28_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_24_x86_64",
            "manylinux_2_34_x86_64",
            "manylinux_2_31_x86_64",
            "any",
        ]
    ),
    [],
)


def pip_download(spec, dest):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLAT, "-d", dest, spec],
        capture_output=True,
        text=True,
    )
    return r.returncode == 0


def closure(specs, dest, skip):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as cn

    env = {
        "python_version": "3.12",
        "python_full_version": "3.12.3",
        "platform_machine": "x86_64",
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    skip = {cn(s) for s in skip}
    todo, seen = [Requirement(s) for s in specs if s.strip()], set()
    while todo:
        req = todo.pop(0)
        name = cn(req.name)
        if name in seen or name in skip:
            continue
        seen.add(name)
        if not pip_download(f"{req.name}{req.specifier}", dest):
            print("  could not download", req, file=sys.stderr)
            continue
        wheel = [w for w in glob.glob(f"{dest}/*.whl") if cn(os.path.basename(w).split("-")[0]) == name][0]
        z = zipfile.ZipFile(wheel)
        meta = next(f for f in z.namelist() if f.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                dep = Requirement(line.split(":", 1)[1].strip())
                extras = list(req.extras) or [""]
                if dep.marker is None or any(dep.marker.evaluate(dict(env, extra=e)) for e in extras):
                    todo.append(dep)
    return seen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--extra", default="", help="more requirements (space separated), e.g. the project's own deps"
    )
    ap.add_argument("--no-lmcache", action="store_true")
    args = ap.parse_args()
    root = os.getcwd()
    work = tempfile.mkdtemp(prefix="gpu-bundle-")
    wheels = os.path.join(work, "wheels")
    os.makedirs(wheels)
    print("downloading vllm 0.24.0 ...")
    assert pip_download("vllm==0.24.0", work), "vllm download failed"
    slim = os.path.join(work, "slim")
    zipfile.ZipFile(glob.glob(f"{work}/vllm-0.24.0-*.whl")[0]).extractall(slim)
    for p in [
        "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",
        "vllm/vllm-rs",
        "vllm/third_party/fmha_sm100",
        "vllm/third_party/deep_gemm/include",
    ]:
        path = os.path.join(slim, p)
        shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
    print("compressing the slimmed vllm (a few minutes) ...")
    xz = os.path.join(work, "vllm_slim.tar.xz")
    subprocess.run(f"tar -C {slim} -cf - . | xz -6 -T2 > {xz}", shell=True, check=True)
    subprocess.run(["split", "-b", str(CAP), "-d", xz, xz + ".part"], check=True)
    print("resolving runtime dependencies missing on the GPU image ...")
    skip = ON_DEVICE + SKIP + ["torch", "vllm"]
    specs = VLLM_RUNTIME.split(";;") + ([] if args.no_lmcache else LMCACHE.split(";;")) + args.extra.split()
    closure(specs, wheels, skip)
    debs = os.path.join(work, "debs")
    os.makedirs(debs)
    subprocess.run(
        "apt-get download redis-tools libjemalloc2 liblzf1",
        shell=True,
        cwd=debs,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    files = (
        sorted(glob.glob(xz + ".part*"))
        + sorted(glob.glob(f"{wheels}/*.whl"), key=os.path.getsize, reverse=True)
        + glob.glob(f"{debs}/*.deb")
    )
    for old in glob.glob(os.path.join(root, ".gpu[0-9]*")):
        shutil.rmtree(old)
    bins = []  # first fit decreasing
    for f in files:
        size = os.path.getsize(f)
        for b in bins:
            if b[0] + size <= CAP:
                b[0] += size
                b[1].append(f)
                break
        else:
            bins.append([size, [f]])
    for i, (size, members) in enumerate(bins, 1):
        d = os.path.join(root, f".gpu{i}")
        os.makedirs(d)
        for f in members:
            shutil.copy(f, d)
        for tool in ["setup.sh", "make_model.py"]:
            shutil.copy(os.path.join(HERE, tool), d)
        print(f"  .gpu{i}: {size / 1e6:.0f} MB, {len(members)} files")
    excl = os.path.join(root, ".git", "info", "exclude")
    os.makedirs(os.path.dirname(excl), exist_ok=True)
    current = open(excl).read() if os.path.exists(excl) else ""
    if "/.gpu*/" not in current:
        with open(excl, "a") as fh:
            fh.write("\n/.gpu*/\n")
    shutil.rmtree(work)
    print(f"done: {len(bins)} folders. Carry them one per run call, in order; see scripts/gpu/README.md")


if __name__ == "__main__":
    main()
