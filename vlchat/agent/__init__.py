"""The agent: tools the model can call (tools.py), the executor that runs a call and reports an
Observation (executor.py), and the built-in tools (builtin/). The function-calling loop comes later.
"""
