"""The benchmark harness: ``python -m bench.run`` (``make bench``).

See bench/README.md.
"""
