"""Research and diagnostic scripts: experiments behind the default model's recipes, not part of the
vlchat package. Run each from the repository root as `python -m research.NAME`; see README.md here."""
