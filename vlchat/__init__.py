"""vlchat: a MiniGPT-4-style vision-language chat system (vision encoder -> projector -> causal LM)."""

__version__ = "0.1.0"
