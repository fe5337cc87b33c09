"""`vlchat pull NAME|org/repo`: download a checkpoint into $VLCHAT_HOME/models/<org>/<repo>[@<revision>],
where `--model org/repo` finds it and `vlchat models` lists it.

Hugging Face (the default source): huggingface_hub gives the settings and the protocol: HF_ENDPOINT (a
mirror), HF_TOKEN, HF_HUB_OFFLINE, the repository listing at one commit (`HfApi.model_info`, with sizes
and hashes) and the file URLs (`/<repo>/resolve/<commit>/<file>`). The bytes are fetched here, because
huggingface_hub 2.x's snapshot_download writes each file to a process-unique temporary name and cannot
resume a download whose process was killed: vlchat keeps `<file>.part` under `.pull/<commit>/` and asks
for the rest with an HTTP Range request, and verifies every file (size; SHA-256 for LFS files, the git
blob hash for the others) before moving it into place. Offline (HF_HUB_OFFLINE=1) nothing is fetched:
a model already in the Hugging Face cache is used from there.

ModelScope (`--source modelscope`): the `modelscope` package's snapshot_download, through an injectable
client; without the package, a one-line error says how to install it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vlchat.errors import VlchatError
from vlchat.hub import MANIFEST

SOURCES = ("huggingface", "modelscope")
# Short names -> repository per source (what the docs call NAME); any org/repo works as well.
KNOWN_MODELS: dict[str, dict[str, str]] = {
    "llava-1.5-7b": {"huggingface": "llava-hf/llava-1.5-7b-hf"},
    "blip2-opt-2.7b": {"huggingface": "Salesforce/blip2-opt-2.7b"},
    "instructblip-vicuna-7b": {"huggingface": "Salesforce/instructblip-vicuna-7b"},
    "internlm2-chat-1.8b": {
        "huggingface": "internlm/internlm2-chat-1_8b",
        "modelscope": "Shanghai_AI_Laboratory/internlm2-chat-1_8b",
    },
    "internlm2-chat-7b": {
        "huggingface": "internlm/internlm2-chat-7b",
        "modelscope": "Shanghai_AI_Laboratory/internlm2-chat-7b",
    },
}
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    name: str  # path inside the repository (POSIX)
    size: int | None
    sha256: str | None  # LFS files
    git_sha1: str | None  # the git blob id of non-LFS files


def resolve_name(name: str, source: str) -> str:
    """A short name or org/repo -> the repository id at `source`; VlchatError for anything else."""
    if source not in SOURCES:
        raise VlchatError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    if name in KNOWN_MODELS:
        repo = KNOWN_MODELS[name].get(source)
        if repo is None:
            raise VlchatError(f"{name} is not known on {source}; give its org/repo instead")
        return repo
    if not REPO_ID.fullmatch(name) or ".." in name:
        known = ", ".join(KNOWN_MODELS)
        raise VlchatError(f"model name {name!r} is neither org/repo nor a known name ({known})")
    return name


def check_revision(revision: str | None) -> None:
    if revision is not None and (not REVISION.fullmatch(revision) or ".." in revision):
        raise VlchatError(f"revision {revision!r} is not a branch, tag or commit name")


def destination(repo: str, revision: str | None) -> Path:
    """$VLCHAT_HOME/models/org/repo, or org/repo@revision for another revision than the default."""
    from vlchat.assets import vlchat_home

    suffix = f"@{revision.replace('/', '-')}" if revision not in (None, "main") else ""
    return vlchat_home() / "models" / f"{repo}{suffix}"


def pull(
    name: str,
    source: str = "huggingface",
    revision: str | None = None,
    modelscope: Callable | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Path:
    """Download `name` (short name or org/repo) from `source`; returns the model directory."""
    repo = resolve_name(name, source)
    check_revision(revision)
    if source == "modelscope":
        return pull_modelscope(repo, revision, modelscope, log)
    return pull_huggingface(repo, revision, log)


# --- Hugging Face -------------------------------------------------------------------------------
def pull_huggingface(repo: str, revision: str | None, log: Callable[[str], None]) -> Path:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return offline_copy(repo, revision, log)
    commit, files = listing(repo, revision)
    target = destination(repo, revision)
    total = sum(f.size or 0 for f in files)
    log(f"pulling {repo} at {commit[:12]} ({len(files)} files, {total / 1e6:.1f} MB) into {target}")
    staging = target / ".pull" / commit  # complete/ (verified files) and partial/ (<file>.part)
    for remote in files:
        path, done = target / remote.name, staging / "complete" / remote.name
        if path.is_file() and path.stat().st_size == remote.size and previously_pulled(target, commit, remote.name):
            continue
        if not done.is_file():
            part = staging / "partial" / f"{remote.name}.part"
            fetch(repo, commit, remote, part, log)
            done.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, done)
    install(target, staging / "complete", [f.name for f in files])
    manifest = {"source": "huggingface", "repo": repo, "revision": revision, "commit": commit}
    (target / MANIFEST).write_text(json.dumps({**manifest, "files": [f.name for f in files]}, indent=2))
    log(f"done: {target} (--model {target.relative_to(target.parents[1])})")
    return target


def install(target: Path, complete: Path, names: list[str]) -> None:
    """Move the verified files into the model folder; drop files an earlier pull left that the listing lacks."""
    try:
        old = json.loads((target / MANIFEST).read_text()).get("files", [])
    except (OSError, ValueError):
        old = []
    for name in set(old) - set(names):
        check_file_name("the earlier pull", name)
        (target / name).unlink(missing_ok=True)
    for name in names:
        if (complete / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(complete / name, target / name)
    shutil.rmtree(target / ".pull", ignore_errors=True)


def previously_pulled(target: Path, commit: str, name: str) -> bool:
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("commit") == commit and name in manifest.get("files", [])


def offline_copy(repo: str, revision: str | None, log: Callable[[str], None]) -> Path:
    """HF_HUB_OFFLINE: the model already pulled, or its snapshot in the Hugging Face cache; else an error."""
    from vlchat.hub import cached_snapshot

    target = destination(repo, revision)
    if (target / "config.json").is_file():
        log(f"offline (HF_HUB_OFFLINE): {repo} is already pulled into {target}")
        return target
    snapshot = cached_snapshot(repo, revision)
    if snapshot is None:
        raise VlchatError(f"offline (HF_HUB_OFFLINE is set) and {repo} is not in the Hugging Face cache; unset it")
    log(f"offline (HF_HUB_OFFLINE): {repo} is in the Hugging Face cache at {snapshot}; --model {repo} uses it")
    return snapshot


def listing(repo: str, revision: str | None) -> tuple[str, list[RemoteFile]]:
    """(commit sha, the repository's files) at `revision`; names that would leave the folder are refused."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except RevisionNotFoundError:
        raise VlchatError(f"{repo} has no revision {revision!r} on {constants.ENDPOINT}") from None
    except RepositoryNotFoundError:
        raise VlchatError(
            f"no model {repo} on {constants.ENDPOINT} (or it is private or gated: set HF_TOKEN)"
        ) from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise VlchatError(f"cannot list {repo} on {constants.ENDPOINT}: {reason}") from None
    if not info.sha or not re.fullmatch(r"[0-9a-f]{40}", info.sha):
        raise VlchatError(f"{constants.ENDPOINT} gave no commit for {repo}: not a Hugging Face hub API")
    files = []
    for sibling in info.siblings or []:
        check_file_name(repo, sibling.rfilename)
        lfs = sibling.lfs
        sha256 = lfs.sha256 if lfs is not None else None
        files.append(RemoteFile(sibling.rfilename, sibling.size, sha256, None if lfs else sibling.blob_id))
    if not any(f.name == "config.json" for f in files):
        raise VlchatError(f"{repo} has no config.json: not a model checkpoint vlchat can load")
    return info.sha, files


def check_file_name(repo: str, name: str) -> None:
    """A repository file must stay inside the model folder: relative, no '..', no backslashes or NULs."""
    path = PurePosixPath(name)
    bad = (
        not name
        or path.is_absolute()
        or "\\" in name
        or "\0" in name
        or any(part in ("", ".", "..") for part in name.split("/"))
        or re.match(r"[A-Za-z]:", name)
    )
    if bad or path.parts[0] in (".pull", MANIFEST):
        raise VlchatError(f"refusing {repo}: its file list names {name!r}, a path outside the model folder")


def fetch(repo: str, commit: str, remote: RemoteFile, part: Path, log: Callable[[str], None]) -> None:
    """Download one file to `part`, continuing a partial one with a Range request; then verify it."""
    import httpx
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if remote.size is not None and have > remote.size:
        part.unlink()
        have = 0
    url = hf_hub_url(repo, remote.name, revision=commit)
    headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    log(f"  {remote.name} ({_mb(remote.size)})" + (f", resuming at {have} bytes" if have else ""))
    timeout = httpx.Timeout(30.0, connect=10.0)
    try:
        # httpx drops the Authorization header on redirects to another host (the hub's CDN)
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=timeout) as response:
            if response.status_code == 416 and have == remote.size:
                pass  # the partial file is already whole
            elif response.status_code not in (200, 206):
                raise VlchatError(f"cannot download {remote.name} of {repo}: HTTP {response.status_code} from {url}")
            else:
                mode = "ab" if response.status_code == 206 else "wb"  # 200: the server restarted from 0
                with part.open(mode) as out:
                    for chunk in response.iter_bytes():  # as the bytes arrive
                        out.write(chunk)
                        out.flush()  # a killed download keeps what arrived
    except httpx.HTTPError as error:
        raise VlchatError(
            f"download of {remote.name} from {url} failed ({type(error).__name__}); run vlchat pull again to resume"
        ) from None
    verify(repo, remote, part)


