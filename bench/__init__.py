"""The benchmark harness of issue 7: ``python -m bench.run`` (``make bench``).

See bench/README.md.
"""
