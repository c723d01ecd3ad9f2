"""The container images the real cluster runs, all made on this machine (no registry is reachable from it).

- ``debian:bookworm-slim``, the base deploy/Containerfile names: Debian 12 by ``debootstrap --variant=minbase``,
  tagged under that name so that the Containerfile users build is the file we test, unchanged.
- ``k8s.gcr.io/pause:3.2``, the pod sandbox the kubelet asks for: the static ``pause`` hack/k8s-build compiles
  from the Kubernetes source tree's build/pause.
- ``warren-mesh:0.1.0``: ``buildah bud -f deploy/Containerfile .`` with Debian's buildah, layers cached, so a
  rebuild after a change to the code reruns only the pip step.

They live in buildah's own storage under the cache (not the machine's) and reach each node's containerd as
archives. Inside the build the Containerfile reaches Debian's and PyPI's servers through the host's network; where
this machine's HTTPS goes through a proxy with a CA of its own, that CA is lent to the build (read-only, at a path
the image does not keep) so that pip can verify PyPI.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("WARREN_MESH_K8S_CACHE", "/var/cache/warren-mesh-k8s")) / "images"
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
PAUSE_IMAGE = "k8s.gcr.io/pause:3.2"
PROJECT_IMAGE = "docker.io/library/warren-mesh:0.1.0"  # what `image: warren-mesh:0.1.0` means to a kubelet
RUNROOT = Path("/run/warren-mesh-k8s-buildah")  # buildah's locks while it builds; k8s-down removes it
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA = "/run/warren-mesh-build-ca.crt"


class ImageError(RuntimeError):
    pass


def _run_buildah(*args: str) -> subprocess.CompletedProcess[str]:
    """buildah on our own storage under the cache (never the machine's)."""
    argv = [
        "buildah",
        f"--root={CACHE / 'storage'}",
        f"--runroot={RUNROOT}",
        "--storage-driver=vfs",  # works on any file system, also where overlay-on-overlay does not
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _buildah(*args: str) -> str:
    done = _run_buildah(*args)
    if done.returncode != 0:
        raise ImageError(f"buildah {' '.join(args[:2])} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout.strip()


def _exists(name: str) -> bool:
    return _run_buildah("inspect", "--type=image", name).returncode == 0


def _image_id(name: str) -> str:
    return _buildah("inspect", "--type=image", "--format={{.FromImageID}}", name)


def base_image() -> None:
    if _exists(BASE_IMAGE):
        return
    rootfs = CACHE / "rootfs"
    if not (rootfs / "usr" / "bin" / "apt-get").exists():
        subprocess.run(["rm", "-rf", str(rootfs)], check=True)
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise ImageError(f"debootstrap failed:\n{(done.stdout + done.stderr)[-3000:]}")
    container = _buildah("from", "scratch")
    try:
        _buildah("copy", container, f"{rootfs}/", "/")
        _buildah("config", "--cmd=/bin/bash", container)
        _buildah("commit", "--quiet", container, BASE_IMAGE)
    finally:
        _buildah("rm", container)


def _archive(name: str, archive: Path) -> Path:
    """The image as a docker archive named ``name``, written again only when the image changed."""
    stamp = archive.with_suffix(".id")
    image_id = _image_id(name) if _exists(name) else ""
    if archive.exists() and stamp.exists() and stamp.read_text() == image_id:
        return archive
    archive.unlink(missing_ok=True)
    _buildah("push", "--quiet", name, f"docker-archive:{archive}:{name}")
    stamp.write_text(image_id)
    return archive


def pause_archive(pause_binary: Path) -> Path:
    digest = hashlib.sha256(pause_binary.read_bytes()).hexdigest()[:16]
    archive = CACHE / f"pause-{digest}.tar"
    if archive.exists():
        return archive
    container = _buildah("from", "scratch")
    try:
        _buildah("copy", "--chmod=0755", container, str(pause_binary), "/pause")
        _buildah("config", '--entrypoint=["/pause"]', "--user=65535:65535", container)
        _buildah("commit", "--quiet", container, PAUSE_IMAGE)
    finally:
        _buildah("rm", container)
    _buildah("push", "--quiet", PAUSE_IMAGE, f"docker-archive:{archive}:{PAUSE_IMAGE}")
    return archive


def project_archive(containerfile: Path = ROOT / "deploy" / "Containerfile", tag: str = PROJECT_IMAGE) -> Path:
    """deploy/Containerfile (or another, e.g. a test's) built from the working tree; its archive for the nodes.

    Built only when what goes into it changed (the Containerfile, the files it copies, the base image): even with
    every layer cached, ``buildah bud`` on the vfs driver copies each layer's whole tree, 15-25 s here.
    """
    base_image()
    archive = CACHE / f"{tag.rsplit('/', 1)[-1].replace(':', '_')}.tar"
    inputs = _inputs_digest(containerfile)
    stamp = archive.with_suffix(".inputs")
    if inputs and archive.exists() and stamp.exists() and stamp.read_text() == inputs and _exists(tag):
        return archive
    stamp.unlink(missing_ok=True)
    pip_conf = CACHE / "pip.conf"
    pip_conf.write_text(f"[global]\ncert = {BUILD_CA}\n")
    _buildah(
        "bud",
        "--layers",
        "--pull-never",
        "--network=host",
        f"--volume={HOST_CA}:{BUILD_CA}:ro",
        f"--volume={pip_conf}:/etc/pip.conf:ro",
        f"--file={containerfile}",
        f"--tag={tag}",
        str(ROOT),
    )
    _archive(tag, archive)
    if inputs:
        stamp.write_text(inputs)
    return archive


def _inputs_digest(containerfile: Path) -> str:
    """A digest of what a build of ``containerfile`` (context: the repository) reads: the file itself, the base
    image, and the sources of its COPY lines. Empty when a COPY line is beyond this reading (flags, globs, URLs):
    then the image is always built."""
    digest = hashlib.sha256(containerfile.read_bytes())
    digest.update(_image_id(BASE_IMAGE).encode())
    for line in containerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        sources = words[1:-1]
        if words[0].upper() == "ADD" or any(w.startswith("--") or any(c in w for c in "*?[") for w in sources):
            return ""
        for source in sources:
            path = ROOT / source
            if not path.exists():  # a continued line, or a source the build will refuse: let buildah say
                return ""
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                if "__pycache__" in file.parts:
                    continue
                digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def prune() -> None:
    """Drop the intermediate images of earlier builds (the layer cache keeps what the next build can reuse)."""
    _run_buildah("rmi", "--prune")


def qualified(name: str) -> str:
    """An image name as a kubelet asks containerd for it (``probe:test`` -> ``docker.io/library/probe:test``)."""
    first = name.split("/", 1)[0]
    if "/" not in name:
        return f"docker.io/library/{name}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{name}"
    return name