def verify(repo: str, remote: RemoteFile, part: Path) -> None:
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        raise VlchatError(
            f"{remote.name} of {repo} is {size} bytes, the listing says {remote.size}; run vlchat pull again"
        )
    if remote.sha256 is not None and file_digest(part, hashlib.sha256()) != remote.sha256:
        part.unlink()
        raise VlchatError(f"{remote.name} of {repo} does not match its SHA-256 (corrupted); deleted, pull again")
    if remote.git_sha1 is not None:
        blob = hashlib.sha1(f"blob {size}\0".encode())
        if file_digest(part, blob) != remote.git_sha1:
            part.unlink()
            raise VlchatError(f"{remote.name} of {repo} does not match its git hash (corrupted); deleted, pull again")


def file_digest(path: Path, digest) -> str:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _mb(size: int | None) -> str:
    return "size unknown" if size is None else f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} B"


# --- ModelScope ---------------------------------------------------------------------------------
def modelscope_client() -> Callable:
    """modelscope's snapshot_download(model_id, revision=..., local_dir=...)."""
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise VlchatError("--source modelscope needs the modelscope package: pip install modelscope") from None
    return snapshot_download


def pull_modelscope(repo: str, revision: str | None, client: Callable | None, log: Callable[[str], None]) -> Path:
    target = destination(repo, revision)
    download = client or modelscope_client()
    log(f"pulling {repo} from ModelScope into {target}")
    try:
        download(repo, revision=revision or "master", local_dir=str(target))
    except VlchatError:
        raise
    except Exception as error:  # the client's own errors: network, unknown repository
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise VlchatError(f"ModelScope download of {repo} failed: {reason}") from None
    for path in target.rglob("*"):
        if not path.resolve().is_relative_to(target.resolve()):
            raise VlchatError(f"refusing {repo}: ModelScope wrote {path.name!r} outside the model folder")
    if not (target / "config.json").is_file():
        raise VlchatError(f"{repo} from ModelScope has no config.json: not a model checkpoint vlchat can load")
    (target / MANIFEST).write_text(json.dumps({"source": "modelscope", "repo": repo, "revision": revision}, indent=2))
    log(f"done: {target}")
    return target
