"""The errors a user can cause at the edges (models, the Hub), each a subclass of a builtin the CLI reports
in one line with exit status 2 (README, "What goes wrong and what you see")."""

from __future__ import annotations


class ModelNotFoundError(FileNotFoundError):
    """No such model folder, a folder that is not a saved model, or no such model on the Hub."""


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub could not be reached (no network, offline mode, a wrong ``HF_ENDPOINT``)."""


class HubAuthError(PermissionError):
    """No Hugging Face token, or the Hub refused the one given."""


class HubError(OSError):
    """Any other refusal by the Hub (an HTTP error status), in one line."""


def transport_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a failed connection in the HTTP clients ``huggingface_hub`` may use (``httpx2``
    in huggingface_hub 2, ``httpx`` in 1.x, ``requests`` in 0.x), plus the builtin ``ConnectionError``."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests.exceptions", "ConnectionError"), ("requests.exceptions", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)
