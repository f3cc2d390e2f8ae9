"""Open_clip pretrained tags without a long wait: use the local cache, else download, and offline fail
within seconds (instead of retrying for a minute) naming the offline alternatives."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
from huggingface_hub import try_to_load_from_cache

from deft_clean.errors import BackboneError

HUB_PROBE_SECONDS = 3.0


def tag_weights_file(arch: str, tag: str, tag_cfg: dict[str, Any], cache_dir: str | None) -> str:
    """The weights file of an open_clip pretrained tag: cached, else downloaded; offline, fail in seconds.

    Without this, open_clip's download retries for about a minute before failing. Here the cache is
    checked first (no network), then one TCP probe of the host (``HUB_PROBE_SECONDS``) decides.
    """
    path = _cached_tag_file(tag_cfg, cache_dir)
    if path is None:
        host = _tag_host(tag_cfg)
        forced = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")
        if forced or not _reachable(host):
            reason = "HF_HUB_OFFLINE is set" if forced else f"{host} is not reachable (offline?)"
            raise BackboneError(
                f"Cannot download pretrained weights '{tag}' for {arch}: {reason} and they are not in the "
                "local cache.",
                hint="Offline, pass weights you have with --pretrained PATH (a checkpoint file or "
                "local-dir:DIR, see deft-clean export-backbone) or use --model offline.",
            )
        try:
            path = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
        except Exception as error:  # network or hub errors of any kind
            raise BackboneError(f"Downloading '{tag}' for {arch} failed: {error}") from error
    return path


def _cached_tag_file(tag_cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The tag's weights file when it is already downloaded (HF cache or open_clip's URL cache), else None."""
    if tag_cfg.get("hf_hub"):
        repo_id, filename = os.path.split(tag_cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        stem = filename.rsplit(".", 1)[0]
        for name in ("open_clip_model.safetensors", f"{stem}.safetensors", filename):
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
        return None
    url_file = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(tag_cfg.get("url", ""))
    return str(url_file) if url_file.is_file() else None


def _tag_host(tag_cfg: dict[str, Any]) -> str:
    if tag_cfg.get("hf_hub"):
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    return urlparse(tag_cfg.get("url", "")).hostname or "huggingface.co"


def _reachable(host: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout`` s (DNS included, in a thread)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
