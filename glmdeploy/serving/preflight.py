"""What `glmdeploy serve` checks before it loads anything, and what the loaded model must offer.

Before loading (fail in seconds, not after minutes of loading): the optional packages are
installed, the deployment runs in this process (no torchrun world yet), the API key's variable is
set, and the address can be bound (the socket is bound here and handed to uvicorn). After loading:
the model has a tokenizer that transformers can run without remote code.
"""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import os
import socket
from dataclasses import dataclass

from glmdeploy.config.serve_settings import Serve
from glmdeploy.config.settings import CheckpointLayout, Deployment
from glmdeploy.problems import ConfigError, HardwareError, LoadError, Problem

PACKAGES = ("fastapi", "uvicorn", "pydantic")
INSTALL = (
    "pip install 'glmdeploy[serve]' (in a checkout: pip install -c constraints.txt -e '.[serve]')"
)


@dataclass
class Listener:
    """The bound (not yet listening) socket, and the URL clients use."""

    sock: socket.socket
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def require_packages() -> None:
    """Raises HardwareError (exit 3: this machine lacks software) naming the pip command."""
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        message = f"the server needs {', '.join(missing)}: not installed"
        problem = Problem("serve", message, hint=INSTALL)
        raise HardwareError([problem], "glmdeploy serve's packages are not installed")


def check_serveable(deployment: Deployment) -> None:
    """Refuse what this server cannot run yet: a torchrun world (tensor/pipeline parallel)."""
    parallel = deployment.parallel
    if parallel.world_size > 1:
        message = (
            f"tp_size={parallel.tp_size} × pp_size={parallel.pp_size}: serving a torchrun world "
            "(rank 0 answering HTTP, the other ranks following) is not built yet"
        )
        hint = "parallel=none serves the device-map plan; engine=vllm serves with vLLM's own TP/PP"
        raise ConfigError([Problem("parallel", message, "parallel=none", hint)])


def api_key(serve: Serve) -> str | None:
    """The key clients must send, read from the variable `serve.api_key_env` names (or None)."""
    name = serve.api_key_env
    if name is None:
        return None
    value = os.environ.get(name, "")
    if not value:
        message = f"{name} is not set (or empty): the server would accept any client"
        hint = f"export {name}=… before `glmdeploy serve`, or serve.api_key_env=null for no key"
        raise ConfigError([Problem("serve.api_key_env", message, hint=hint)])
    return value


def listen(serve: Serve) -> Listener:
    """Bind `serve.host`:`serve.port` (0: a free port). Raises ConfigError naming the key."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            serve.host, serve.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        if sock is not None:
            sock.close()
        in_use = exc.errno == errno.EADDRINUSE
        message = f"cannot listen on {serve.host}:{serve.port}: {exc.strerror or exc}"
        hint = (
            "another process uses it: choose another serve.port (or 0 for a free one)"
            if in_use
            else "an address of this machine, e.g. serve.host=127.0.0.1 or 0.0.0.0"
        )
        path = "serve.port" if in_use else "serve.host"
        raise ConfigError([Problem(path, message, hint=hint)]) from exc
    return Listener(sock, serve.host, int(sock.getsockname()[1]))


def preflight(deployment: Deployment) -> Listener:
    """Everything `serve` can check before loading; returns the bound socket (close it after)."""
    require_packages()
    check_serveable(deployment)
    api_key(deployment.serve)
    return listen(deployment.serve)


def require_tokenizer(deployment: Deployment, tokenizer: object | None) -> None:
    """A server turns text into tokens: refuse (LoadError, exit 4) a model without a tokenizer."""
    if tokenizer is not None:
        return
    if deployment.model.source.layout is CheckpointLayout.CHATGLM:
        message = (
            "this legacy ChatGLM checkpoint's tokenizer is remote code (ChatGLMTokenizer over "
            "sentencepiece) and glmdeploy never runs remote code; no native tokenizer verified "
            "token for token against it exists yet, so text cannot be encoded"
        )
        expected = "a native tokenizer (tokenizer.json) and a chat template beside the weights"
        hint = (
            "serve a checkpoint that ships one (e.g. model=glm-4-9b-chat-hf), or add "
            "tokenizer.json and chat_template.jinja to a converted checkpoint "
            "(`glmdeploy convert`) and serve it with model=local model.source.path=DIR"
        )
    else:
        message = "the checkpoint has no tokenizer transformers can load without remote code"
        expected = "tokenizer.json (or tokenizer files of a transformers tokenizer class)"
        hint = "add the model's tokenizer files to the checkpoint directory"
    raise LoadError([Problem("model.source", message, expected, hint)], "cannot serve the model")
