"""How fast narwhal runs jobs, measured side by side with the raw commands it wraps.

``python -m bench`` brings up everything it needs (Docker, the test image, three sshd
runner hosts, the dispatcher), runs each scenario several times with narwhal and the
hand-made baselines interleaved, prints a table of medians, p95s and ratios next to
their targets, and writes the same numbers as JSON. See docs/benchmarks.md.
"""
