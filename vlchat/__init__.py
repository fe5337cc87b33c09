"""vlchat: a MiniGPT-4-style vision-language chat system (vision encoder -> projector -> causal LM)."""

__version__ = "0.1.0"


def load(
    name_or_dir: str = "default",
    device: str = "cpu",
    dtype: str | None = None,
    load_in: str | None = None,
    device_map: str | None = None,
):
    """A ready chat object for a preset, a model directory or a `vlchat models` name (vlchat/api.py)."""
    from vlchat.api import load as _load

    return _load(name_or_dir, device=device, dtype=dtype, load_in=load_in, device_map=device_map)
