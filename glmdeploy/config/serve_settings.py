"""The typed view of `glmdeploy serve`'s keys: the `serve` section, and `runtime`'s serving keys.

Split from `glmdeploy.config.settings` (which re-exports `Serve`) to keep that module short; the
schema owns ranges and descriptions, `conf/` the defaults, as for every other key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Serve:
    """Where the server listens, the API key's variable name (never the key), how it stops."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port, printed when ready
    api_key_env: str | None = None  # e.g. GLMDEPLOY_API_KEY
    shutdown_timeout_s: float = 10.0


def serve_from_dict(sv: Mapping[str, Any]) -> Serve:
    """The `serve` section of a validated config (absent keys: the defaults)."""
    default = Serve()
    return Serve(
        host=str(sv.get("host", default.host)),
        port=int(sv.get("port", default.port)),
        api_key_env=sv.get("api_key_env"),
        shutdown_timeout_s=float(sv.get("shutdown_timeout_s", default.shutdown_timeout_s)),
    )


def runtime_serving_from_dict(r: Mapping[str, Any]) -> dict[str, Any]:
    """`runtime`'s serving keys present in a validated config, typed: keyword arguments for
    `settings.Runtime` (absent keys keep its defaults)."""
    casts = {"max_queued_requests": int, "temperature": float, "top_p": float}
    out: dict[str, Any] = {k: cast(r[k]) for k, cast in casts.items() if k in r}
    if r.get("max_tokens_per_request") is not None:
        out["max_tokens_per_request"] = int(r["max_tokens_per_request"])
    return out
