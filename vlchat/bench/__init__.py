"""Benchmarks: how fast vlchat is on this machine, one module per question.

    decode.py   `vlchat bench` (make bench): image encoding, time-to-first-token on the first and a
                follow-up turn, decode speed and peak RSS, beside MiniGPT-4's way (re-prefill the
                whole conversation every turn), each mode in its own child process.
    load.py     `python -m vlchat.bench.load` (make load): streaming chat clients against
                `vlchat serve` on loopback: serial, N concurrent, and N concurrent without batching.
    train.py    `python -m vlchat.bench.train CONFIG ...` (make bench-train): a few timed steps of
                each training recipe, projected to whole runs and compared with committed runs.

They import the product; only cli.py (for `vlchat bench`) imports them.
"""
