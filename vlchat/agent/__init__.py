"""The agent: tools the model can call (tools.py), the executor that runs a call and reports an
Observation (executor.py), the built-in tools (builtin/), and the function-calling loop (loop.py)
that the CLI (`vlchat agent`, agent/cli.py), the API and the web UI share.
"""
